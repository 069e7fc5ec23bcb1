"""tga/export_transformers4.py

`tga export --layout transformers4`: rewrites an exported folder (transformers 5 layout) into the layout transformers
4.x loads, the one of the llava-hf checkpoints. transformers 4 would load the 5 layout without an error but wrongly:
it re-initialises every vision-tower weight (it expects `vision_tower.vision_model.*`) and takes the rope base from
`rope_theta` (falling back to 10,000). Changed here:

- weights: `vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`,
  `multi_modal_projector.*` (4.x's Llava holds a `CLIPVisionModel` and a `*ForCausalLM`), shard by shard;
- config.json: `rope_theta` / `rope_scaling` in the text config instead of `rope_parameters`, `torch_dtype` beside
  `dtype`, `image_token_index`;
- tokenizer: `tokenizer_class` `PreTrainedTokenizerFast` (it runs tokenizer.json as it is; 4.x has no
  `TokenizersBackend`), `additional_special_tokens` instead of 5.x's `extra_special_tokens` list, the chat template
  inside tokenizer_config.json;
- tokenizer inputs: `model_input_names` = input_ids, attention_mask. 4.x's `PreTrainedTokenizerFast` otherwise returns
  `token_type_ids` too (its class default), which `LlavaForConditionalGeneration` does not take, so
  `model.generate(**processor(...))` fails with "model_kwargs are not used by the model: ['token_type_ids']";
- processor: `preprocessor_config.json` (the image processor with its `do_pad`) as `LlavaImageProcessorFast`,
  `processor_config.json` without the nested image processor, `chat_template.json` for the processor. 4.x's
  `AutoImageProcessor` loads the torchvision (fast) processor only when the saved type ends in `Fast` (or the caller
  passes `use_fast=True`); the saved `LlavaImageProcessor` would give 4.x's PIL one, which resizes differently (pixels
  up to 0.015 from training's). transformers 5's `LlavaImageProcessor` is the torchvision one training uses, and 5
  loads the `Fast` name as that class.
"""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file, save_file

from tga.errors import ConfigError

# The tokenizer outputs LlavaForConditionalGeneration takes (forward and generate), written into the tokenizer config.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
# 4.x's name of the torchvision image processor, the one that computes the training pixels (transformers 5's
# LlavaImageProcessor); 4.x's `LlavaImageProcessor` is its PIL/numpy one.
IMAGE_PROCESSOR_TYPE = "LlavaImageProcessorFast"

# transformers 5 names (in memory or as saved) -> the 4.x checkpoint names, first match wins.
KEY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("language_model.", "language_model.model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


def transformers4_key(key: str) -> str:
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    raise ConfigError(f"weight `{key}` is not part of a Llava model (language model, vision tower or projector)")


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def rename_weights(folder: str) -> None:
    index_file = os.path.join(folder, "model.safetensors.index.json")
    index = read_json(index_file) if os.path.exists(index_file) else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    for name in files:
        path = os.path.join(folder, name)
        save_file({transformers4_key(key): tensor for key, tensor in load_file(path).items()}, path,
                  metadata={"format": "pt"})  # 4.x refuses safetensors files without the format entry
    if index:
        index["weight_map"] = {transformers4_key(key): file for key, file in index["weight_map"].items()}
        write_json(index_file, index)


def text_config_for_transformers4(text: dict) -> dict:
    text = dict(text)
    rope = text.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        text["rope_scaling"] = scaling
    return text


def config_for_transformers4(config: dict) -> dict:
    config = dict(config)
    config["text_config"] = text_config_for_transformers4(config["text_config"])
    for part in (config, config["text_config"], config["vision_config"]):
        if "dtype" in part:
            part["torch_dtype"] = part["dtype"]
    if "image_token_index" not in config:
        config["image_token_index"] = config["image_token_id"]
    return config


def tokenizer_config_for_transformers4(tokenizer: dict, chat_template: str | None) -> dict:
    tokenizer = dict(tokenizer)
    tokenizer["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = tokenizer.pop("extra_special_tokens", None)
    if isinstance(extra, dict):  # named extra tokens (the form 4.47+ reads too)
        tokenizer["extra_special_tokens"] = extra
    elif extra:
        tokenizer["additional_special_tokens"] = sorted(set(tokenizer.get("additional_special_tokens", [])) | set(extra))
    tokenizer.pop("backend", None)
    tokenizer["model_input_names"] = list(MODEL_INPUT_NAMES)  # not 4.x's default, which adds token_type_ids
    if chat_template:
        tokenizer["chat_template"] = chat_template
    return tokenizer


def image_processor_config_for_transformers4(image_processor: dict, processor_class: str) -> dict:
    """The saved image processor as 4.x's fast (torchvision) class, so `AutoProcessor` loads it by default."""
    config = {**image_processor, "processor_class": processor_class}
    if config.get("image_processor_type") == "LlavaImageProcessor":
        config["image_processor_type"] = IMAGE_PROCESSOR_TYPE
    return config


def convert_to_transformers4(folder: str) -> str:
    """Rewrite an exported transformers 5 folder in place into the transformers 4 layout; returns `folder`."""
    rename_weights(folder)
    config_file = os.path.join(folder, "config.json")
    write_json(config_file, config_for_transformers4(read_json(config_file)))
    template_file = os.path.join(folder, "chat_template.jinja")
    chat_template = open(template_file, encoding="utf-8").read() if os.path.exists(template_file) else None
    tokenizer_file = os.path.join(folder, "tokenizer_config.json")
    write_json(tokenizer_file, tokenizer_config_for_transformers4(read_json(tokenizer_file), chat_template))
    processor_file = os.path.join(folder, "processor_config.json")
    processor = read_json(processor_file)
    image_processor = processor.pop("image_processor", None)
    if image_processor is not None:
        write_json(os.path.join(folder, "preprocessor_config.json"), image_processor_config_for_transformers4(
            image_processor, processor.get("processor_class", "LlavaProcessor")))
    write_json(processor_file, processor)
    if chat_template:
        write_json(os.path.join(folder, "chat_template.json"), {"chat_template": chat_template})
    return folder
