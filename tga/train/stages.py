"""tga/train/stages.py

What each training stage trains and freezes: the only place that sets `requires_grad` on the trained model's
parameters (LoRA injection leaves only its adapters trainable before `apply_lora_stage` runs; the frozen caption target
of `tga.align.guide` and the unlearning reference are separate copies, frozen where they are made).

    pretrain  (stage 1)  projector only; vision tower and LLM frozen
    finetune  (stage 2)  LLM + projector; vision tower frozen
The LLaVA flags `--tune_mm_mlp_adapter` (projector only), `--freeze_backbone` (LLM frozen) and
`--freeze_mm_mlp_adapter` (projector frozen) refine this, as in LLaVA.
    finetune + --lora_enable   LoRA adapters of the LLM + projector; LLM base weights, lm_head and vision frozen
"""

from __future__ import annotations

import logging

from torch import nn

from tga.errors import ConfigError

logger = logging.getLogger(__name__)
STAGES = ("pretrain", "finetune")


def trainable_components(stage: str, *, tune_mm_mlp_adapter=False, freeze_backbone=False, freeze_mm_mlp_adapter=False):
    """Names of the VLM components that train in `stage` ("projector", "llm")."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage `{stage}`; expected one of {STAGES}")
    train_llm = stage == "finetune" and not (tune_mm_mlp_adapter or freeze_backbone)
    components = {"projector"} if not freeze_mm_mlp_adapter else set()
    if train_llm:
        components.add("llm")
    if not components:
        raise ConfigError("nothing to train: --freeze_mm_mlp_adapter with a frozen LLM leaves no trainable parameter")
    return components


def component_modules(model) -> dict[str, list[nn.Module]]:
    """The VLM's components as modules (a Llava model: vision tower, projector, language model + lm_head)."""
    return {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "llm": [model.model.language_model, model.lm_head],
    }


def apply_stage(model, components: set[str]) -> dict[str, int]:
    """Freeze everything but `components`; returns trainable parameter counts per component (logged)."""
    counts = {}
    for name, modules in component_modules(model).items():
        trainable = name in components
        total = 0
        for module in modules:
            for parameter in module.parameters():
                parameter.requires_grad_(trainable)
                total += parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()
        counts[name] = total if trainable else 0
        logger.info("%s %-9s %12d parameters", "[TRAINABLE]" if trainable else "[Frozen]   ", name, total)
    return counts


def apply_lora_stage(model, components: set[str]) -> dict[str, int]:
    """After LoRA injection (tga.model.lora.add_lora, which leaves only the adapters, and biases under --lora_bias,
    trainable): the vision tower frozen, the projector trainable if it is in `components`, the LLM base frozen."""
    from tga.model.lora import is_lora_key

    counts = {}
    for name, modules in component_modules(model).items():
        total = 0
        for module in modules:
            for key, parameter in module.named_parameters():
                if name != "llm":
                    parameter.requires_grad_(name in components)
                elif is_lora_key(key):
                    parameter.requires_grad_(True)
                if parameter.requires_grad:
                    total += parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()
        counts[name] = total
        logger.info("%s %-9s %12d parameters%s", "[TRAINABLE]" if total else "[Frozen]   ", name, total,
                    " (LoRA adapters)" if name == "llm" else "")
    return counts
