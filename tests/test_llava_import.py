"""Import of an original LLaVA checkpoint: logits equal a reference that splices projected patches at the image
position of the original LLM, for Mistral- and Llama-based checkpoints."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    MistralForCausalLM,
)

from tga.errors import ConfigError
from tga.model.llava_import import import_llava, import_llava_folder
from tga.tiny import mistral_tokenizer_file


def write_llava_checkpoint(folder, vision_dir, kind):
    torch.manual_seed(1)
    if kind == "llava_mistral":
        llm = MistralForCausalLM.from_pretrained(os.path.join(os.path.dirname(vision_dir), "llm"))
    else:
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2))
    projector = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    os.makedirs(folder)
    save_file(state, os.path.join(folder, "model.safetensors"))
    config = {**llm.config.to_dict(), "model_type": kind, "mm_vision_tower": vision_dir, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 64}
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle)
    shutil.copy(mistral_tokenizer_file(), os.path.join(folder, "tokenizer.model"))
    return llm, projector


@pytest.mark.parametrize("kind", ["llava_mistral", "llava_llama"])
def test_imported_logits_match_llava_splicing(tiny_assets, tmp_path, kind):
    llm, projector = write_llava_checkpoint(str(tmp_path / "llava"), tiny_assets["vision"], kind)
    model, tokenizer, _ = import_llava(str(tmp_path / "llava"))
    model.eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    before, after = torch.tensor([[1, 733, 16289, 28793]]), torch.tensor([[13, 3195, 349, 456]])
    n = model.config.image_seq_length
    ids = torch.cat([before, torch.full((1, n), model.config.image_token_id), after], dim=1)
    with torch.no_grad():
        imported = model(input_ids=ids, pixel_values=pixel_values).logits
        # Reference, LLaVA's way: CLIP layer -2 without CLS -> projector -> spliced between the text embeddings.
        vision = CLIPVisionModel.from_pretrained(tiny_assets["vision"])
        features = projector(vision(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:])
        embeds = torch.cat([llm.get_input_embeddings()(before), features, llm.get_input_embeddings()(after)], dim=1)
        reference = llm(inputs_embeds=embeds).logits
    assert torch.allclose(imported[..., :32000], reference, atol=1e-5)
    expected_template = "mistral_instruct" if kind == "llava_mistral" else "vicuna_v1"
    assert model.config.tga_template == expected_template


def test_import_folder_loads_with_plain_transformers_and_bad_keys_are_listed(tiny_assets, tmp_path):
    write_llava_checkpoint(str(tmp_path / "llava"), tiny_assets["vision"], "llava_mistral")
    out = import_llava_folder(str(tmp_path / "llava"), str(tmp_path / "hf"))
    assert isinstance(LlavaForConditionalGeneration.from_pretrained(out), LlavaForConditionalGeneration)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "llava" / "model.safetensors"))
    state["model.extra_module.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "llava" / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.extra_module.weight"):
        import_llava(str(tmp_path / "llava"))


@pytest.mark.parametrize("aspect_ratio", ["pad", None, "anyres"])
def test_import_saves_the_processor_of_the_checkpoints_aspect_ratio(tiny_assets, tmp_path, aspect_ratio):
    from PIL import Image
    from transformers import AutoProcessor

    from tga.data.dataset import pad_to_square

    source = str(tmp_path / "llava")
    write_llava_checkpoint(source, tiny_assets["vision"], "llava_mistral")
    with open(os.path.join(source, "config.json")) as handle:
        config = json.load(handle)
    if aspect_ratio is not None:
        config["image_aspect_ratio"] = aspect_ratio
    with open(os.path.join(source, "config.json"), "w") as handle:
        json.dump(config, handle)
    if aspect_ratio == "anyres":
        with pytest.raises(ConfigError, match="anyres"):
            import_llava(source)
        return
    processor = AutoProcessor.from_pretrained(import_llava_folder(source, str(tmp_path / "hf"))).image_processor
    image = Image.effect_noise((40, 18), 60).convert("RGB")
    tower = AutoProcessor.from_pretrained(tiny_assets["vision"])  # the tower's CLIP processor: resize + centre crop
    # LLaVA-1.5 (`pad`) pads with the mean colour before the tower's processor; without the field it does not pad
    reference = pad_to_square(image, tuple(int(255 * c) for c in tower.image_mean)) if aspect_ratio == "pad" else image
    expected = tower(images=reference, return_tensors="pt")["pixel_values"]
    assert torch.equal(processor(images=image, return_tensors="pt")["pixel_values"], expected)
