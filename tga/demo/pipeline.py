"""tga/demo/pipeline.py

Turns a plan (`tga.demo.plan`) into the phases of a run and runs them: the world and its two pretrained models, text
retrieval for every training image, the activation layer of the text LLM, then for every seed and method stage 1,
its evaluation, stage 2 (or unlearning) and its evaluation, and the inference-time defences a method lists, evaluated
on its stage-2 model; finally the report. Methods whose stage-1 options are equal share one stage-1 run. Phases run one after the other in this process, or with `jobs` > 1 side by side in
child processes (`tga.demo.parallel`). Layout of the run folder:

    assets/                      world, tiny CLIP, text LLM (`tga demo-assets`)
    data/                        stage-1/2 records with `retrieved_caption` (`tga retrieve`)
    activation/                  activation layer of the text LLM (`tga analyze activation`)
    seed{S}/{method}/stage1|stage2, eval_stage1|eval_stage2, defense_{label} (a defence on the stage-2 model)
    commands.sh, report.md, report.json, *.png
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from tga.demo.parallel import run_parallel
from tga.demo.phases import Phase, phase_key, run_phase, shell_line, write_commands
from tga.demo.plan import Method, Plan
from tga.errors import ConfigError

CHAT_TEMPLATE = "mistral_instruct"  # the text LLM's chat format: every evaluation asks in it
Progress = Callable[[str], None]


def flag_argv(options: dict) -> list[str]:
    """{"tga": True, "tga_weight": 2} -> ["--tga", "true", "--tga_weight", "2"]."""
    argv: list[str] = []
    for name, value in options.items():
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


ASSET_PREFIX = "assets:"  # an option value naming a file of the world (`safety_data: assets:safety_data`)


def stage_flags(plan: Plan, stage: str, options: dict, paths: dict[str, str] | None = None) -> list[str]:
    """The plan's recipe flags of `stage`, then the method's own (which win where both set an option); a value
    `assets:NAME` becomes the path of the world's file NAME (`paths`)."""
    merged = {**plan.recipe.get(stage, {}), **options}
    for name, value in merged.items():
        if isinstance(value, str) and value.startswith(ASSET_PREFIX):
            asset = value[len(ASSET_PREFIX):]
            if paths is None or (asset not in paths and not isinstance(paths, _AssetPlaceholders)):
                raise ConfigError(f"{plan.source}: {stage} option {name}: `{value}` names no file of the world "
                                  f"(known: {', '.join(sorted(paths or {}))})")
            merged[name] = paths[asset]
    return flag_argv(merged)


def evaluation_commands(model: str, folder: str, paths: dict[str, str], settings: dict) -> tuple[tuple[str, ...], ...]:
    """The evaluation of one model folder: image DSR, text refusal, benign VQA and describe, recognition of the toxic
    object, image/caption similarity."""
    common = ["--model", model, "--template", CHAT_TEMPLATE, "--max_new_tokens", str(settings["max_new_tokens"]),
              "--batch_size", str(settings["batch_size"])]
    question = paths["dsr_question"]
    return (
        ("evaluate", "dsr", "--data", paths["toxic_test_folder"], "--prompts", question,
         "--out", os.path.join(folder, "image_dsr"), *common),
        ("evaluate", "dsr", "--data", paths["toxic_text_prompts"], "--out", os.path.join(folder, "text_refusal"),
         *common),
        ("evaluate", "vqa", "--data", paths["benign_vqa_test"], "--image_folder", paths["image_folder"],
         "--suffix", "", "--out", os.path.join(folder, "benign_vqa"), *common),
        ("evaluate", "vqa", "--data", paths["benign_describe_test"], "--image_folder", paths["image_folder"],
         "--suffix", "", "--out", os.path.join(folder, "benign_describe"), *common),
        ("evaluate", "vqa", "--data", paths["toxic_vqa_test"], "--image_folder", paths["image_folder"],
         "--suffix", "", "--out", os.path.join(folder, "toxic_vqa"), *common),
        ("analyze", "similarity", "--model", model, "--label", "model", "--data", paths["toxic_pairs"],
         "--image_folder", paths["image_folder"], "--question", question, "--template", CHAT_TEMPLATE,
         "--batch_size", str(settings["batch_size"]), "--out", os.path.join(folder, "similarity")),
    )


