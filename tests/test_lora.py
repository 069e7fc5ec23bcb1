"""LoRA in stage 2 (`--lora_enable`): what trains, the merged output folder, TGA through the adapters, ZeRO-3, export.

Tiny models (tga/tiny.py). The in-process tests drive TGATrainer directly; `test_run_stage_*` runs the real
`run_stage("finetune", ...)` in one process, and the distributed test launches 2 CPU ranks under ZeRO-3.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer, LlavaForConditionalGeneration
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from tga.config import TrainingArguments
from tga.data.collator import VLMCollator
from tga.data.dataset import SampleBuilder
from tga.data.records import load_records
from tga.data.templates import get_template
from tga.export import export_hf_llava, model_from_deepspeed_checkpoint
from tga.model.lora import ADAPTER_DIR, NON_LORA_FILE, add_lora, is_lora_key, merge_lora_state, save_lora_model_folder
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm, load_vlm
from tga.tiny import mistral_tokenizer_file
from tga.train.checkpoint import save_model_folder
from tga.train.run import run_stage
from tga.train.stages import apply_lora_stage, apply_stage, trainable_components
from tga.train.trainer import GuideConfig, TGATrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    """Tokenizer, a saved starting VLM folder (the 'pre-training model'), a batch of 8 stage-2 records."""
    root = tmp_path_factory.mktemp("lora")
    tokenizer = load_tokenizer(tiny_assets["llm"])
    image_processor = load_image_processor(tiny_assets["vision"])
    torch.manual_seed(0)
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    args = TrainingArguments(output_dir=str(root / "trainer"), report_to="none")
    base = str(root / "base")
    save_model_folder(TGATrainer(model=model, args=args, processing_class=tokenizer), model, tokenizer,
                      image_processor, base)
    builder = SampleBuilder(tokenizer=tokenizer, template=get_template("llava_llama_2"), image_processor=image_processor,
                            image_folder=tiny_assets["image_folder"], image_token_id=image_token_id(tokenizer),
                            num_image_tokens=model.config.image_seq_length, use_retrieved=True, caption_target=True)
    batch = VLMCollator(tokenizer.pad_token_id)([builder.build(r) for r in load_records(tiny_assets["stage2"])[:8]])
    yield {"root": root, "tokenizer": tokenizer, "image_processor": image_processor, "base": base, "batch": batch,
           "args": args}
    unset_hf_deepspeed_config()


def lora_model(folder, r=8):
    model = load_vlm(folder)
    components = trainable_components("finetune")
    apply_stage(model, components)
    model = add_lora(model, r=r, alpha=16, dropout=0.05, targets=",".join(TARGETS), wrap=False)
    apply_lora_stage(model, components)
    return model


def unlora(key):
    return key.replace(".base_layer.", ".")


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**{k: batch[k] for k in MODEL_KEYS}).logits


@pytest.fixture(scope="module")
def trained(setup):
    """A LoRA model trained 8 steps on one repeated batch (CE only), gradients recorded per step, then saved."""
    model = lora_model(setup["base"])
    before = {unlora(k): v.clone() for k, v in model.state_dict().items() if not is_lora_key(k)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    trainer = TGATrainer(model=model, args=setup["args"], processing_class=setup["tokenizer"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses, with_grad = setup["batch"], [], []
    keys = (*MODEL_KEYS, "labels", "guide")
    model.train()
    for _ in range(8):
        loss = trainer.compute_loss(model, {k: batch[k] for k in keys if k in batch})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with_grad.append({n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0})
        optimizer.step()
        losses.append(float(loss.detach()))
    after = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, batch)
    out = str(setup["root"] / "trained")
    save_lora_model_folder(trainer, model, setup["tokenizer"], setup["image_processor"], out, base_model=setup["base"])
    return {"model": model, "before": before, "after": after, "trainable": trainable, "losses": losses,
            "with_grad": with_grad, "expected": expected, "out": out}


@pytest.mark.slow
def test_only_llm_adapters_and_the_projector_train(trained):
    trainable = trained["trainable"]
    lora = {n for n in trainable if is_lora_key(n)}
    assert lora and all(".language_model." in n and n.rsplit(".", 4)[-4] in TARGETS for n in lora)
    assert trainable - lora == {n for n in trainable if ".multi_modal_projector." in n}  # projector fully trainable
    assert len(trainable - lora) == 4
    assert not any("vision_tower" in n or "lm_head" in n or "embed_tokens" in n for n in trainable)
    for names in trained["with_grad"]:
        assert names <= trainable
        assert any(".multi_modal_projector." in n for n in names)
        assert any(".lora_B." in n for n in names)
    assert lora <= trained["with_grad"][1]  # from step 2 on (B != 0) every lora_A and lora_B has a gradient


@pytest.mark.slow
def test_base_llm_and_vision_are_bitwise_unchanged_before_merge(trained):
    before, after = trained["before"], {unlora(k): v for k, v in trained["after"].items() if not is_lora_key(k)}
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".multi_modal_projector." in k}
    lora_b = [v for k, v in trained["after"].items() if ".lora_B." in k]
    assert all(v.abs().sum() > 0 for v in lora_b)  # peft initialises B to zero: every adapter trained


@pytest.mark.slow
def test_loss_is_finite_and_falls_on_repeated_data(trained):
    losses = trained["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5 and min(losses[-3:]) < min(losses[:3]), losses


@pytest.mark.slow
def test_merged_folder_loads_with_plain_transformers_and_equals_the_trained_model(trained, setup):
    out = trained["out"]
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert not any("lora" in key or "base_layer" in key for key in weights)
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    merged = logits(loaded, setup["batch"])
    assert torch.allclose(merged, trained["expected"], atol=1e-5)
    original = logits(LlavaForConditionalGeneration.from_pretrained(setup["base"]), setup["batch"])
    assert not torch.allclose(merged, original, atol=1e-3)
    # The folder is a complete model folder: processor and chat template as after full fine-tuning.
    assert os.path.exists(os.path.join(out, "processor_config.json")) or os.path.exists(
        os.path.join(out, "preprocessor_config.json"))
    assert load_tokenizer(out).chat_template


@pytest.mark.slow
def test_adapter_folder_is_peft_format_and_rebuilds_the_model_on_the_base(trained, setup):
    from peft import PeftModel

    adapter = os.path.join(trained["out"], ADAPTER_DIR)
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    assert config["r"] == 8 and config["lora_alpha"] == 16 and "language_model" in config["target_modules"]
    non_lora = load_file(os.path.join(adapter, NON_LORA_FILE))
    assert non_lora and all(".multi_modal_projector." in key for key in non_lora)  # LLaVA's non_lora_trainables
    rebuilt = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(setup["base"]), adapter)
    missing, unexpected = rebuilt.load_state_dict(non_lora, strict=False)
    assert not unexpected
    assert torch.allclose(logits(rebuilt, setup["batch"]), trained["expected"], atol=1e-5)


def test_merge_is_w_plus_scaled_b_a():
    state = {"m.q_proj.base_layer.weight": torch.randn(6, 4), "m.q_proj.base_layer.bias": torch.randn(6),
             "m.q_proj.lora_A.default.weight": torch.randn(2, 4), "m.q_proj.lora_B.default.weight": torch.randn(6, 2),
             "m.norm.weight": torch.randn(4)}
    merged = merge_lora_state(state, 0.5)
    assert merged.keys() == {"m.q_proj.weight", "m.q_proj.bias", "m.norm.weight"}
    expected = state["m.q_proj.base_layer.weight"] + 0.5 * state["m.q_proj.lora_B.default.weight"] @ state[
        "m.q_proj.lora_A.default.weight"]
    assert torch.allclose(merged["m.q_proj.weight"], expected)


def test_tga_guide_gradient_reaches_lora_below_the_deepest_target_layer(setup):
    model = lora_model(setup["base"])
    with torch.no_grad():  # B = 0 at init gives lora_A no gradient; start from trained-looking adapters
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.02)
    trainer = TGATrainer(model=model, args=setup["args"], processing_class=setup["tokenizer"],
                         guide=GuideConfig(layers=[1, 2]))
    batch = setup["batch"]
    hidden = model.train()(**{k: batch[k] for k in MODEL_KEYS}, output_hidden_states=True).hidden_states
    loss, _ = trainer.guide.loss(model, hidden, batch["guide"])  # the guide loss alone: no CE
    loss.backward()

    def grad(layer, kind):
        params = [p for n, p in model.named_parameters() if f"layers.{layer}." in n and f".lora_{kind}." in n]
        assert len(params) == len(TARGETS)
        return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)

    # hidden_states[2] is the output of decoder layer 1: layers 0 and 1 feed the targets, 2 and 3 do not.
    for layer in (0, 1):
        assert grad(layer, "A") > 0 and grad(layer, "B") > 0
    for layer in (2, 3):
        assert grad(layer, "A") == 0 and grad(layer, "B") == 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert sum(float(p.grad.abs().sum()) for p in model.model.multi_modal_projector.parameters()) > 0


def stage2_flags(tiny_assets, model, out, *flags):
    return ["--model_name_or_path", model, "--vision_tower", tiny_assets["vision"], "--data_path", tiny_assets["stage2"],
            "--image_folder", tiny_assets["image_folder"], "--output_dir", str(out), *flags]


@pytest.fixture(scope="module")
def stage2_run(setup, tiny_assets):
    """`run_stage("finetune")` with LoRA and TGA in one process (no DeepSpeed), from the saved base VLM."""
    out = setup["root"] / "run"
    config = os.path.join(REPO, "configs/finetune/tiny_cpu_tga.yaml")
    try:
        run_stage("finetune", [config, *stage2_flags(
            tiny_assets, setup["base"], out, "--deepspeed", "", "--pretrain_mm_mlp_adapter", "", "--max_steps", "6",
            "--per_device_train_batch_size", "4", "--lora_enable", "true", "--lora_r", "8", "--learning_rate", "1e-3",
            "--tga_layers", "1-3", "--save_strategy", "steps", "--save_steps", "3")])
    finally:
        unset_hf_deepspeed_config()
    return str(out)


def split(state):
    parts = {"vision": {}, "projector": {}, "llm": {}}
    for key, value in state.items():
        parts["vision" if "vision_tower" in key else "projector" if "multi_modal_projector" in key else "llm"][key] = value
    return parts


@pytest.mark.slow
def test_run_stage_with_lora_and_tga_saves_a_merged_folder(stage2_run, setup):
    run, base = split(load_file(os.path.join(stage2_run, "model.safetensors"))), split(
        load_file(os.path.join(setup["base"], "model.safetensors")))
    assert run["llm"].keys() == base["llm"].keys()
    assert all(torch.equal(run["vision"][k], base["vision"][k]) for k in base["vision"])
    assert not any(torch.equal(run["projector"][k], base["projector"][k]) for k in base["projector"])
    changed = {k for k in base["llm"] if not torch.equal(run["llm"][k], base["llm"][k])}
    assert changed and all(k.rsplit(".", 2)[-2] in TARGETS for k in changed)  # merged adapters only
    assert os.path.exists(os.path.join(stage2_run, ADAPTER_DIR, "adapter_model.safetensors"))
    with open(os.path.join(stage2_run, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    assert any("tga/cos_ic/L1" in entry for entry in history)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in history if "loss" in e)
    with open(os.path.join(stage2_run, "tga_config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["ModelArguments"]["lora_enable"] is True
    LlavaForConditionalGeneration.from_pretrained(stage2_run)


@pytest.mark.slow
def test_export_of_a_lora_run_and_of_its_unmerged_checkpoint_equal_the_model(stage2_run, setup, tmp_path):
    expected = logits(load_vlm(stage2_run), setup["batch"])
    exported = LlavaForConditionalGeneration.from_pretrained(export_hf_llava(stage2_run, str(tmp_path / "hf")))
    assert torch.allclose(logits(exported, setup["batch"]), expected, atol=1e-5)
    # A Trainer checkpoint of a LoRA run holds the adapters unmerged; export merges them.
    checkpoint = os.path.join(stage2_run, "checkpoint-6")
    assert any("lora_A" in key for key in load_file(os.path.join(checkpoint, "model.safetensors")))
    from_checkpoint = LlavaForConditionalGeneration.from_pretrained(export_hf_llava(checkpoint, str(tmp_path / "ck")))
    assert torch.allclose(logits(from_checkpoint, setup["batch"]), expected, atol=1e-5)


def test_lora_flags_are_checked(tiny_assets, tmp_path):
    from tga.errors import ConfigError

    try:
        with pytest.raises(ConfigError, match="--lora_enable is for stage 2"):
            run_stage("pretrain", stage2_flags(tiny_assets, tiny_assets["llm"], tmp_path, "--lora_enable", "true"))
        with pytest.raises(ConfigError, match="contradicts --tune_mm_mlp_adapter"):
            run_stage("finetune", stage2_flags(tiny_assets, tiny_assets["llm"], tmp_path, "--lora_enable", "true",
                                               "--freeze_backbone", "true"))
        with pytest.raises(ConfigError, match="--lora_bias"):
            run_stage("finetune", stage2_flags(tiny_assets, tiny_assets["llm"], tmp_path, "--lora_enable", "true",
                                               "--lora_bias", "some"))
    finally:
        unset_hf_deepspeed_config()


# ---- Llama-based VLMs export (with and without LoRA) ----

def save_tiny_llama(folder):
    os.makedirs(folder, exist_ok=True)
    shutil.copy(mistral_tokenizer_file(), os.path.join(folder, "tokenizer.model"))
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, legacy=False)
    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
                     ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_llama_based_vlm_exports_and_round_trips(tiny_assets, setup, tmp_path, lora):
    llm = save_tiny_llama(str(tmp_path / "llama"))
    tokenizer = load_tokenizer(llm)
    torch.manual_seed(0)
    model = build_vlm(llm, tiny_assets["vision"], tokenizer, template="vicuna_v1")
    assert model.config.text_config.model_type == "llama"
    trainer = TGATrainer(model=model, args=setup["args"], processing_class=tokenizer)
    source = str(tmp_path / "run")
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0, wrap=False)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.normal_(std=0.05)
        save_lora_model_folder(trainer, model, tokenizer, setup["image_processor"], source)
    else:
        save_model_folder(trainer, model, tokenizer, setup["image_processor"], source)
    expected = logits(model, setup["batch"])
    exported = export_hf_llava(source, str(tmp_path / "hf"))
    loaded = LlavaForConditionalGeneration.from_pretrained(exported)
    assert loaded.config.text_config.model_type == "llama"
    assert torch.allclose(logits(loaded, setup["batch"]), expected, atol=1e-5)
    assert load_tokenizer(exported).chat_template


# ---- 2 CPU ranks, ZeRO-3, LoRA + TGA ----


@pytest.mark.distributed
def test_zero3_two_ranks_lora_tga_run_merges_and_exports(setup, tiny_assets, tmp_path, launch_stage):
    # From the LLM + vision tower, as tests/test_distributed.py does (stage 2 with a fresh projector).
    out = launch_stage("finetune.py", "configs/finetune/tiny_cpu_tga.yaml", str(tmp_path / "zero3"), tiny_assets,
                 "--data_path", tiny_assets["stage2"], "--pretrain_mm_mlp_adapter", "", "--max_steps", "4",
                 "--per_device_train_batch_size", "2", "--lora_enable", "true", "--lora_r", "8",
                 "--learning_rate", "1e-3", "--tga_layers", "1-3", "--save_strategy", "steps", "--save_steps", "4")
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert not any("lora" in key or "base_layer" in key for key in weights)
    final = LlavaForConditionalGeneration.from_pretrained(out)  # plain transformers, adapters merged
    parts = split(weights)
    source_llm = load_file(os.path.join(tiny_assets["llm"], "model.safetensors"))
    source_vision = load_file(os.path.join(tiny_assets["vision"], "model.safetensors"))
    changed = set()
    for key, value in parts["llm"].items():  # llava-hf layout: language_model.model.* / language_model.lm_head.*
        source = source_llm[key.removeprefix("language_model.")]
        if not torch.equal(value[: source.shape[0]], source):
            changed.add(key)
    assert changed and all(k.rsplit(".", 2)[-2] in TARGETS for k in changed)  # only the merged adapters moved
    assert all(torch.equal(v, source_vision[k.removeprefix("vision_tower.")]) for k, v in parts["vision"].items())
    assert os.path.exists(os.path.join(out, ADAPTER_DIR, NON_LORA_FILE))
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as handle:
        assert any("tga/cos_ic/L1" in entry for entry in json.load(handle)["log_history"])
    # The ZeRO-3 shards of the last checkpoint hold the adapters unmerged; export merges them.
    checkpoint = sorted(glob.glob(os.path.join(out, "checkpoint-*")))[-1]
    from_shards = model_from_deepspeed_checkpoint(checkpoint)
    assert torch.allclose(logits(from_shards, setup["batch"]), logits(final, setup["batch"]), atol=1e-5)


@pytest.mark.distributed
def test_zero2_two_ranks_lora_tga_run_merges(tiny_assets, tmp_path, launch_stage):
    out = launch_stage("finetune.py", "configs/finetune/tiny_cpu_tga.yaml", str(tmp_path / "zero2"), tiny_assets,
                 "--data_path", tiny_assets["stage2"], "--pretrain_mm_mlp_adapter", "", "--max_steps", "3",
                 "--per_device_train_batch_size", "2", "--lora_enable", "true", "--lora_r", "8",
                 "--learning_rate", "1e-3", "--tga_layers", "1-3", "--deepspeed", "deepspeed_configs/zero2.json")
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert not any("lora" in key or "base_layer" in key for key in weights)
    source_llm = load_file(os.path.join(tiny_assets["llm"], "model.safetensors"))
    changed = {k for k, v in split(weights)["llm"].items()
               if not torch.equal(v[: source_llm[k.removeprefix("language_model.")].shape[0]],
                                  source_llm[k.removeprefix("language_model.")])}
    assert changed and all(k.rsplit(".", 2)[-2] in TARGETS for k in changed)
    LlavaForConditionalGeneration.from_pretrained(out)  # plain transformers loads the merged folder
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as handle:
        assert any("tga/cos_ic/L1" in entry for entry in json.load(handle)["log_history"])
