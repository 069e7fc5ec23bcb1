"""tga/model/llava_import.py

Import of an original LLaVA checkpoint folder (`LlavaMistralForCausalLM` / `LlavaLlamaForCausalLM` key layout: the LLM
under `model.*` + `lm_head`, the projector under `model.mm_projector.{0,2}`, the CLIP tower named by `mm_vision_tower`)
into the HF Llava layout. LLaVA marks the image position with the id -200 and splices the projected patches there; the
HF layout repeats an `<image>` token once per patch, so the token sequences the LLM sees are the same.

    tga import-llava SRC OUT [--vision_tower PATH] [--version TEMPLATE]
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from tga.errors import ConfigError
from tga.model.processor import build_processor
from tga.model.projector import llava_projector_state
from tga.model.tokenizer import load_tokenizer
from tga.model.vision import load_image_processor, load_vision_tower
from tga.model.vlm import assemble_vlm

TEXT_CONFIGS = {"llava_mistral": (MistralConfig, "mistral_instruct"), "llava_llama": (LlamaConfig, "vicuna_v1"),
                "llava": (LlamaConfig, "vicuna_v1")}
_FEATURE = {"patch": "patch", "cls_patch": "cls_patch"}
# LLaVA's `image_aspect_ratio`: `pad` pads to a square; anything else it does not know (or none) is the processor's
# own resize and centre crop. `anyres` (LLaVA-NeXT tiling) has no equivalent in the fixed-size HF Llava.
_ASPECT = {"pad": "pad", None: "resize", "resize": "resize", "square": "resize"}


def read_state(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (safetensors shards, or .bin shards read with weights_only=True)."""
    state = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        state.update(load_file(path))
    if not state:
        for path in sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin"))):
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    if not state:
        raise ConfigError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    return state


def import_llava(source: str, *, vision_tower: str | None = None, template: str | None = None):
    """The HF Llava model, tokenizer and image processor (padding as the checkpoint's `image_aspect_ratio` says) of an
    original LLaVA checkpoint folder."""
    with open(os.path.join(source, "config.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    if raw.get("model_type") not in TEXT_CONFIGS:
        raise ConfigError(f"{source}: model_type {raw.get('model_type')!r} is not an original LLaVA checkpoint "
                          f"({sorted(TEXT_CONFIGS)})")
    config_class, default_template = TEXT_CONFIGS[raw["model_type"]]
    known = set(config_class().to_dict())
    text_config = config_class(**{k: v for k, v in raw.items() if k in known and k not in ("model_type", "architectures")})
    if raw.get("image_aspect_ratio") not in _ASPECT:
        raise ConfigError(f"{source}: image_aspect_ratio {raw['image_aspect_ratio']!r} is not supported "
                          f"(pad, resize or none); LLaVA-NeXT `anyres` checkpoints do not import")
    vision_tower = vision_tower or raw.get("mm_vision_tower")
    if not vision_tower:
        raise ConfigError(f"{source}: no mm_vision_tower in config.json; pass --vision_tower")
    state = read_state(source)
    projector_state, llm_keys = llava_projector_state({k: v for k, v in state.items() if "mm_projector" in k})
    llm_state = {k: v for k, v in state.items() if "mm_projector" not in k and "vision_tower" not in k}
    llm = AutoModelForCausalLM.from_config(text_config)
    missing, unexpected = llm.load_state_dict(llm_state, strict=False)
    missing = [k for k in missing if k not in {name for name, _ in llm.named_buffers()}]
    if missing or unexpected or llm_keys:
        raise ConfigError(f"{source}: weights do not fit a {config_class.__name__}: missing {missing[:8]}, "
                          f"unexpected {(unexpected + llm_keys)[:8]}")
    tokenizer = load_tokenizer(source)
    feature = raw.get("mm_vision_select_feature", "patch")
    model = assemble_vlm(llm, load_vision_tower(vision_tower), tokenizer,
                         projector_type=raw.get("mm_projector_type", "mlp2x_gelu"),
                         select_layer=raw.get("mm_vision_select_layer", -2), select_feature=_FEATURE.get(feature, feature),
                         template=template or default_template)
    expected = set(model.model.multi_modal_projector.state_dict())
    if set(projector_state) != expected:
        raise ConfigError(f"{source}: projector keys {sorted(projector_state)} do not match {sorted(expected)}")
    model.model.multi_modal_projector.load_state_dict(projector_state)
    return model, tokenizer, load_image_processor(vision_tower, _ASPECT[raw.get("image_aspect_ratio")])


def import_llava_folder(source: str, out_dir: str, **kwargs) -> str:
    """Convert and save as an HF Llava folder (tokenizer, processor and chat template included)."""
    from tga.data.chat_templates import chat_template

    model, tokenizer, image_processor = import_llava(source, **kwargs)
    tokenizer.chat_template = chat_template(model.config.tga_template)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    build_processor(model, tokenizer, image_processor).save_pretrained(out_dir)
    return out_dir
