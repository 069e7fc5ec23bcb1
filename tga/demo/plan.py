"""tga/demo/plan.py

The plan of a demo or sweep run, read from YAML (`tga/demo/configs/demo.yaml`, `tga/demo/configs/study.yaml`, shipped
with the package; `configs/demo/` in a checkout links there): which world to build, which seeds to train with, the
stage recipes, how to evaluate, and the methods. A method is a set of flag overrides for stage 1 and stage 2, or an
unlearning run on another method's stage-2 model. A plan file's recipe paths are relative to the plan file, so a plan
works from any folder and from an installed package. Everything is checked when the plan is read, so a typo or a
missing recipe fails before any training starts, naming the option.
A method may also list inference-time defences (`defenses:`), evaluated on its stage-2 model (they cost evaluation
only).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from tga.errors import ConfigError

PLAN_KEYS = {"assets", "seeds", "configs", "recipe", "evaluation", "methods", "description"}
RECIPE_STAGES = ("stage1", "stage2", "unlearn")
METHOD_KEYS = {"stage1", "stage2", "base", "unlearn", "description", "defenses"}
DEFENSES = ("ecso", "cmrm", "adashield")  # tga.defense.dispatch.DEFENSES less "none" (the method's own evaluation)
EVALUATION_DEFAULTS = {"max_new_tokens": 48, "batch_size": 64}


@dataclass(frozen=True)
class Method:
    """One configuration of the grid.

    Attributes:
        name: the method's name (a folder name in the run).
        stage1, stage2: flags added to the stage recipe (`{"tga": True, "tga_form": "contrastive"}`).
        base: for an unlearning method, the method whose stage-2 model is unlearned.
        unlearn: flags added to the unlearning recipe; None for a training method.
    """

    name: str
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    unlearn: dict[str, Any] | None = None
    # {label: {"defense": name, flag: value, ...}}: inference-time defences evaluated on the stage-2 model
    defenses: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_unlearning(self) -> bool:
        return self.unlearn is not None


@dataclass(frozen=True)
class Plan:
    """A whole demo or sweep: world, seeds, recipes, evaluation settings and methods (in run order)."""

    assets_size: str
    assets_seed: int
    seeds: tuple[int, ...]
    configs: dict[str, str]
    evaluation: dict[str, Any]
    methods: tuple[Method, ...]
    source: str = ""
    # flags added to every method's command of a stage, before the method's own (`{"stage1": {"num_train_epochs": 2}}`)
    recipe: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the full plan's training methods when `methods` was narrowed: a kept method still shares (runs or reuses) the
    # stage-1 run of the first of these with equal stage-1 options, and nothing else of that method runs
    stage1_owners: tuple[Method, ...] = ()

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of option: value")
    return dict(value)


def _method(name: str, spec: Any, path: str) -> Method:
    spec = _mapping(spec, f"{path}: methods.{name}")
    unknown = set(spec) - METHOD_KEYS
    if unknown:
        raise ConfigError(f"{path}: methods.{name} has unknown keys {sorted(unknown)}; allowed: {sorted(METHOD_KEYS)}")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{path}: method name `{name}` must be letters, digits, `_` or `-` (it names a folder)")
    defenses = _defenses(spec.pop("defenses", None), f"{path}: methods.{name}.defenses")
    if "unlearn" in spec:
        if not spec.get("base"):
            raise ConfigError(f"{path}: methods.{name} unlearns, so it needs `base:` (the method it starts from)")
        if "stage1" in spec or "stage2" in spec:
            raise ConfigError(f"{path}: methods.{name}: an unlearning method takes no stage1/stage2 options")
        return Method(name, base=spec["base"], unlearn=_mapping(spec["unlearn"], f"{path}: methods.{name}.unlearn"),
                      defenses=defenses)
    if spec.get("base"):
        raise ConfigError(f"{path}: methods.{name}: `base` is only for unlearning methods (add `unlearn:`)")
    return Method(name, _mapping(spec.get("stage1"), f"{path}: methods.{name}.stage1"),
                  _mapping(spec.get("stage2"), f"{path}: methods.{name}.stage2"), defenses=defenses)


def _defenses(value: Any, where: str) -> dict[str, dict[str, Any]]:
    """{label: options}: the defence is `options["defense"]`, or the label itself when it names one."""
    defenses = {}
    for label, options in _mapping(value, where).items():
        options = _mapping(options, f"{where}.{label}")
        defense = options.setdefault("defense", label)
        if defense not in DEFENSES:
            raise ConfigError(f"{where}.{label}: `{defense}` is not a defence (choose from {', '.join(DEFENSES)}; "
                              "give `defense:` when the label is not one)")
        if not str(label).replace("_", "").isalnum():
            raise ConfigError(f"{where}: defence label `{label}` must be letters, digits or `_` (it names a folder)")
        defenses[str(label)] = options
    return defenses


def parse_plan(data: Any, path: str = "<plan>") -> Plan:
    """Check a plan mapping and build the `Plan`; errors name the file and the option."""
    data = _mapping(data, path)
    unknown = set(data) - PLAN_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(PLAN_KEYS)}")
    assets = _mapping(data.get("assets"), f"{path}: assets")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds repeat: {seeds}")
    configs = _mapping(data.get("configs"), f"{path}: configs")
    for stage in RECIPE_STAGES:
        if stage not in configs:
            raise ConfigError(f"{path}: configs.{stage} (a recipe YAML) is required")
    recipe = _mapping(data.get("recipe"), f"{path}: recipe")
    unknown = set(recipe) - set(RECIPE_STAGES)
    if unknown:
        raise ConfigError(f"{path}: recipe has unknown keys {sorted(unknown)}; allowed: {list(RECIPE_STAGES)}")
    recipe = {stage: _mapping(flags, f"{path}: recipe.{stage}") for stage, flags in recipe.items()}
    evaluation = {**EVALUATION_DEFAULTS, **_mapping(data.get("evaluation"), f"{path}: evaluation")}
    unknown = set(evaluation) - set(EVALUATION_DEFAULTS)
    if unknown:
        raise ConfigError(f"{path}: evaluation has unknown keys {sorted(unknown)}; allowed: {sorted(EVALUATION_DEFAULTS)}")
    methods_spec = _mapping(data.get("methods"), f"{path}: methods")
    if not methods_spec:
        raise ConfigError(f"{path}: methods is empty")
    methods = tuple(_method(str(name), spec, path) for name, spec in methods_spec.items())
    names = {m.name for m in methods}
    for method in methods:
        if method.is_unlearning:
            base = next((m for m in methods if m.name == method.base), None)
            if base is None or base.is_unlearning:
                raise ConfigError(f"{path}: methods.{method.name}.base `{method.base}` must name a training method "
                                  f"of this plan ({sorted(names)})")
    return Plan(assets_size=str(assets.get("size", "full")), assets_seed=int(assets.get("seed", 0)),
                seeds=tuple(seeds), configs={k: str(v) for k, v in configs.items()}, evaluation=evaluation,
                methods=methods, source=path, recipe=recipe)


def load_plan(path: str) -> Plan:
    """Read a plan YAML (see `tga/demo/configs/demo.yaml`); its recipe paths are taken relative to its folder."""
    if not os.path.isfile(path):
        raise ConfigError(f"plan file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not a valid YAML plan ({error})") from error
    plan = parse_plan(data, path)
    configs = {stage: os.path.normpath(os.path.join(os.path.dirname(path), recipe))  # absolute ones stay as they are
               for stage, recipe in plan.configs.items()}
    for stage, recipe in configs.items():
        if not os.path.isfile(recipe):
            raise ConfigError(f"{path}: configs.{stage}: recipe file not found: {recipe} (paths are relative to the plan)")
    return dataclasses.replace(plan, configs=configs)