CMRM_CALIBRATION_SAMPLES = 64  # stage-1 images with their captions (a defence option may set calibration_samples)


def defense_commands(model: str, folder: str, paths: dict[str, str], settings: dict,
                     options: dict) -> tuple[tuple[str, ...], ...]:
    """One defence on one model folder: image DSR, benign VQA and benign describe (accuracy and false refusals), each
    answered through `--defense`; CMRM first calibrates on stage-1 images with their captions."""
    options = dict(options)
    samples = options.pop("calibration_samples", CMRM_CALIBRATION_SAMPLES)
    flags = flag_argv(options)
    commands = []
    if options["defense"] == "cmrm":
        calibration = os.path.join(folder, "cmrm.safetensors")
        commands.append(("calibrate", "cmrm", "--model", model, "--data", paths["stage1_data"], "--image_folder",
                         paths["image_folder"], "--question", paths["dsr_question"], "--template", CHAT_TEMPLATE,
                         "--max_samples", str(samples), "--batch_size", str(settings["batch_size"]),
                         "--out", calibration))
        flags += ["--cmrm_file", calibration]
    common = ["--model", model, "--template", CHAT_TEMPLATE, "--max_new_tokens", str(settings["max_new_tokens"]),
              "--batch_size", str(settings["batch_size"]), *flags]
    commands += [
        ("evaluate", "dsr", "--data", paths["toxic_test_folder"], "--prompts", paths["dsr_question"],
         "--out", os.path.join(folder, "image_dsr"), *common),
        ("evaluate", "vqa", "--data", paths["benign_vqa_test"], "--image_folder", paths["image_folder"],
         "--suffix", "", "--out", os.path.join(folder, "benign_vqa"), *common),
        ("evaluate", "vqa", "--data", paths["benign_describe_test"], "--image_folder", paths["image_folder"],
         "--suffix", "", "--out", os.path.join(folder, "benign_describe"), *common),
    ]
    return tuple(commands)


def assets_phase(plan: Plan, out: str, train_models: bool = False) -> Phase:
    folder = os.path.join(out, "assets")
    command = ("demo-assets", "--out", folder, "--seed", str(plan.assets_seed), "--size", plan.assets_size)
    return Phase("assets", folder, (command + (("--train_models",) if train_models else ()),), kind="assets")


