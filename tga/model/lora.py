"""tga/model/lora.py

LoRA on the LLM of a Llava model, shared by stage 2 (`--lora_enable`) and `tga unlearn`.

Adapters go on the LLM's linear layers only (a regex over `language_model.*.{q_proj,...}`): never the vision tower,
the projector or `lm_head`. Two ways to attach them:
- `add_lora(model, ...)`: peft's `get_peft_model` wrapper (unlearning uses `disable_adapter()` as its reference);
- `add_lora(model, ..., wrap=False)`: the same LoRA layers injected in place (`inject_adapter_in_model`), so the
  model stays a `LlavaForConditionalGeneration`: the TGA trainer reaches `model.model.language_model` unchanged and
  Trainer checkpoints hold the whole model (projector included), so they resume and export like full runs.

Merging is tensor arithmetic on a state dict, `W + scaling * B @ A`, so it works on the ZeRO-3 consolidated state
dict, on ZeRO shards (`tga export` of a checkpoint) and on a plain in-memory model alike.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from tga.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ADAPTER_DIR = "lora_adapter"
NON_LORA_FILE = "non_lora_trainables.safetensors"
BIASES = ("none", "all", "lora_only")
_SUFFIX_A, _SUFFIX_B, _BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer."


def target_names(targets: str) -> list[str]:
    names = [name.strip() for name in targets.split(",") if name.strip()]
    if not names:
        raise ConfigError("--lora_target: no module names (expected e.g. q_proj,k_proj,v_proj,o_proj)")
    return names


def lora_config(*, r: int, alpha: float, dropout: float, targets: str = DEFAULT_TARGETS, bias: str = "none"):
    """A peft LoraConfig whose targets are the named linear layers inside the language model only."""
    from peft import LoraConfig

    if r <= 0:
        raise ConfigError(f"--lora_r must be > 0, got {r}")
    if bias not in BIASES:
        raise ConfigError(f"--lora_bias `{bias}` must be one of {BIASES}")
    names = "|".join(target_names(targets))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias,
                      target_modules=rf".*language_model\..*\.({names})")


def add_lora(model, *, r: int, alpha: float, dropout: float, targets: str = DEFAULT_TARGETS, bias: str = "none",
             wrap: bool = True):
    """LoRA adapters on the LLM's linear layers. `wrap=True` returns a peft `PeftModel`; `wrap=False` injects the
    adapters into `model` itself and returns it. peft freezes every non-LoRA parameter either way (the caller then
    sets what else trains, see tga/train/stages.py)."""
    config = lora_config(r=r, alpha=alpha, dropout=dropout, targets=targets, bias=bias)
    if wrap:
        from peft import get_peft_model

        return get_peft_model(model, config)
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(config, model)
    if not any(is_lora_key(name) for name, _ in model.named_parameters()):
        raise ConfigError(f"--lora_target {targets}: no linear layer of the language model has these names")
    return model


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name or ".lora_magnitude" in name


def lora_scalings(model) -> dict[str, float]:
    """`{module name: alpha / r}` of every LoRA layer in the model (the names its state dict keys start with)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): float(module.scaling["default"])
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def has_lora_keys(state: dict) -> bool:
    return any(key.endswith(_SUFFIX_A) for key in state)


def merge_lora_state(state: dict[str, torch.Tensor], scaling: dict[str, float] | float) -> dict[str, torch.Tensor]:
    """A state dict with every LoRA layer merged: `{P}.weight = {P}.base_layer.weight + s * B @ A`, `{P}.bias` from
    the base layer, LoRA tensors dropped. Works in any key layout (only the suffixes are read). `scaling` is per
    layer (from `lora_scalings`) or one alpha / r for all."""
    merged = {}
    for key, tensor in state.items():
        if is_lora_key(key):
            if key.endswith(_SUFFIX_A):
                prefix = key[: -len(_SUFFIX_A)]
                base = state[f"{prefix}.base_layer.weight"]
                factor = scaling[prefix.removeprefix("base_model.model.")] if isinstance(scaling, dict) else scaling
                delta = state[f"{prefix}{_SUFFIX_B}"].float() @ tensor.float()
                merged[f"{prefix}.weight"] = (base.float() + factor * delta).to(base.dtype).contiguous()
            elif not (key.endswith(_SUFFIX_B) or key.endswith(".lora_dropout")):
                raise ConfigError(f"LoRA tensor `{key}` cannot be merged (only lora_A / lora_B of linear layers)")
        elif key.endswith(".base_layer.weight"):
            continue  # written merged above
        else:
            merged[key.replace(_BASE, ".")] = tensor
    return merged


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors under peft's `save_pretrained` names (`base_model.model.{key}`, adapter name dropped)."""
    return {"base_model.model." + key.removeprefix("base_model.model.").replace(".default.", "."): tensor.contiguous()
            for key, tensor in state.items() if is_lora_key(key)}


