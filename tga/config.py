"""tga/config.py

Typed configuration: `ModelArguments`, `DataArguments`, `TGAArguments` and `TrainingArguments` (HF's, extended).

A run is configured by a YAML file plus command-line flags, later ones winning: `pretrain.py CONFIG.yaml
--learning_rate 2e-6`. Every YAML key is a flag of one of the dataclasses, and the flags of LLaVA's official scripts
are accepted under their LLaVA names. Every option has a one-line `--help` and, where it takes one of a set, its
choices (checked by the parser, for YAML values too). Unknown or abbreviated keys and flags, and a config's `base:`
chain, are handled by tga.options. Contradictions (a precision flag against the DeepSpeed config, an unsupported
LLaVA option) are `ConfigError`s raised before any model is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import transformers

from tga.align import guide_config
from tga.data.templates import ALIASES, TEMPLATES
from tga.errors import ConfigError
from tga.model.sources import check_file, check_model_source
from tga.model.vision import SELECT_STRATEGY
from tga.model.vlm import is_vlm_checkpoint
from tga.options import config_argv, parse_dataclasses


def option(default, help: str, choices: list | None = None, **kwargs):
    """A dataclass field with its one-line `--help` and, where it takes one of a set, the allowed values."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelArguments:
    # fmt: off
    model_name_or_path: str = option("mistralai/Mistral-7B-Instruct-v0.2", "The LLM (hub id or folder), or a saved VLM folder to continue from.")
    version: str = option("llava_llama_2", "Conversation template (LLaVA's --version names accepted; see docs/training.md).", choices=sorted(TEMPLATES) + sorted(ALIASES))
    vision_tower: str = option("openai/clip-vit-large-patch14-336", "CLIP checkpoint (CLIPModel or CLIPVisionModel; hub id or folder).")
    mm_projector_type: str = option("mlp2x_gelu", "Projector: linear, identity or mlp{N}x_gelu (N linear layers with GELU between).")
    mm_vision_select_layer: int = option(-2, "Vision tower hidden state fed to the projector (-2: the second to last).")
    mm_vision_select_feature: str = option("patch", "patch: patch tokens only (drop CLS); cls_patch: CLS and patches.", choices=sorted(SELECT_STRATEGY))
    pretrain_mm_mlp_adapter: str | None = option(None, "Stage-1 projector to start from (mm_projector.safetensors or LLaVA's .bin).")
    tune_mm_mlp_adapter: bool = option(False, "LLaVA flag: train only the projector (stage 1).")
    freeze_backbone: bool = option(False, "LLaVA flag: keep the LLM frozen.")
    freeze_mm_mlp_adapter: bool = option(False, "LLaVA flag: keep the projector frozen.")
    mm_use_im_start_end: bool = option(False, "LLaVA flag; only false is supported (HF Llava token layout).")
    mm_use_im_patch_token: bool = option(False, "LLaVA flag; only false is supported (HF Llava token layout).")
    attn_implementation: str | None = option(None, "Attention kernel of the LLM (default: sdpa).", choices=["sdpa", "eager", "flash_attention_2"])
    # LoRA on the LLM in stage 2 (LLaVA's flags; LLaVA keeps them in TrainingArguments, but `tga unlearn` parses
    # TrainingArguments next to its own lora_* options). docs/training.md#lora
    lora_enable: bool = option(False, "Train LoRA adapters on the LLM's linear layers instead of all LLM weights.")
    lora_r: int = option(64, "LoRA rank (> 0).")
    lora_alpha: int = option(16, "LoRA scaling numerator (scaling = alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_bias: str = option("none", "Which biases train with LoRA (peft's bias option).", choices=["none", "lora_only", "all"])
    lora_target: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "LLM linear layers to adapt, comma-separated.")
    # fmt: on


@dataclass
class DataArguments:
    # fmt: off
    data_path: str | None = option(None, "LLaVA JSON/JSONL file(s), saved dataset folders or hub datasets, comma-separated (required).")
    image_folder: str | None = option(None, "Folder the image paths of records are relative to.")
    image_aspect_ratio: str = option("pad", "pad: pad to a square with the mean colour; resize: the processor's resize and crop.", choices=["pad", "resize"])
    use_retrieved_in_prompt: bool = option(False, 'Put "Retrieved Text: {R}. " into the first user turn (TGA stage 2).')
    skip_bad_records: bool = option(False, "Skip invalid records and list them in bad_records.json instead of failing.")
    data_cache_dir: str | None = option(None, "Arrow record cache (default: HF_DATASETS_CACHE/tga_records).")
    preprocessing_num_workers: int | None = option(None, "Processes validating records in the first Arrow conversion.")
    lazy_preprocess: bool = option(True, "LLaVA flag; preprocessing is always lazy here.")
    is_multimodal: bool = option(True, "LLaVA flag; accepted for compatibility.")
    # fmt: on
    # VLGuard-style safety data mixed into stage 2 (docs/training.md#safety-data-vlguard-style)
    safety_data: str | None = option(None, "Records of images with refusals (VLGuard-style, LLaVA JSON/JSONL), mixed into the training data.")
    safety_ratio: float | None = option(None, "Share of safety records among all records of an epoch, in (0, 1); default: every safety record once.")


@dataclass
class TGAArguments:
    # fmt: off
    tga: bool = option(False, "Add the TGA guide loss to the next-token loss.")
    tga_layers: str = option("10-18", 'Hidden-state indices aligned: "10-18", "10,12,14", "all" or "auto" (needs --tga_activation_file).')
    tga_activation_file: str | None = option(None, "Activation analysis JSON (tga analyze activation) used by --tga_layers auto.")
    tga_form: str = option("paper", "Guide loss form: the paper's, the released code's, contrastive, or request (the request tokens after the image toward the same tokens after the caption; needs --tga_caption_context request).", choices=list(guide_config.FORMS))
    tga_weight: float = option(1.0, "lambda in L = L_CE + lambda * L_guide.")
    tga_schedule: str = option("none", "lambda schedule: constant, linear decay to 0, or the released form's (1-r) factors.", choices=list(guide_config.SCHEDULES))
    tga_target: str = option("live", "Caption states from the training model (no grad) or a frozen copy made at the stage start.", choices=list(guide_config.TARGETS))
    tga_temperature: float = option(0.07, "Temperature of the contrastive form.")
    tga_center: bool = option(False, "Subtract a running mean of the caption states before the cosines.")
    tga_guide_toxic: bool = option(False, "Also align records marked toxic (by default they never enter the guide loss).")
    tga_caption_context: str = option("alone", "alone: the caption is the whole user turn; request: it takes the image's place in the request.", choices=list(guide_config.CAPTION_CONTEXTS))
    tga_pair_weight: float | None = option(None, "Weight of the image-caption term (default: the form's, 1 or 1/4 for released).")
    tga_hinge_weight: float | None = option(None, "Weight of the retrieved-text hinge term (default: the form's, 1 or 1/10 for released).")
    tga_bank: str | None = option(None, "Caption-state bank folder: caption states computed once (built if missing) where the target is fixed (stage 1, --tga_target frozen).")
    tga_bank_dtype: str = option("float16", "Storage dtype of --tga_bank.", choices=list(guide_config.BANK_DTYPES))
    tga_caption_pass: str = option("auto", "Where the caption states come from: the bank (--tga_bank), a pass riding the training forward (shared: no extra ZeRO-3 gathers; llama/mistral, live target), or a separate pass; auto picks in that order.", choices=list(guide_config.CAPTION_PASSES))
    tga_center_momentum: float = option(0.99, "EMA momentum of the caption centre of --tga_center, in [0, 1).")
    # fmt: on


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    # fmt: off
    model_max_length: int = field(default=2048, metadata={"help": "Maximum sequence length (text is truncated, image tokens never)."})
    group_by_modality_length: bool = field(default=False, metadata={"help": "Batch image and text-only records separately, grouped by length."})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "Learning rate of the projector (default: learning_rate)."})
    include_num_input_tokens_seen: str = field(default="non_padding", metadata={"help": "Count trained tokens (logged as num_input_tokens_seen; tokens/s at the end)."})
    save_full_model: bool = field(default=False, metadata={"help": "Stage 1: also write the full HF model folder (to evaluate after stage 1)."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "LLaVA flag: warmup as a fraction of training (sets warmup_steps)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Kept False: the batch carries TGA spans the model does not take."})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "LLaVA flag (transformers 4 name of eval_strategy)."})
    # faults during training (docs/reliability.md)
    max_nonfinite_steps: int = field(default=0, metadata={"help": "Optimizer steps with a non-finite loss or gradient norm skipped (no update) before the run stops; 0: stop at the first."})
    save_every_minutes: float | None = field(default=None, metadata={"help": "Also save a checkpoint when this many minutes have passed since the last one (rank 0's clock; any save_strategy)."})
    allow_config_change: str | None = field(default=None, metadata={"help": "On resume, fields that define what is trained and may still differ from the checkpoint's, comma-separated (e.g. data_path,world_size)."})
    # fmt: on

    def __post_init__(self):
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio  # transformers 5 reads a float < 1 as a ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TGAArguments, TrainingArguments)


