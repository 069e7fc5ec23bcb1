"""Both stages end to end under `deepspeed --num_gpus 2` (CPU, gloo, ZeRO-3), with and without TGA.

Runs are launched once per module (about 30 s each) and the tests read their outputs.
"""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tga.align import pool_layers
from tga.data.dataset import SampleBuilder
from tga.data.records import load_records
from tga.data.templates import get_template
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import load_vlm

pytestmark = pytest.mark.distributed
LAYERS = [1, 2, 3]



@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory, launch_stage):
    root = tmp_path_factory.mktemp("runs")
    # A known starting projector, so the test can tell that stage 1 changed it.
    from tga.model.vlm import build_vlm

    torch.manual_seed(0)
    initial = build_vlm(tiny_assets["llm"], tiny_assets["vision"], load_tokenizer(tiny_assets["llm"]))
    projector0 = str(root / "projector0.safetensors")
    save_file({k: v.contiguous() for k, v in initial.model.multi_modal_projector.state_dict().items()}, projector0)
    common = ["--num_train_epochs", "4"]
    out = {"projector0": projector0}
    out["stage1"] = launch_stage("pretrain.py", "configs/pretrain/tiny_cpu.yaml", str(root / "s1"), tiny_assets,
                           "--data_path", tiny_assets["stage1"], "--pretrain_mm_mlp_adapter", projector0,
                           "--save_full_model", "true", *common)
    out["stage1_tga"] = launch_stage("pretrain.py", "configs/pretrain/tiny_cpu_tga.yaml", str(root / "s1_tga"), tiny_assets,
                               "--data_path", tiny_assets["stage1"], "--pretrain_mm_mlp_adapter", projector0,
                               "--save_full_model", "true", "--tga_layers", "1-3", *common)
    for name, config, previous in (("stage2", "configs/finetune/tiny_cpu.yaml", "stage1"),
                                   ("stage2_tga", "configs/finetune/tiny_cpu_tga.yaml", "stage1_tga")):
        projector = os.path.join(out[previous], "mm_projector.safetensors")
        checkpoints = ["--save_strategy", "steps", "--save_steps", "16"] if name == "stage2" else []
        out[name] = launch_stage("finetune.py", config, str(root / name), tiny_assets, "--data_path", tiny_assets["stage2"],
                           "--pretrain_mm_mlp_adapter", projector, *common, *checkpoints)
    # stage 2 started from the saved stage-1 VLM folder (not from LLM + projector)
    out["stage2_from_vlm"] = launch_stage(
        "finetune.py", "configs/finetune/tiny_cpu.yaml", str(root / "stage2_from_vlm"), tiny_assets,
        "--model_name_or_path", out["stage1"], "--data_path", tiny_assets["stage2"],
        "--pretrain_mm_mlp_adapter", os.path.join(out["stage1"], "mm_projector.safetensors"), "--num_train_epochs", "1")
    return out


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def split(state):
    parts = {"vision": {}, "projector": {}, "llm": {}}
    for key, value in state.items():
        part = "vision" if "vision_tower" in key else "projector" if "multi_modal_projector" in key else "llm"
        parts[part][key] = value
    return parts


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(folder):
    with open(os.path.join(folder, "trainer_state.json")) as handle:
        return [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]


def test_stage1_changes_only_the_projector(runs, tiny_assets):
    stage1 = split(weights(runs["stage1"]))
    from safetensors.torch import load_file as load

    source_llm = load(os.path.join(tiny_assets["llm"], "model.safetensors"))
    source_vision = load(os.path.join(tiny_assets["vision"], "model.safetensors"))
    for key, value in stage1["llm"].items():  # llava-hf layout: language_model.model.* / language_model.lm_head.*
        source = source_llm[key.removeprefix("language_model.")]
        assert torch.equal(value[: source.shape[0]], source), key
    for key, value in stage1["vision"].items():
        assert torch.equal(value, source_vision[key.removeprefix("vision_tower.")]), key
    projector0 = load(runs["projector0"])
    trained = load(os.path.join(runs["stage1"], "mm_projector.safetensors"))
    assert trained.keys() == projector0.keys() and not any(torch.equal(trained[k], projector0[k]) for k in trained)
    assert all(torch.equal(trained[k], stage1["projector"]["multi_modal_projector." + k]) for k in trained)


