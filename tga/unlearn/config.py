"""tga/unlearn/config.py

Options of `tga unlearn` / `scripts/unlearn.py`: `UnlearnArguments` plus the project's `TrainingArguments`, from a
YAML file and flags (later ones win), with the unlearning defaults of Yao et al. (lr 2e-6, batch 2, at most 1000
steps) placed first so that the YAML and the flags override them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tga.config import TrainingArguments, check_precision, flag_value, is_true, option, zero_stage
from tga.errors import ConfigError
from tga.options import config_argv, parse_dataclasses

# Yao et al.'s defaults, overridable; saving only at the end, the folder is a full model.
DEFAULT_FLAGS = [
    "--learning_rate", "2e-6", "--per_device_train_batch_size", "2", "--max_steps", "1000",
    "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--weight_decay", "0.0", "--save_strategy", "no",
    "--logging_steps", "10", "--output_dir", "runs/unlearn", "--report_to", "none", "--model_max_length", "1024",
    # The trainer counts its three groups' tokens itself (HF's counter only sees `input_ids`).
    "--include_num_input_tokens_seen", "no",
]


@dataclass
class UnlearnArguments:
    # fmt: off
    model: str | None = option(None, "Saved VLM folder: the model to unlearn (required).")
    harmful: str | None = option(None, "Harmful pairs: PKU-SafeRLHF, prompt/response JSON/JSONL, or LLaVA records (required).")
    normal: str | None = option(None, "Normal pairs: prompt/response or TruthfulQA, JSON/JSONL/CSV (required).")
    refusal: str | None = option(None, "Refusals for the mismatch term (default: the normal responses).")
    image_folder: str | None = option(None, "Images of LLaVA harmful records (multimodal unlearning).")
    image_aspect_ratio: str = option("pad", "pad: pad to a square with the mean colour; resize: the processor's resize and crop.", choices=["pad", "resize"])
    w_fgt: float = option(0.5, "Weight of L_forget (gradient ascent on harmful responses), >= 0.")
    w_rdn: float = option(1.0, "Weight of L_mismatch (random benign or refusal responses), >= 0.")
    w_nor: float = option(1.0, "Weight of L_keep (KL to the frozen model on normal data), >= 0.")
    forget_ceiling: float = option(100.0, "Stop once the harmful-response NLL exceeds this (<= 0: never).")
    reference: str = option("auto", "Frozen reference: auto (adapter under LoRA, else copy), a second model, or the LoRA-disabled base.", choices=["auto", "copy", "adapter"])
    lora_enable: bool = option(False, "Train LoRA adapters on the LLM instead of all its weights.")
    lora_r: int = option(8, "LoRA rank.")
    lora_alpha: int = option(16, "LoRA scaling numerator (scaling = alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_target_modules: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "LLM linear layers to adapt, comma-separated.")
    # fmt: on

    def reference_kind(self) -> str:
        """`copy` or `adapter`: auto means the adapter-disabled base under LoRA, else a second model."""
        return ("adapter" if self.lora_enable else "copy") if self.reference == "auto" else self.reference


def parse_unlearn_config(argv: list[str]) -> tuple[UnlearnArguments, TrainingArguments]:
    """Parse defaults + YAML + flags and check them.

    Args:
        argv: command-line tokens (an optional YAML path anywhere, then flags).

    Returns:
        The unlearning options and the training arguments.
    """
    flags = DEFAULT_FLAGS + config_argv(argv)
    check_precision(is_true(flag_value(flags, "bf16")), is_true(flag_value(flags, "fp16")), flag_value(flags, "deepspeed"))
    unlearn_args, training_args = parse_dataclasses((UnlearnArguments, TrainingArguments), argv, DEFAULT_FLAGS)
    check_unlearn_args(unlearn_args, training_args)
    return unlearn_args, training_args


def check_unlearn_args(args: UnlearnArguments, training_args: TrainingArguments) -> None:
    for name in ("model", "harmful", "normal"):
        if getattr(args, name) is None:
            raise ConfigError(f"--{name} is required")
    for name in ("harmful", "normal", "refusal"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"--{name}: file not found: {path}")
    if args.reference_kind() == "adapter" and not args.lora_enable:
        raise ConfigError("--reference adapter needs --lora_enable true (the reference is the adapter-disabled base)")
    for name in ("w_fgt", "w_rdn", "w_nor"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0")
    if args.lora_enable and training_args.deepspeed and zero_stage(training_args) == 3:
        raise ConfigError("--lora_enable with ZeRO-3 is not supported by `tga unlearn`; use deepspeed_configs/zero2.json")