def flag_value(argv: list[str], name: str) -> str | None:
    """The last value given for `--name` in an argv list (`--name value` or `--name=value`)."""
    value = None
    for index, token in enumerate(argv):
        if token == f"--{name}":
            # A bare boolean flag (`--bf16`) is followed by another flag or nothing.
            following = argv[index + 1] if index + 1 < len(argv) else "--"
            value = "true" if following.startswith("--") else following
        elif token.startswith(f"--{name}="):
            value = token.split("=", 1)[1]
    return value


def is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1", "yes")


def parse_config(argv: list[str]) -> tuple[ModelArguments, DataArguments, TGAArguments, TrainingArguments]:
    """Parse YAML + flags into the four argument dataclasses and check them."""
    # Checked on the raw flags, before TrainingArguments (which already initialises devices and DeepSpeed state).
    flags = config_argv(argv)
    check_precision(is_true(flag_value(flags, "bf16")), is_true(flag_value(flags, "fp16")), flag_value(flags, "deepspeed"))
    model_args, data_args, tga_args, training_args = parse_dataclasses(ARGUMENT_CLASSES, argv)
    check_config(model_args, data_args)
    return model_args, data_args, tga_args, training_args


def deepspeed_precision(deepspeed: str | dict | None) -> dict[str, object]:
    """The `enabled` values of the fp16/bf16 sections of a DeepSpeed config (True, False or "auto")."""
    if not deepspeed:
        return {}
    config = deepspeed
    if isinstance(deepspeed, str):
        if not os.path.isfile(deepspeed):
            raise ConfigError(f"--deepspeed: config file not found: {deepspeed}")
        with open(deepspeed, encoding="utf-8") as handle:
            config = json.load(handle)
    return {name: config.get(name, {}).get("enabled", False) for name in ("fp16", "bf16")}