def test_stage2_changes_llm_and_projector_not_vision(runs):
    # The plain stage-2 run started from the plain stage-1 projector.
    stage1, stage2 = split(weights(runs["stage1"])), split(weights(runs["stage2"]))
    assert equal(stage1["vision"], stage2["vision"])
    assert not any(torch.equal(stage1["projector"][k], stage2["projector"][k]) for k in stage1["projector"])
    changed = [k for k in stage1["llm"] if not torch.equal(stage1["llm"][k], stage2["llm"][k])]
    assert len(changed) > 0.9 * len(stage1["llm"])


def test_stage2_from_a_saved_vlm_folder_saves_the_same_layout(runs):
    # Under ZeRO-3, transformers' record of the renamings it applied while loading wrote `language_model.model.model.*`
    # and `vision_tower.vision_model.*` keys (tga.model.vlm.load_vlm drops the record).
    stage1, stage2 = weights(runs["stage1"]), weights(runs["stage2_from_vlm"])
    assert stage2.keys() == stage1.keys()
    parts1, parts2 = split(stage1), split(stage2)
    assert equal(parts1["vision"], parts2["vision"])
    assert sum(not torch.equal(parts1["llm"][k], parts2["llm"][k]) for k in parts1["llm"]) > 0.9 * len(parts1["llm"])
    reloaded = load_vlm(runs["stage2_from_vlm"]).state_dict()
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(reloaded[key], stage2["language_model.model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("run", ["stage1", "stage1_tga", "stage2", "stage2_tga"])
def test_loss_falls_over_repeated_epochs(runs, run):
    values = losses(runs[run])
    assert len(values) >= 8
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3


def test_tga_logs_guide_metrics_and_plots(runs):
    with open(os.path.join(runs["stage2_tga"], "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    keys = set().union(*history)
    assert {"tga/cos_ic/L1", "tga/cos_ic/L3", "tga/cos_rc/L2", "tga/specificity/L2", "tga/pair", "tga/hinge"} <= keys
    assert os.path.exists(os.path.join(runs["stage2_tga"], "loss_curve.png"))


def mean_image_caption_cosine(folder, assets, data) -> float:
    """Mean over layers 1-3 and the guide samples of cos(pooled image states, pooled caption states), with the
    model's own template (plain after stage 1, llava_llama_2 after stage 2)."""
    model, tokenizer = load_vlm(folder).eval(), load_tokenizer(folder)
    builder = SampleBuilder(tokenizer=tokenizer, template=get_template(model.config.tga_template),
                            image_processor=load_image_processor(folder), image_folder=assets["image_folder"],
                            image_token_id=image_token_id(tokenizer), num_image_tokens=model.config.image_seq_length,
                            caption_target=True)
    cosines = []
    for record in load_records(assets[data]):
        sample = builder.build(record)
        if not sample["guide"]:
            continue
        with torch.no_grad():
            hidden = model(input_ids=sample["input_ids"][None], pixel_values=sample["pixel_values"][None],
                           output_hidden_states=True).hidden_states
            caption = model.model.language_model(input_ids=sample["caption_input_ids"][None],
                                                 output_hidden_states=True).hidden_states
        image_states = pool_layers(hidden, LAYERS, sample["image_mask"][None])
        caption_states = pool_layers(caption, LAYERS, sample["caption_mask"][None])
        cosines.append(torch.nn.functional.cosine_similarity(image_states, caption_states, dim=-1).mean())
    return float(torch.stack(cosines).mean())


@pytest.mark.parametrize("stage, data", [("stage1", "stage1"), ("stage2", "stage2")])
def test_tga_raises_image_caption_similarity_over_the_same_run_without_it(runs, tiny_assets, stage, data):
    with_tga = mean_image_caption_cosine(runs[f"{stage}_tga"], tiny_assets, data)
    without = mean_image_caption_cosine(runs[stage], tiny_assets, data)
    assert with_tga > without + 0.05, (with_tga, without)


def test_zero3_checkpoint_exports_to_the_same_weights_as_its_consolidated_copy(runs, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from tga.export import export_hf_llava, model_from_deepspeed_checkpoint

    checkpoint = sorted(glob.glob(os.path.join(runs["stage2"], "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))[-1]
    from_shards = model_from_deepspeed_checkpoint(checkpoint).state_dict()
    consolidated = load_vlm(checkpoint).state_dict()  # the Trainer's gathered copy in the same checkpoint
    assert from_shards.keys() == consolidated.keys()
    assert all(torch.equal(from_shards[k], consolidated[k]) for k in consolidated)
    exported = export_hf_llava(runs["stage2"], str(tmp_path / "hf"))
    model = LlavaForConditionalGeneration.from_pretrained(exported)  # plain transformers, no project code
    final = load_vlm(runs["stage2"]).state_dict()
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)
