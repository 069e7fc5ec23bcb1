"""tga/unlearn/config.py

Options of `tga unlearn` / `scripts/unlearn.py`: `UnlearnArguments` plus the project's `TrainingArguments`, from a
YAML file and flags (later ones win), with the unlearning defaults of Yao et al. (lr 2e-6, batch 2, at most 1000
steps) placed first so that the YAML and the flags override them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from transformers import HfArgumentParser

from tga.config import TrainingArguments, check_precision, config_argv, flag_value, is_true, zero_stage
from tga.errors import ConfigError

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
    model: str | None = None                            # saved VLM folder (the model to unlearn)
    harmful: str | None = None                          # harmful pairs: PKU-SafeRLHF, prompt/response, or LLaVA JSON
    normal: str | None = None                           # normal pairs: prompt/response or TruthfulQA (JSON/JSONL/CSV)
    refusal: str | None = None                          # refusals for the mismatch term (default: normal responses)
    image_folder: str | None = None                     # images of LLaVA harmful records (multimodal unlearning)
    image_aspect_ratio: str = "pad"                     # pad | resize, as in training
    w_fgt: float = 0.5                                  # weight of L_forget (gradient ascent on harmful responses)
    w_rdn: float = 1.0                                  # weight of L_mismatch (random benign / refusal responses)
    w_nor: float = 1.0                                  # weight of L_keep (KL to the frozen model on normal data)
    forget_ceiling: float = 100.0                       # stop once the harmful-response NLL exceeds this (<=0: never)
    reference: str = "auto"                             # auto | copy (second model) | adapter (LoRA disabled)
    lora_enable: bool = False                           # train LoRA adapters on the LLM instead of all its weights
    lora_r: int = 8                                     # LoRA rank
    lora_alpha: int = 16                                # LoRA scaling numerator
    lora_dropout: float = 0.05                          # LoRA dropout
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # LLM linear layers
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
    argv = DEFAULT_FLAGS + config_argv(argv)
    check_precision(is_true(flag_value(argv, "bf16")), is_true(flag_value(argv, "fp16")), flag_value(argv, "deepspeed"))
    parser = HfArgumentParser((UnlearnArguments, TrainingArguments))
    try:
        unlearn_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except SystemExit as error:
        raise ConfigError(f"invalid command line: {' '.join(argv)}") from error
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
    if args.reference not in ("auto", "copy", "adapter"):
        raise ConfigError(f"--reference `{args.reference}` must be auto, copy or adapter")
    if args.reference_kind() == "adapter" and not args.lora_enable:
        raise ConfigError("--reference adapter needs --lora_enable true (the reference is the adapter-disabled base)")
    if args.image_aspect_ratio not in ("pad", "resize"):
        raise ConfigError(f"--image_aspect_ratio `{args.image_aspect_ratio}` must be pad or resize")
    for name in ("w_fgt", "w_rdn", "w_nor"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0")
    if args.lora_enable and training_args.deepspeed and zero_stage(training_args) == 3:
        raise ConfigError("--lora_enable with ZeRO-3 is not supported by `tga unlearn`; use deepspeed_configs/zero2.json")