def save_adapter(folder: str, state: dict[str, torch.Tensor], config, non_lora: dict[str, torch.Tensor],
                 base_model: str | None = None) -> str:
    """`folder` as peft writes an adapter (adapter_model.safetensors + adapter_config.json, loadable with
    `PeftModel.from_pretrained(llava, folder)`), plus LLaVA's `non_lora_trainables` (the trained projector)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(adapter_state(state), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    config.base_model_name_or_path = base_model
    config.save_pretrained(folder)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in non_lora.items()},
              os.path.join(folder, NON_LORA_FILE), metadata={"format": "pt"})
    return folder


def lora_alpha_of_run(path: str) -> float | None:
    """`lora_alpha` from the tga_config.json of the run that wrote `path` (a run folder or its checkpoint-N)."""
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        config_file = os.path.join(folder, "tga_config.json")
        if os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as handle:
                config = json.load(handle)
            for section in ("ModelArguments", "UnlearnArguments"):
                if config.get(section, {}).get("lora_alpha") is not None:
                    return float(config[section]["lora_alpha"])
    return None


def merge_lora_checkpoint_state(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Merge the LoRA tensors of a checkpoint of `path`'s run (alpha from its tga_config.json, r from lora_A)."""
    if not has_lora_keys(state):
        return state
    alpha = lora_alpha_of_run(path)
    if alpha is None:
        raise ConfigError(f"{path}: the checkpoint holds LoRA adapters but no tga_config.json names its lora_alpha")
    ranks = {tensor.shape[0] for key, tensor in state.items() if key.endswith(_SUFFIX_A)}
    if len(ranks) != 1:
        raise ConfigError(f"{path}: LoRA layers of different ranks {sorted(ranks)}")
    logger.info("merging LoRA adapters (r=%d, alpha=%g) of %s", *ranks, alpha, path)
    return merge_lora_state(state, alpha / ranks.pop())


def save_lora_model_folder(trainer, model, tokenizer, image_processor, output_dir: str,
                           base_model: str | None = None) -> None:
    """End of a LoRA stage 2: a complete HF Llava folder with the adapters merged (loadable by
    `LlavaForConditionalGeneration.from_pretrained`, no peft), plus `lora_adapter/` (the adapter as peft saves it
    and LLaVA's non_lora_trainables). Every rank calls it: under ZeRO-3 the state dict is gathered collectively; the
    in-memory model keeps its unmerged adapters."""
    from tga.data.chat_templates import chat_template
    from tga.model.processor import build_processor
    from tga.ranks import barrier, is_main_process

    state = trainer.accelerator.get_state_dict(trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model)
    if is_main_process():
        trained = [name for name, p in model.named_parameters() if p.requires_grad and not is_lora_key(name)]
        non_lora = {name: state[name].detach().cpu() for name in trained if name in state}
        save_adapter(os.path.join(output_dir, ADAPTER_DIR), state, model.peft_config["default"], non_lora, base_model)
        merged = merge_lora_state(state, lora_scalings(model))
        model.save_pretrained(output_dir, state_dict=merged)
        tokenizer.chat_template = chat_template(getattr(model.config, "tga_template", None) or "llava_llama_2")
        tokenizer.save_pretrained(output_dir)
        build_processor(model, tokenizer, image_processor).save_pretrained(output_dir)
    barrier()
