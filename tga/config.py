"""tga/config.py

Typed configuration: `ModelArguments`, `DataArguments`, `TGAArguments` and `TrainingArguments` (HF's, extended).

A run is configured by a YAML file plus command-line flags, later ones winning: `pretrain.py CONFIG.yaml
--learning_rate 2e-6`. Every YAML key is a flag of one of the dataclasses, and the flags of LLaVA's official scripts
are accepted under their LLaVA names. Contradictions (a precision flag against the DeepSpeed config, an unsupported
LLaVA option) are `ConfigError`s raised before any model is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import transformers
import yaml
from transformers import HfArgumentParser

from tga.errors import ConfigError


@dataclass
class ModelArguments:
    # fmt: off
    model_name_or_path: str = "mistralai/Mistral-7B-Instruct-v0.2"  # the LLM, or a saved VLM folder to continue from
    version: str = "llava_llama_2"                      # conversation template (LLaVA's --version; see tga.data.templates)
    vision_tower: str = "openai/clip-vit-large-patch14-336"  # CLIP checkpoint (CLIPModel or CLIPVisionModel)
    mm_projector_type: str = "mlp2x_gelu"               # linear | mlp{N}x_gelu | identity
    mm_vision_select_layer: int = -2                    # vision hidden state fed to the projector
    mm_vision_select_feature: str = "patch"             # patch (drop CLS) | cls_patch
    pretrain_mm_mlp_adapter: str | None = None          # stage-1 projector (mm_projector.safetensors or LLaVA .bin)
    tune_mm_mlp_adapter: bool = False                   # LLaVA flag: train only the projector (stage 1)
    freeze_backbone: bool = False                       # LLaVA flag: keep the LLM frozen
    freeze_mm_mlp_adapter: bool = False                 # LLaVA flag: keep the projector frozen
    mm_use_im_start_end: bool = False                   # LLaVA flag; only False is supported (HF Llava layout)
    mm_use_im_patch_token: bool = False                 # LLaVA flag; only False is supported
    attn_implementation: str | None = None              # sdpa (default) | eager | flash_attention_2
    # LoRA on the LLM in stage 2 (LLaVA's flags; LLaVA keeps them in TrainingArguments, but `tga unlearn` parses
    # TrainingArguments next to its own lora_* options). docs/training.md#lora
    lora_enable: bool = False                           # LoRA adapters on the LLM's linear layers instead of all LLM weights
    lora_r: int = 64                                    # LoRA rank
    lora_alpha: int = 16                                # LoRA scaling numerator (scaling = alpha / r)
    lora_dropout: float = 0.05                          # dropout on the LoRA input
    lora_bias: str = "none"                             # none | lora_only | all (peft's bias option)
    lora_target: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # LLM linear layers to adapt
    # fmt: on


@dataclass
class DataArguments:
    # fmt: off
    data_path: str | None = None                        # LLaVA JSON/JSONL file(s), comma-separated
    image_folder: str | None = None                     # image paths in records are relative to this folder
    image_aspect_ratio: str = "pad"                     # pad (to square, mean colour) | resize
    use_retrieved_in_prompt: bool = False               # put "Retrieved Text: {R}. " into the first user turn
    skip_bad_records: bool = False                      # skip and count invalid records instead of failing
    data_cache_dir: str | None = None                   # Arrow record cache (default: HF_DATASETS_CACHE/tga_records)
    preprocessing_num_workers: int | None = None        # processes validating records in the first Arrow conversion
    lazy_preprocess: bool = True                        # LLaVA flag; preprocessing is always lazy here
    is_multimodal: bool = True                          # LLaVA flag; accepted for compatibility
    # fmt: on
    # VLGuard-style safety data mixed into stage 2 (docs/training.md#safety-data-vlguard-style)
    safety_data: str | None = field(default=None, metadata={"help": "Records of images with refusals (VLGuard-style, LLaVA JSON/JSONL), mixed into the training data."})
    safety_ratio: float | None = field(default=None, metadata={"help": "Share of safety records among all records of an epoch, in (0, 1); default: every safety record once."})


@dataclass
class TGAArguments:
    # fmt: off
    tga: bool = False                                   # add the TGA guide loss to the next-token loss
    tga_layers: str = "10-18"                           # hidden-state indices: "10-18" | "10,12,14" | "all" | "auto"
    tga_activation_file: str | None = None              # activation analysis JSON used by tga_layers=auto
    tga_form: str = "paper"                             # paper | released | contrastive
    tga_weight: float = 1.0                             # lambda: L = L_CE + lambda * L_guide
    tga_schedule: str = "none"                          # none | linear (lambda decays to 0) | released ((1-r) factors)
    tga_target: str = "live"                            # live (training model, no grad) | frozen (model at stage start)
    tga_temperature: float = 0.07                       # contrastive form temperature
    tga_center: bool = False                            # subtract a running mean of caption states before cosines
    tga_guide_toxic: bool = False                       # also align records marked toxic (default: they never enter the guide)
    tga_caption_context: str = "alone"                  # alone (caption is the whole turn) | request (in the image's place)
    tga_pair_weight: float | None = field(default=None, metadata={"help": "Weight of the image-caption term (default: the form's, 1 or 1/4 for released)."})
    tga_hinge_weight: float | None = field(default=None, metadata={"help": "Weight of the retrieved-text hinge term (default: the form's, 1 or 1/10 for released)."})
    tga_bank: str | None = field(default=None, metadata={"help": "Caption-state bank folder: caption states computed once (built if missing) where the target is fixed (stage 1, --tga_target frozen)."})
    tga_bank_dtype: str = field(default="float16", metadata={"help": "Storage dtype of --tga_bank.", "choices": ["float16", "float32", "bfloat16"]})
    tga_center_momentum: float = field(default=0.99, metadata={"help": "EMA momentum of the caption centre of --tga_center, in [0, 1)."})
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


def yaml_to_argv(path: str) -> list[str]:
    """A YAML config as command-line flags (so that later flags override it)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            values = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:  # includes python/object tags, which the safe loader refuses
            raise ConfigError(f"{path}: not a valid YAML config ({error})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a mapping of option: value")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(item) for item in value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        argv += [f"--{key}", str(value)]
    return argv


