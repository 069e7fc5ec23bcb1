"""tga/export.py

`tga export SOURCE OUT --format hf-llava`: a folder that `transformers.LlavaForConditionalGeneration` and
`AutoProcessor` load with no project code (weights as safetensors, tokenizer and processor with the training chat
template). SOURCE is a stage-2 output folder, a stage-1 folder saved with `--save_full_model`, or a DeepSpeed
checkpoint folder (`checkpoint-N` holding `global_stepN/` ZeRO shards), whose shards are consolidated with
DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`. Checkpoints of a LoRA run (`--lora_enable`) hold the
adapters unmerged; they are merged here (alpha from the run's tga_config.json), so the export is always a plain model.
`--layout transformers4` rewrites the folder for transformers 4.x (tga/export_transformers4.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from transformers import AutoConfig, LlavaForConditionalGeneration

from tga.data.chat_templates import chat_template
from tga.errors import ConfigError
from tga.export_layouts import LAYOUTS
from tga.export_transformers4 import MODEL_INPUT_NAMES, convert_to_transformers4, read_json, write_json
from tga.model.lora import has_lora_keys, merge_lora_checkpoint_state
from tga.model.processor import build_processor
from tga.model.projector import DEFAULT_PROJECTOR, build_projector
from tga.model.tokenizer import load_tokenizer
from tga.model.vision import folder_aspect_ratio, load_image_processor, run_settings
from tga.model.vlm import is_vlm_checkpoint, load_vlm, weight_files


def is_deepspeed_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "latest"))


def has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in ("model.safetensors", "model.safetensors.index.json"))


def image_processor_for(path: str):
    """The image processor to save with an export of `path`: its own (or its run's vision tower's), padding as its
    training did (an older folder's CLIPImageProcessor is replaced by the padding one its run used)."""
    aspect_ratio = folder_aspect_ratio(path)
    if os.path.exists(os.path.join(path, "preprocessor_config.json")) or os.path.exists(
            os.path.join(path, "processor_config.json")):
        try:
            return load_image_processor(path, aspect_ratio)
        except (OSError, ValueError):
            pass
    tower = run_settings(path).get("ModelArguments", {}).get("vision_tower")
    if tower is None:
        raise ConfigError(f"{path}: no image processor and no tga_config.json naming the vision tower")
    return load_image_processor(tower, aspect_ratio)


def pin_model_input_names(folder: str) -> None:
    """The saved tokenizer returns only what Llava takes (input_ids, attention_mask). transformers 5's default, written
    out so that a base tokenizer whose config names token_type_ids (which `generate` rejects as unused) cannot carry
    them into the export; the transformers 4 layout needs it in any case (tga/export_transformers4.py)."""
    config_file = os.path.join(folder, "tokenizer_config.json")
    write_json(config_file, {**read_json(config_file), "model_input_names": list(MODEL_INPUT_NAMES)})


def model_from_deepspeed_checkpoint(path: str) -> LlavaForConditionalGeneration:
    """Consolidate ZeRO shards into a Llava model built from the checkpoint's config."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = AutoConfig.from_pretrained(path)
    state = merge_lora_checkpoint_state(get_fp32_state_dict_from_zero_checkpoint(path), path)
    model = LlavaForConditionalGeneration(config)
    projector_type = getattr(config, "mm_projector_type", DEFAULT_PROJECTOR)
    if projector_type != DEFAULT_PROJECTOR:
        model.model.multi_modal_projector = build_projector(projector_type, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [key for key in missing if key not in buffers]
    if missing or unexpected:
        raise ConfigError(f"{path}: checkpoint does not match its config: missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")
    return model


def folder_has_lora(path: str) -> bool:
    """True for a model folder whose weights hold unmerged LoRA tensors (a Trainer checkpoint of a LoRA run)."""
    from safetensors import safe_open

    for name in weight_files(path):
        with safe_open(os.path.join(path, name), framework="pt") as handle:
            if has_lora_keys(dict.fromkeys(handle.keys())):
                return True
    return False


def load_merged_lora_folder(path: str) -> LlavaForConditionalGeneration:
    """A model folder with unmerged LoRA tensors, merged (in the file's key layout) and loaded as a plain VLM."""
    from safetensors.torch import load_file, save_file

    state = {}
    for name in weight_files(path):
        state.update(load_file(os.path.join(path, name)))
    merged = merge_lora_checkpoint_state(state, path)
    folder = tempfile.mkdtemp(prefix="tga-export-")
    try:
        shutil.copy(os.path.join(path, "config.json"), folder)
        save_file(merged, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return load_vlm(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def export_hf_llava(source: str, out_dir: str, layout: str = "transformers5") -> str:
    """Write an HF-native Llava folder for `source` in the layout of `layout`'s transformers; returns `out_dir`."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout `{layout}` must be one of {list(LAYOUTS)}")
    if not os.path.isdir(source):
        raise ConfigError(f"export source not found: {source}")
    if has_weights(source) and is_vlm_checkpoint(source):
        model = load_merged_lora_folder(source) if folder_has_lora(source) else load_vlm(source)
    elif is_deepspeed_checkpoint(source):
        model = model_from_deepspeed_checkpoint(source)
    else:
        raise ConfigError(f"{source}: neither a saved VLM folder nor a DeepSpeed checkpoint folder (no `latest` file); "
                          "stage-1 folders need --save_full_model true")
    if getattr(model.config, "mm_projector_type", DEFAULT_PROJECTOR) != DEFAULT_PROJECTOR:
        raise ConfigError(f"{source}: projector type `{model.config.mm_projector_type}` is not part of HF Llava; "
                          "only mlp2x_gelu exports to hf-llava (load other types with tga.model.vlm.load_vlm)")
    tokenizer = load_tokenizer(source)
    tokenizer.chat_template = chat_template(getattr(model.config, "tga_template", None) or "llava_llama_2")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    build_processor(model, tokenizer, image_processor_for(source)).save_pretrained(out_dir)
    pin_model_input_names(out_dir)
    if layout == "transformers4":
        convert_to_transformers4(out_dir)
    return out_dir