def check_precision(bf16: bool, fp16: bool, deepspeed: str | dict | None) -> None:
    if bf16 and fp16:
        raise ConfigError("--bf16 and --fp16 are both set; choose one precision")
    sections = deepspeed_precision(deepspeed)
    for name, requested in (("bf16", bf16), ("fp16", fp16)):
        enabled = sections.get(name)
        if enabled == "auto" or enabled is None:
            continue
        if bool(enabled) != requested:
            raise ConfigError(
                f"--{name} {str(requested).lower()} contradicts the DeepSpeed config {deepspeed}, whose {name}.enabled "
                f"is {str(enabled).lower()}; use a matching config (deepspeed_configs/zero3_fp32.json for float32, "
                "zero3.json for bf16) or set the flag to match"
            )


def check_config(model_args, data_args) -> None:
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise ConfigError("--mm_use_im_start_end / --mm_use_im_patch_token are not supported (HF Llava token layout)")
    if data_args.data_path is None:
        raise ConfigError("--data_path is required")
    if data_args.safety_ratio is not None and data_args.safety_data is None:
        raise ConfigError("--safety_ratio needs --safety_data (the safety records it mixes in)")
    if data_args.safety_ratio is not None and not 0.0 < data_args.safety_ratio < 1.0:
        raise ConfigError(f"--safety_ratio must lie strictly between 0 and 1, got {data_args.safety_ratio}")
    # Values of a set (--tga_form, --image_aspect_ratio, ...) are the fields' choices, checked by the parser; the
    # guide's options together are checked where its config is built (tga.align.guide_config).
    if model_args.lora_enable:
        if model_args.lora_r <= 0:
            raise ConfigError(f"--lora_r must be > 0, got {model_args.lora_r}")
        if model_args.tune_mm_mlp_adapter or model_args.freeze_backbone:
            raise ConfigError("--lora_enable trains the LLM through adapters; it contradicts --tune_mm_mlp_adapter / "
                              "--freeze_backbone (LLM frozen)")


def check_sources(model_args, tga_args) -> None:
    """Every model, vision-tower and file path of the run exists (or is a loadable hub id), before anything is built."""
    check_model_source("model_name_or_path", model_args.model_name_or_path)
    if not is_vlm_checkpoint(model_args.model_name_or_path):  # a saved VLM brings its own vision tower
        check_model_source("vision_tower", model_args.vision_tower)
    check_file("pretrain_mm_mlp_adapter", model_args.pretrain_mm_mlp_adapter)
    if tga_args.tga and tga_args.tga_layers == "auto":
        check_file("tga_activation_file", tga_args.tga_activation_file)


def zero_stage(training_args: TrainingArguments) -> int | None:
    """The ZeRO stage of the run's DeepSpeed config (None without DeepSpeed)."""
    plugin = getattr(training_args, "hf_deepspeed_config", None)
    return plugin.config.get("zero_optimization", {}).get("stage") if plugin is not None else None
