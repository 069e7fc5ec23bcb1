"""tga/align/guide_config.py

The guide's configuration, typed and checked in one place. `GuideConfig` holds the `--tga_*` options the guide runs
with (target layers resolved to hidden-state indices); its constructor refuses every contradiction among them, by
the flags a user typed. `GuideConfig.for_run` builds it from the parsed flags before any model is loaded and also
refuses what contradicts the run: a caption-state bank or a frozen target where they cannot hold. Where the caption
states then come from (a bank, a pass riding the training forward, or a separate pass) follows from the config and
the model (`caption_source`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tga.align.layers import load_activation_layer, parse_layer_spec
from tga.align.tga_loss import FORMS as POOLED_FORMS
from tga.errors import ConfigError
from tga.model.text_states import supports_partial_pass

FORMS = (*POOLED_FORMS, "request")  # the registry of tga_loss, and the token-level request form
SCHEDULES = ("none", "linear", "released")
TARGETS = ("live", "frozen")
CAPTION_PASSES = ("auto", "bank", "shared", "separate")
CAPTION_CONTEXTS = ("alone", "request")
BANK_DTYPES = ("float16", "float32", "bfloat16")


@dataclass(frozen=True)
class GuideConfig:
    """What the guide runs with; every field is a `--tga_<field>` option (`layers` resolved to indices)."""

    layers: tuple[int, ...]
    form: str = "paper"
    weight: float = 1.0
    schedule: str = "none"  # none | linear | released
    temperature: float = 0.07
    target: str = "live"  # live | frozen
    center: bool = False
    pair_weight: float | None = None  # None: the form's default (tga_loss.FORMS)
    hinge_weight: float | None = None
    center_momentum: float = 0.99
    bank: str | None = None  # caption-state bank folder (tga.align.bank), for a target that cannot change
    bank_dtype: str = "float16"
    caption_pass: str = "auto"  # auto | bank | shared | separate
    caption_context: str = "alone"  # alone | request: what the caption pass's prompt holds besides the caption

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for option, value, choices in (("--tga_form", self.form, FORMS), ("--tga_schedule", self.schedule, SCHEDULES),
                                       ("--tga_target", self.target, TARGETS),
                                       ("--tga_caption_pass", self.caption_pass, CAPTION_PASSES),
                                       ("--tga_caption_context", self.caption_context, CAPTION_CONTEXTS),
                                       ("--tga_bank_dtype", self.bank_dtype, BANK_DTYPES)):
            if value not in choices:
                raise ConfigError(f"{option}: {value!r} is not one of {', '.join(choices)}")
        if not self.layers:
            raise ConfigError("--tga true with no target layers: set --tga_layers")
        for option, value in (("--tga_pair_weight", self.pair_weight), ("--tga_hinge_weight", self.hinge_weight)):
            if value is not None and not value >= 0.0:
                raise ConfigError(f"{option}: must be >= 0, got {value}")
        if not 0.0 <= self.center_momentum < 1.0:
            raise ConfigError(f"--tga_center_momentum: must lie in [0, 1), got {self.center_momentum}")
        if self.schedule == "released" and self.form != "released":
            raise ConfigError("--tga_schedule released applies the released form's (1-r) factors; use --tga_form released")
        if self.form == "request":
            if self.caption_context != "request":
                raise ConfigError("--tga_form request pulls request tokens toward the same tokens after the caption: "
                                  "it needs --tga_caption_context request")
            if self.bank:
                raise ConfigError("--tga_bank stores pooled caption states; --tga_form request needs the caption "
                                  "pass's request tokens (drop --tga_bank)")
            if self.center:
                raise ConfigError("--tga_center centres pooled image/caption states; --tga_form request compares tokens")
        if self.caption_pass == "bank" and not self.bank:
            raise ConfigError("--tga_caption_pass bank needs --tga_bank DIR")
        if self.bank and self.caption_pass in ("shared", "separate"):
            raise ConfigError(f"--tga_caption_pass {self.caption_pass}: --tga_bank reads the caption states from the "
                              "bank; drop one of the two")

    @classmethod
    def for_run(cls, tga_args, *, num_layers: int, trains_llm: bool, zero3: bool) -> GuideConfig | None:
        """The config of a run's `--tga_*` flags (None without `--tga`), checked against the run: the LLM's depth
        `num_layers`, whether the LLM trains in this stage and whether the run is ZeRO-3."""
        if not tga_args.tga:
            return None
        activation = None
        if tga_args.tga_layers == "auto":
            if tga_args.tga_activation_file is None:
                raise ConfigError("--tga_layers auto needs --tga_activation_file (from `tga analyze activation`)")
            activation = load_activation_layer(tga_args.tga_activation_file)
        config = cls(layers=parse_layer_spec(tga_args.tga_layers, num_layers, activation), form=tga_args.tga_form,
                     weight=tga_args.tga_weight, schedule=tga_args.tga_schedule, temperature=tga_args.tga_temperature,
                     target=tga_args.tga_target, center=tga_args.tga_center, pair_weight=tga_args.tga_pair_weight,
                     hinge_weight=tga_args.tga_hinge_weight, center_momentum=tga_args.tga_center_momentum,
                     bank=tga_args.tga_bank, bank_dtype=tga_args.tga_bank_dtype,
                     caption_pass=tga_args.tga_caption_pass, caption_context=tga_args.tga_caption_context)
        if config.bank and config.target != "frozen" and trains_llm:
            raise ConfigError("--tga_bank needs a caption target that cannot change: stage 1 with the LLM frozen, or "
                              "--tga_target frozen")
        if config.copies_target(trains_llm) and zero3:
            raise ConfigError("--tga_target frozen copies the LLM at the start of stage 2, which ZeRO-3 has "
                              "partitioned; use --tga_bank DIR (the frozen target's states computed once), ZeRO-2 "
                              "(deepspeed_configs/zero2.json) or --tga_target live")
        return config

    def copies_target(self, trains_llm: bool) -> bool:
        """A frozen target read from a copy of the LLM taken at stage start: the LLM trains and no bank holds the
        target's states (a frozen LLM is its own frozen target)."""
        return self.target == "frozen" and not self.bank and trains_llm

    def caption_source(self, language_model, *, copied_target: bool) -> tuple[str, str | None]:
        """(`bank` | `shared` | `separate`, why `auto` could not share: None when it could) for this config and the
        training LLM; `copied_target`: the target is a copy of the LLM (`copies_target`)."""
        if self.bank:
            return "bank", None
        if self.caption_pass == "separate":
            return "separate", None
        if copied_target:
            why = "--tga_target frozen runs a copy of the LLM, which the training forward does not run"
        elif not supports_partial_pass(language_model):
            why = (f"the forward of model type {language_model.config.model_type!r} is not one the project mirrors "
                   "(llama, mistral)")
        else:
            return "shared", None
        if self.caption_pass == "shared":
            raise ConfigError(f"--tga_caption_pass shared: {why}")
        return "separate", why
