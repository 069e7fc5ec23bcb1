"""The VLM: assembly from pretrained parts, projector types, HF-native save/load, generation, stage-1 projector import."""

import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tga.errors import ConfigError
from tga.model.processor import build_processor
from tga.model.projector import MLPProjector, build_projector, projector_depth
from tga.model.tokenizer import load_tokenizer
from tga.model.vlm import build_vlm, load_vlm
from tga.train.checkpoint import load_projector, read_projector_state, save_projector
from tga.train.stages import apply_stage, trainable_components


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return load_tokenizer(tiny_assets["llm"])


def make_vlm(tiny_assets, tokenizer, projector_type="mlp2x_gelu"):
    torch.manual_seed(0)
    return build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer, projector_type=projector_type)


def batch(model, tokenizer):
    image_id = model.config.image_token_id
    ids = torch.tensor([[tokenizer.bos_token_id] + [image_id] * model.config.image_seq_length + [400, 500, 600]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 32, 32)}


def test_assembled_model_keeps_pretrained_weights(tiny_assets, tokenizer):
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    model = make_vlm(tiny_assets, tokenizer)
    llm = AutoModelForCausalLM.from_pretrained(tiny_assets["llm"])
    vision = CLIPVisionModel.from_pretrained(tiny_assets["vision"])
    assert torch.equal(model.model.language_model.layers[1].mlp.down_proj.weight, llm.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(model.lm_head.weight[:32000], llm.lm_head.weight[:32000])
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                       vision.embeddings.patch_embedding.weight)
    assert model.lm_head.weight.shape[0] % 64 == 0 and model.lm_head.weight.shape[0] >= len(tokenizer)
    assert model.config.image_seq_length == 16 and model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"


def test_saved_folder_loads_with_plain_transformers_same_logits_and_generates(tiny_assets, tokenizer, tmp_path):
    model = make_vlm(tiny_assets, tokenizer).eval()
    inputs = batch(model, tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from tga.model.vision import load_image_processor

    build_processor(model, tokenizer, load_image_processor(tiny_assets["vision"])).save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-5)
        generated = loaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 5)
    processor = AutoProcessor.from_pretrained(tmp_path)  # expands <image> exactly like the training data pipeline
    from PIL import Image

    encoded = processor(images=Image.new("RGB", (32, 32)), text="<image>\nhi", return_tensors="pt")
    assert int((encoded["input_ids"] == model.config.image_token_id).sum()) == model.config.image_seq_length
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])
    assert prompt.startswith("[INST] <<SYS>>") and prompt.endswith("<image>\nhi [/INST]")  # the training format


@pytest.mark.parametrize("projector_type, depth", [("linear", 1), ("mlp3x_gelu", 3)])
def test_other_projector_types_round_trip(tiny_assets, tokenizer, tmp_path, projector_type, depth):
    model = make_vlm(tiny_assets, tokenizer, projector_type).eval()
    assert isinstance(model.model.multi_modal_projector, MLPProjector) and projector_depth(projector_type) == depth
    inputs = batch(model, tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = load_vlm(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-5)


def test_projector_type_errors(tiny_assets, tokenizer):
    config = make_vlm(tiny_assets, tokenizer).config
    with pytest.raises(ConfigError, match="mm_projector_type `mlpx_relu`"):
        build_projector("mlpx_relu", config)
    assert isinstance(build_projector("identity", config), torch.nn.Identity)  # 64 == 64 in the tiny model


def test_stage1_projector_file_and_llava_bin_import(tiny_assets, tokenizer, tmp_path):
    source = make_vlm(tiny_assets, tokenizer)
    path = save_projector(source, str(tmp_path))
    assert set(load_file(path)) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    target = make_vlm(tiny_assets, tokenizer)
    torch.nn.init.zeros_(target.model.multi_modal_projector.linear_1.weight)
    load_projector(target, path)
    assert torch.equal(target.model.multi_modal_projector.linear_1.weight,
                       source.model.multi_modal_projector.linear_1.weight)
    # LLaVA's original layout: nn.Sequential(Linear, GELU, Linear) under model.mm_projector
    projector = source.model.multi_modal_projector
    llava_state = {"model.mm_projector.0.weight": projector.linear_1.weight, "model.mm_projector.0.bias": projector.linear_1.bias,
                   "model.mm_projector.2.weight": projector.linear_2.weight, "model.mm_projector.2.bias": projector.linear_2.bias}
    torch.save({k: v.detach().clone() for k, v in llava_state.items()}, tmp_path / "mm_projector.bin")
    assert torch.equal(read_projector_state(str(tmp_path / "mm_projector.bin"))["linear_2.weight"],
                       projector.linear_2.weight)
    torch.save({"model.layers.0.weight": torch.zeros(1)}, tmp_path / "bad.bin")
    with pytest.raises(ConfigError, match="not LLaVA projector keys"):
        read_projector_state(str(tmp_path / "bad.bin"))
    wrong = make_vlm(tiny_assets, tokenizer, "mlp3x_gelu")
    with pytest.raises(ConfigError, match="missing"):
        load_projector(wrong, path)


@pytest.mark.parametrize("stage, flags, trainable", [
    ("pretrain", {}, {"projector"}),
    ("finetune", {}, {"projector", "llm"}),
    ("finetune", {"freeze_backbone": True}, {"projector"}),
    ("finetune", {"tune_mm_mlp_adapter": True}, {"projector"}),
])
def test_stages_freeze_the_right_components(tiny_assets, tokenizer, stage, flags, trainable):
    model = make_vlm(tiny_assets, tokenizer)
    components = trainable_components(stage, **flags)
    assert components == trainable
    apply_stage(model, components)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    assert all(p.requires_grad == ("llm" in trainable) for p in model.model.language_model.parameters())


def test_vision_tower_loads_from_a_full_clip_checkpoint(tmp_path):
    """openai/clip-vit-large-patch14-336 is a CLIPModel checkpoint: the tower must come out of it with equal weights."""
    from transformers import CLIPConfig, CLIPModel

    from tga.model.vision import load_vision_tower, num_patches

    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, projection_dim=16)
    clip = CLIPModel(config)
    clip.save_pretrained(tmp_path)
    tower = load_vision_tower(str(tmp_path))
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(tower.state_dict()[name], tensor), name
    assert num_patches(tower.config) == 16 and num_patches(tower.config, "cls_patch") == 17


