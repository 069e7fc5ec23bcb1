"""tga/model/vlm.py

The VLM is a stock `transformers.LlavaForConditionalGeneration`: CLIP vision tower + projector + causal LM. All TGA
logic lives outside it (tga/align, tga/train), so saved folders are HF-native and load with plain transformers,
vLLM and lmms-eval.

`build_vlm` assembles one from pretrained parts without ever materialising a random copy of the LLM: a Llava shell
built around minimal sub-configs receives the pretrained LLM (loaded with `from_pretrained`,
which also partitions it under DeepSpeed ZeRO-3), the pretrained vision tower and a fresh projector.
`load_vlm` reloads a saved folder, restoring a non-default projector type from `mm_projector_type` in its config.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
)

from tga.errors import ConfigError
from tga.model.loading import load_pretrained, no_progress_bars, resize_embeddings
from tga.model.projector import DEFAULT_PROJECTOR, build_projector
from tga.model.vision import SELECT_STRATEGY, load_vision_tower, num_patches

# transformers 5 writes Llava in the llava-hf layout (`multi_modal_projector.*`); in memory it is `model.*`.
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


def is_vlm_checkpoint(path: str) -> bool:
    """True when `path` is a saved Llava model folder (as opposed to a plain LLM)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as handle:
        return json.load(handle).get("model_type") == "llava"


def llm_depth(path: str) -> int:
    """Decoder layers of the LLM at `path`, or of the LLM inside a saved VLM folder, read from its config alone."""
    config = AutoConfig.from_pretrained(path)
    return getattr(config, "text_config", config).num_hidden_layers


def build_vlm(
    llm_path: str,
    vision_tower: str,
    tokenizer,
    *,
    projector_type: str = DEFAULT_PROJECTOR,
    select_layer: int = -2,
    select_feature: str = "patch",
    template: str = "llava_llama_2",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> LlavaForConditionalGeneration:
    """A VLM from a pretrained causal LM and a pretrained CLIP vision tower, with a freshly initialised projector."""
    llm_kwargs = {"dtype": dtype}
    if attn_implementation:
        llm_kwargs["attn_implementation"] = attn_implementation
    llm = load_pretrained(AutoModelForCausalLM, llm_path, what="LLM", flag="--model_name_or_path", **llm_kwargs)
    vision = load_vision_tower(vision_tower, dtype=dtype)
    return assemble_vlm(llm, vision, tokenizer, projector_type=projector_type, select_layer=select_layer,
                        select_feature=select_feature, template=template, dtype=dtype)


def assemble_vlm(llm, vision, tokenizer, *, projector_type: str = DEFAULT_PROJECTOR, select_layer: int = -2,
                 select_feature: str = "patch", template: str = "llava_llama_2",
                 dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """Put a loaded causal LM and vision tower into a Llava model with a fresh projector.

    The LLM's embeddings are resized to the tokenizer (which has `<image>` and a pad token added), padded to a
    multiple of 64 like the llava-hf checkpoints.
    """
    resize_embeddings(llm, len(tokenizer), pad_to_multiple_of=64)
    if select_feature not in SELECT_STRATEGY:
        raise ConfigError(f"--mm_vision_select_feature `{select_feature}` must be one of {sorted(SELECT_STRATEGY)}")
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=select_layer,
        vision_feature_select_strategy=SELECT_STRATEGY[select_feature],
        image_seq_length=num_patches(vision.config, select_feature),
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id,
        mm_projector_type=projector_type,
        tga_template=template,
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    model = llava_shell(config)
    model.model.vision_tower = vision
    model.model.language_model = llm.get_decoder()
    model.lm_head = llm.get_output_embeddings()
    model.model.multi_modal_projector = build_projector(projector_type, config).to(dtype)
    model.generation_config = llm.generation_config
    leftovers = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftovers:
        raise RuntimeError(f"VLM assembly left parameters on the meta device: {leftovers[:5]}")
    return model


def llava_shell(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """A Llava model object to receive pretrained modules, built without materialising a random LLM.

    transformers builds Llava's vision tower and LM from the config (under ZeRO-3 through zero.Init, which cannot
    run on the meta device), so the shell is built around minimal sub-configs; `build_vlm` then replaces every
    submodule and installs the real config.
    """
    minimal = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                                       image_size=8, patch_size=8),
        text_config=MistralConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1),
    )
    shell = LlavaForConditionalGeneration(minimal)
    shell.config = shell.model.config = config
    return shell


def weight_files(path: str) -> list[str]:
    """The safetensors files of a saved model folder: the shards its index names, or the single file."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file, encoding="utf-8") as handle:
            return sorted(set(json.load(handle)["weight_map"].values()))
    return ["model.safetensors"]


def projector_state_from_folder(path: str) -> dict[str, torch.Tensor]:
    """The projector tensors of a saved model folder (single or sharded safetensors), keys relative to the projector."""
    state = {}
    for name in weight_files(path):
        with safe_open(os.path.join(path, name), framework="pt") as handle:
            for key in handle.keys():
                prefix = next((p for p in PROJECTOR_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    state[key[len(prefix) :]] = handle.get_tensor(key)
    return state


def load_vlm(
    path: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> LlavaForConditionalGeneration:
    """Reload a saved VLM folder (any projector type)."""
    if not is_vlm_checkpoint(path):
        raise ConfigError(f"`{path}` is not a saved VLM folder (no config.json with model_type 'llava')")
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    config = AutoConfig.from_pretrained(path)
    projector_type = getattr(config, "mm_projector_type", DEFAULT_PROJECTOR)
    with no_progress_bars():  # the load report, if any, still shows
        model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    # transformers 5 records the key renamings it applied while loading, and save_pretrained reverses them. Under
    # ZeRO-3 the record also holds legacy renamings (`^language_model.model.model` -> ...), whose reverse writes
    # `language_model.model.model.*` and `vision_tower.vision_model.*`. Without a record, saving uses the class's
    # own mapping, as it does for a model assembled by `build_vlm`: every saved folder has one layout.
    model._weight_conversions = None
    if projector_type != DEFAULT_PROJECTOR:
        # transformers builds its 2-layer projector; swap in the saved type and load its weights.
        projector = build_projector(projector_type, config).to(dtype)
        projector.load_state_dict(projector_state_from_folder(path))
        model.model.multi_modal_projector = projector
    return model