def config_argv(argv: list[str]) -> list[str]:
    """Expand the positional YAML path (anywhere: launchers prepend `--local_rank=N`) into flags that the other
    flags override."""
    for index, token in enumerate(argv):
        is_flag_value = index > 0 and argv[index - 1].startswith("--") and "=" not in argv[index - 1]
        if token.endswith((".yaml", ".yml")) and not token.startswith("--") and not is_flag_value:
            return yaml_to_argv(token) + argv[:index] + argv[index + 1 :]
    return list(argv)


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
    argv = config_argv(argv)
    # Checked on the raw flags, before TrainingArguments (which already initialises devices and DeepSpeed state).
    check_precision(is_true(flag_value(argv, "bf16")), is_true(flag_value(argv, "fp16")), flag_value(argv, "deepspeed"))
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    try:
        model_args, data_args, tga_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except SystemExit as error:
        raise ConfigError(f"invalid command line: {' '.join(argv)}") from error
    check_config(model_args, data_args, tga_args, training_args)
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


def check_config(model_args, data_args, tga_args, training_args) -> None:
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise ConfigError("--mm_use_im_start_end / --mm_use_im_patch_token are not supported (HF Llava token layout)")
    if data_args.data_path is None:
        raise ConfigError("--data_path is required")
    if data_args.safety_ratio is not None and data_args.safety_data is None:
        raise ConfigError("--safety_ratio needs --safety_data (the safety records it mixes in)")
    if data_args.safety_ratio is not None and not 0.0 < data_args.safety_ratio < 1.0:
        raise ConfigError(f"--safety_ratio must lie strictly between 0 and 1, got {data_args.safety_ratio}")
    if data_args.image_aspect_ratio not in ("pad", "resize"):
        raise ConfigError(f"--image_aspect_ratio `{data_args.image_aspect_ratio}` must be pad or resize")
    if tga_args.tga_form not in ("paper", "released", "contrastive"):
        raise ConfigError(f"--tga_form `{tga_args.tga_form}` must be paper, released or contrastive")
    if tga_args.tga_schedule not in ("none", "linear", "released"):
        raise ConfigError(f"--tga_schedule `{tga_args.tga_schedule}` must be none, linear or released")
    if tga_args.tga_schedule == "released" and tga_args.tga_form != "released":
        raise ConfigError("--tga_schedule released applies the released form's (1-r) factors; use --tga_form released")
    if tga_args.tga_target not in ("live", "frozen"):
        raise ConfigError(f"--tga_target `{tga_args.tga_target}` must be live or frozen")
    if tga_args.tga_caption_context not in ("alone", "request"):
        raise ConfigError(f"--tga_caption_context `{tga_args.tga_caption_context}` must be alone or request")
    if model_args.lora_enable:
        if model_args.lora_r <= 0:
            raise ConfigError(f"--lora_r must be > 0, got {model_args.lora_r}")
        if model_args.lora_bias not in ("none", "lora_only", "all"):
            raise ConfigError(f"--lora_bias `{model_args.lora_bias}` must be none, lora_only or all")
        if model_args.tune_mm_mlp_adapter or model_args.freeze_backbone:
            raise ConfigError("--lora_enable trains the LLM through adapters; it contradicts --tune_mm_mlp_adapter / "
                              "--freeze_backbone (LLM frozen)")


def zero_stage(training_args: TrainingArguments) -> int | None:
    """The ZeRO stage of the run's DeepSpeed config (None without DeepSpeed)."""
    plugin = getattr(training_args, "hf_deepspeed_config", None)
    return plugin.config.get("zero_optimization", {}).get("stage") if plugin is not None else None