def _tiny_clip(folder) -> None:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)


def test_a_full_clip_checkpoint_loads_with_one_line_not_a_report_of_unused_keys(tmp_path, capfd, caplog):
    """The unused text side of a CLIPModel checkpoint (what the 7B recipe and the demo load) is one info line, not
    transformers' table of two dozen UNEXPECTED keys; transformers' own log level is what it was before."""
    from transformers.utils import logging as hf_logging

    from tga.model.vision import load_vision_tower

    _tiny_clip(tmp_path)
    capfd.readouterr()
    before = hf_logging.get_verbosity()
    with caplog.at_level("INFO", logger="tga.model.loading"):
        load_vision_tower(str(tmp_path))
    printed = "".join(capfd.readouterr())
    assert "UNEXPECTED" not in printed and "LOAD REPORT" not in printed
    lines = [record for record in caplog.records if record.name == "tga.model.loading"]
    assert [record.levelname for record in lines] == ["INFO"]
    assert "text tower and projections" in lines[0].getMessage() and str(tmp_path) in lines[0].getMessage()
    assert hf_logging.get_verbosity() == before


def test_building_a_vlm_says_the_embeddings_grew_in_one_line_not_transformers_notices(tiny_assets, tokenizer, capfd,
                                                                                       caplog):
    from transformers.utils.logging import warning_once

    warning_once.cache_clear()  # transformers' resize notices are once per process: let them come if not held back
    capfd.readouterr()
    with caplog.at_level("INFO", logger="tga.model.loading"):
        model = make_vlm(tiny_assets, tokenizer)
    printed = "".join(capfd.readouterr())
    assert "multivariate normal" not in printed and "LOAD REPORT" not in printed
    lines = [record.getMessage() for record in caplog.records if "embeddings resized" in record.getMessage()]
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(lines) == 1 and f"to {rows} rows for the tokenizer's {len(tokenizer)} tokens" in lines[0]


def test_a_weight_missing_from_the_tower_checkpoint_is_still_a_warning(tmp_path, caplog):
    from safetensors.torch import save_file

    from tga.model.vision import load_vision_tower

    _tiny_clip(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["vision_model.post_layernorm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("INFO", logger="tga.model.loading"):
        load_vision_tower(str(tmp_path))
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "1 weights missing from the checkpoint" in warnings[0]
    assert "post_layernorm.weight" in warnings[0]


def test_a_tower_weight_of_another_shape_is_an_error_naming_it(tmp_path):
    from safetensors.torch import save_file

    from tga.model.vision import load_vision_tower

    _tiny_clip(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["vision_model.post_layernorm.weight"] = torch.ones(31)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"--vision_tower .*1 weights of another shape than the vision tower's: .*post_layernorm\.weight \(31,\)"):
        load_vision_tower(str(tmp_path))