def read_asset_paths(assets_folder: str) -> dict[str, str]:
    with open(os.path.join(assets_folder, "assets.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    return {**summary["paths"], "dsr_question": summary["dsr_question"]}


def built_assets_key(assets_folder: str) -> str:
    """The keys of the world, CLIP and LLM steps that built the assets folder, as one string."""
    with open(os.path.join(assets_folder, "assets.json"), encoding="utf-8") as handle:
        steps = json.load(handle)["steps"]
    return ",".join(f"{name}:{steps[name]['key']}" for name in sorted(steps))


def assets_reused(assets_folder: str) -> bool:
    """Whether the last `demo-assets` run reused every step it found built."""
    with open(os.path.join(assets_folder, "assets.json"), encoding="utf-8") as handle:
        return all(step["cached"] for step in json.load(handle)["steps"].values())


def shared_phases(plan: Plan, out: str, paths: dict[str, str]) -> list[Phase]:
    """Retrieval for both stages' records and the text LLM's activation layer: once per run."""
    data = os.path.join(out, "data")
    retrieve = [("retrieve", "--data", paths[f"stage{n}_data"], "--image_folder", paths["image_folder"],
                 "--corpus", paths["captions"], "--out", os.path.join(data, f"stage{n}.json"), "--backend", "hf_clip",
                 "--model", paths["clip"], "--index_path", os.path.join(data, "index"), "--top_k", "3",
                 "--num_workers", "0") for n in (1, 2)]
    activation = ("analyze", "activation", "--model", paths["llm"], "--data", paths["toxic_text_prompts"],
                  "--control", paths["benign_text_prompts"], "--template", CHAT_TEMPLATE,
                  "--out", os.path.join(out, "activation"))
    return [Phase("retrieval", data, tuple(retrieve), ("assets",), kind="retrieval"),
            Phase("activation", os.path.join(out, "activation"), (activation,), ("assets",), kind="activation")]


def _stage1_owner(plan: Plan, method: Method) -> Method:
    """The first training method (of the full plan) with the same stage-1 options: its stage-1 run is shared."""
    return next(m for m in plan.stage1_owners or plan.methods if not m.is_unlearning and m.stage1 == method.stage1)


def stage1_owner_name(plan: Plan, method: Method) -> str:
    """The folder name of the stage-1 run a training method uses."""
    return _stage1_owner(plan, method).name


def seed_phases(plan: Plan, out: str, paths: dict[str, str], seed: int) -> list[Phase]:
    """Stage 1, stage 2 / unlearning and both evaluations of every method, for one seed."""
    root = os.path.join(out, f"seed{seed}")
    data, activation = os.path.join(out, "data"), os.path.join(out, "activation", "activation.json")
    model_paths = ["--model_name_or_path", paths["llm"], "--vision_tower", paths["clip"],
                   "--image_folder", paths["image_folder"], "--seed", str(seed), "--tga_activation_file", activation]
    phases: list[Phase] = []
    training = [method for method in plan.methods if not method.is_unlearning]
    for owner in dict.fromkeys(_stage1_owner(plan, method).name for method in training):
        stage1 = os.path.join(root, owner, "stage1")
        options = next(m for m in plan.stage1_owners or plan.methods if m.name == owner).stage1
        phases.append(Phase(f"seed{seed}/{owner}/stage1", stage1, (
            ("pretrain", plan.configs["stage1"], *model_paths, "--data_path", os.path.join(data, "stage1.json"),
             "--output_dir", stage1, *stage_flags(plan, "stage1", options, paths)),),
            ("retrieval", "activation"), kind="stage1"))
        phases.append(Phase(f"seed{seed}/{owner}/eval_stage1", os.path.join(root, owner, "eval_stage1"),
                            evaluation_commands(stage1, os.path.join(root, owner, "eval_stage1"), paths,
                                                plan.evaluation), (f"seed{seed}/{owner}/stage1",), kind="evaluate"))
    for method in training:
        owner = _stage1_owner(plan, method)
        stage1 = os.path.join(root, owner.name, "stage1")
        stage2 = os.path.join(root, method.name, "stage2")
        phases.append(Phase(f"seed{seed}/{method.name}/stage2", stage2, (
            ("finetune", plan.configs["stage2"], *model_paths, "--data_path", os.path.join(data, "stage2.json"),
             "--pretrain_mm_mlp_adapter", os.path.join(stage1, "mm_projector.safetensors"), "--output_dir", stage2,
             *stage_flags(plan, "stage2", method.stage2, paths)),),
            (f"seed{seed}/{owner.name}/stage1",), kind="stage2"))
    for method in plan.methods:
        if method.is_unlearning:
            base = os.path.join(root, method.base, "stage2")
            folder = os.path.join(root, method.name, "stage2")
            phases.append(Phase(f"seed{seed}/{method.name}/stage2", folder, (
                ("unlearn", plan.configs["unlearn"], "--model", base, "--harmful", paths["unlearn_harmful"],
                 "--normal", paths["unlearn_normal"], "--output_dir", folder, "--seed", str(seed),
                 *stage_flags(plan, "unlearn", method.unlearn or {}, paths)),),
                (f"seed{seed}/{method.base}/stage2",), kind="unlearn"))
    for method in plan.methods:
        stage2, folder = os.path.join(root, method.name, "stage2"), os.path.join(root, method.name, "eval_stage2")
        phases.append(Phase(f"seed{seed}/{method.name}/eval_stage2", folder,
                            evaluation_commands(stage2, folder, paths, plan.evaluation),
                            (f"seed{seed}/{method.name}/stage2",), kind="evaluate"))
        for label, options in method.defenses.items():
            folder = defense_folder(out, seed, method.name, label)
            phases.append(Phase(f"seed{seed}/{method.name}/defense_{label}", folder,
                                defense_commands(stage2, folder, paths, plan.evaluation, options),
                                (f"seed{seed}/{method.name}/stage2",), kind="defense"))
    return phases


def defense_folder(out: str, seed: int, method: str, label: str) -> str:
    """Where a defence's evaluation of a method's stage-2 model lives."""
    return os.path.join(out, f"seed{seed}", method, f"defense_{label}")


def stage1_folder(plan: Plan, out: str, seed: int, method: Method) -> str:
    """Where a method's stage-1 evaluation lives (an unlearning method reports its base's stage 1)."""
    source = plan.method(method.base) if method.is_unlearning else method
    return os.path.join(out, f"seed{seed}", _stage1_owner(plan, source).name, "eval_stage1")


class _AssetPlaceholders(dict):
    """Asset paths for a listing made before the world is built: `<assets:name>` for each."""

    def __missing__(self, name: str) -> str:
        return f"<assets:{name}>"


def dry_run_lines(plan: Plan, out: str, train_models: bool = False) -> list[str]:
    """What `run_plan` would do, without running anything: the plan and recipe files it reads, whether the shipped
    models are copied or trained, and every phase with its commands (asset paths as `<assets:NAME>` until the assets
    folder is built)."""
    from tga.demo.assets import matching_prebuilt

    out = os.path.abspath(out)
    lines = [f"plan: {plan.source} ({len(plan.methods)} methods x {len(plan.seeds)} seeds; world {plan.assets_size}, "
             f"seed {plan.assets_seed})"]
    lines += [f"recipe {stage}: {path}" for stage, path in plan.configs.items()]
    for name, folder in matching_prebuilt(plan.assets_seed, plan.assets_size).items():
        state = f"copied from {folder}" if folder and not train_models else "trained (no shipped model is used)"
        lines.append(f"{name} model: {state}")
    first = assets_phase(plan, out, train_models)
    built = os.path.exists(os.path.join(first.folder, "assets.json"))
    paths = read_asset_paths(first.folder) if built else _AssetPlaceholders()
    phases = [first, *shared_phases(plan, out, paths)]
    for seed in plan.seeds:
        phases += seed_phases(plan, out, paths, seed)
    lines.append(f"{len(phases)} phases:")
    for phase in phases:
        lines.append(f"# {phase.name}")
        lines += [f"  {shell_line(argv)}" for argv in phase.commands]
    return lines


def run_plan(plan: Plan, out: str, runner: Callable[[list[str]], int], progress: Progress = print, *,
             jobs: int = 1, train_models: bool = False) -> dict:
    """Run every phase of `plan` under `out` (reusing finished ones); returns {phase name: record}.

    Args:
        plan: the plan.
        out: the run folder.
        runner: runs one `tga` argv in this process (used when `jobs` is 1, and for the assets).
        progress: where progress lines go.
        jobs: phases run side by side, each command in its own process (`tga.demo.parallel`).
        train_models: train the world's CLIP and LLM even when shipped ones match (`tga demo-assets --train_models`).
    """
    out = os.path.abspath(out)  # the commands (and so the phase keys) name it: `runs/x` and `/abs/runs/x` are one run
    os.makedirs(out, exist_ok=True)
    started = time.time()
    first = assets_phase(plan, out, train_models)
    # `demo-assets` skips its finished steps itself, so it always runs and notices a changed world or model spec;
    # what it built (the keys of its steps) then enters every later phase's key, so stale results are redone
    progress(f"{first.name}: {shell_line(first.commands[0])}")
    records = {first.name: run_phase(first, phase_key(first, []), runner, clear=False, always=True)}
    keys = {first.name: phase_key(first, [built_assets_key(first.folder)])}
    records[first.name].update(key=keys[first.name], cached=assets_reused(first.folder))
    paths = read_asset_paths(first.folder)
    phases = shared_phases(plan, out, paths)
    for seed in plan.seeds:
        phases += seed_phases(plan, out, paths, seed)
    write_commands([first, *phases], os.path.join(out, "commands.sh"))
    for phase in phases:  # a key depends on the commands only, so every key is known before anything runs
        keys[phase.name] = phase_key(phase, [keys[name] for name in phase.after])
    if jobs > 1:
        records.update(run_parallel(phases, jobs, lambda phase, batch: run_phase(phase, keys[phase.name], batch=batch),
                                    progress, keys))
    else:
        for number, phase in enumerate(phases, start=1):
            progress(f"[{number}/{len(phases)}] {phase.name} ({time.time() - started:.0f} s elapsed)")
            records[phase.name] = run_phase(phase, keys[phase.name], runner)
            state = "reused" if records[phase.name]["cached"] else f"done in {records[phase.name]['seconds']:.0f} s"
            progress(f"[{number}/{len(phases)}] {phase.name}: {state}")
    return {"phases": records, "seconds": round(time.time() - started, 1), "paths": paths}
