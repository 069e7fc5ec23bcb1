"""tga/demo/report.py

The report of a demo or sweep run: every method's metrics after stage 1 and after stage 2 for every seed (recomputed
from the saved answers by `tga.demo.metrics`), their mean and spread over seeds, the activation layer of the text
LLM, the pretrained models' quality, wall times and the commands file, and the inference-time defences
(`tga.demo.defense_report`); written as `report.json`, `report.md` and the plots (DSR and refusal bars, per-layer
cos(image, caption), per-layer specificity, defences' DSR against false refusal).
"""

from __future__ import annotations

import json
import math
import os
from statistics import mean

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tga.demo.comparison import comparison_markdown, comparison_rows, plot_comparison
from tga.demo.defense_report import collect_defenses, defense_markdown, plot_defenses
from tga.demo.metrics import model_metrics, spread
from tga.demo.plan import Plan

SCALARS = ("image_dsr", "image_dsr_safety_concepts", "image_dsr_heldout_concepts", "describes_toxic", "recognises_toxic", "text_refusal", "benign_vqa_accuracy",
           "benign_describe_accuracy", "benign_describe_concepts", "false_refusal")
TABLE = (("image DSR after stage 1", "stage1", "image_dsr"), ("image DSR after stage 2", "stage2", "image_dsr"),
         ("describes the toxic object (stage 2)", "stage2", "describes_toxic"),
         ("recognises the toxic object (stage 2)", "stage2", "recognises_toxic"),
         ("text refusal (stage 1)", "stage1", "text_refusal"), ("text refusal (stage 2)", "stage2", "text_refusal"),
         ("benign VQA accuracy", "stage2", "benign_vqa_accuracy"),
         ("benign describe accuracy", "stage2", "benign_describe_accuracy"),
         ("benign describe, objects named right", "stage2", "benign_describe_concepts"),
         ("false refusal on benign images", "stage2", "false_refusal"))


def layerwise(curves: list[list[float] | None]) -> list[float] | None:
    present = [c for c in curves if c is not None]
    return [mean(values) for values in zip(*present)] if present else None


def collect(plan: Plan, out: str) -> dict:
    """{method: {"per_seed": {seed: {"stage1": metrics, "stage2": metrics}}, "summary": {stage: {metric: spread}}}}."""
    from tga.demo.pipeline import stage1_folder

    methods = {}
    for method in plan.methods:
        per_seed = {}
        for seed in plan.seeds:
            per_seed[str(seed)] = {
                "stage1": model_metrics(stage1_folder(plan, out, seed, method)),
                "stage2": model_metrics(os.path.join(out, f"seed{seed}", method.name, "eval_stage2")),
            }
        summary = {stage: {name: spread([per_seed[str(s)][stage][name] for s in plan.seeds]) for name in SCALARS}
                   for stage in ("stage1", "stage2")}
        for stage in ("stage1", "stage2"):
            summary[stage]["cosine"] = layerwise([per_seed[str(s)][stage]["cosine"] for s in plan.seeds])
            summary[stage]["specificity"] = layerwise([per_seed[str(s)][stage]["specificity"] for s in plan.seeds])
        methods[method.name] = {"per_seed": per_seed, "summary": summary, "stage1": method.stage1,
                                "stage2": method.stage2, "base": method.base, "unlearn": method.unlearn}
    return methods


def step_costs(plan: Plan, out: str) -> dict:
    """{method: {stage: mean seconds per training step over seeds}} from each run's `cost.json` (wall time / steps;
    methods sharing a stage-1 run share its cost; an unlearning run has none)."""
    from tga.demo.pipeline import stage1_owner_name

    costs: dict = {}
    for method in plan.methods:
        if method.is_unlearning:
            continue
        per_stage = {}
        for stage, owner in (("stage1", stage1_owner_name(plan, method)), ("stage2", method.name)):
            values = []
            for seed in plan.seeds:
                path = os.path.join(out, f"seed{seed}", owner, stage, "cost.json")
                if os.path.exists(path):
                    with open(path, encoding="utf-8") as handle:
                        cost = json.load(handle)
                    values.append(cost["wall_time_s"] / max(cost["steps"], 1))
            per_stage[stage] = mean(values) if values else None
        costs[method.name] = per_stage
    return costs


def _cost_line(costs: dict) -> str:
    baseline = next(iter(costs.values()), {})

    def cell(value, base):
        if value is None:
            return "n/a"
        return f"{value:.3f} s" + (f" ({value / base:.2f}×)" if base else "")

    return ("Training cost per step (wall time / steps, mean over seeds; × the first method; runs that shared the "
            "machine with others are slower, compare within one run): " + "; ".join(
                f"{name} stage 1 {cell(c['stage1'], baseline.get('stage1'))}, stage 2 {cell(c['stage2'], baseline.get('stage2'))}"
                for name, c in costs.items()) + ".")


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["n"] > 1 else f"{stat['mean']:.3f}"


def _save(figure: Figure, path: str) -> str:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_rates(methods: dict, path: str) -> str:
    """Grouped bars per method: image DSR after stage 1 and 2, text refusal, benign VQA accuracy (mean, std bars)."""
    bars = (("image DSR, stage 1", "stage1", "image_dsr"), ("image DSR, stage 2", "stage2", "image_dsr"),
            ("text refusal, stage 2", "stage2", "text_refusal"), ("benign VQA acc., stage 2", "stage2",
                                                                  "benign_vqa_accuracy"))
    figure = Figure(figsize=(1.8 + 1.6 * len(methods), 3.6))
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(bars)
    for index, (label, stage, name) in enumerate(bars):
        stats = [m["summary"][stage][name] for m in methods.values()]
        positions = [i + (index - (len(bars) - 1) / 2) * width for i in range(len(methods))]
        axes.bar(positions, [s["mean"] for s in stats], width, yerr=[s["std"] for s in stats], label=label, capsize=2)
    axes.set_xticks(range(len(methods)), list(methods))
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("rate")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title("safety and utility per method (mean ± std over seeds)", fontsize=10)
    return _save(figure, path)


def plot_layers(methods: dict, field: str, ylabel: str, path: str) -> str | None:
    """Per-layer curves, solid after stage 2 and dashed after stage 1, one colour per method."""
    figure = Figure(figsize=(6.4, 3.8))
    axes = figure.add_subplot(1, 1, 1)
    drawn = False
    for index, (name, method) in enumerate(methods.items()):
        colour = f"C{index % 10}"
        for stage, style in (("stage1", "--"), ("stage2", "-")):
            curve = method["summary"][stage][field]
            if curve is not None:
                axes.plot(range(len(curve)), curve, style, color=colour, marker="o", markersize=3,
                          label=f"{name} ({stage.replace('stage', 'stage ')})")
                drawn = True
    if not drawn:
        return None
    axes.set_xlabel("hidden-state layer (0 = embeddings)")
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=3.5)  # long enough to show dashes
    axes.set_title(f"{ylabel} per layer, toxic test images (seed mean)", fontsize=10)
    return _save(figure, path)


def _markdown(plan: Plan, methods: dict, context: dict) -> str:
    seeds = ", ".join(str(s) for s in plan.seeds)
    lines = [f"# Demo report ({plan.source})", "",
             f"Methods trained from the same tiny CLIP and text LLM with seeds {seeds}; every number is recomputed from "
             "the saved answers and shown as mean ± sample std over seeds. Image DSR: refusals to \"" +
             context["dsr_question"] + "\" on held-out toxic images. Text refusal: the same request with the scene "
             "given in words. *Describes the toxic object*: answers that name it instead of refusing (the paper's "
             "failure). *Recognises the toxic object*: answers \"Which object is at X?\" about it with its name. "
             "*Objects named right*: benign descriptions that name exactly the scene's objects.", "",
             "| method | " + " | ".join(label for label, _, _ in TABLE) + " |",
             "|---|" + "---:|" * len(TABLE)]
    for name, method in methods.items():
        lines.append(f"| {name} | " + " | ".join(_cell(method["summary"][stage][key]) for _, stage, key in TABLE) + " |")
    seconds = context.get("method_seconds", {})
    if seconds:
        lines += ["", "Wall time per method and seed (its own training and evaluation phases; shared phases "
                  "counted once, under the method that ran them): "
                  + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()) + "."]
    if context.get("step_costs"):
        lines += ["", _cost_line(context["step_costs"])]
    lines += ["", "![rates](rates.png)", "", "![cosine](cosine.png)", "", "![specificity](specificity.png)", ""]
    lines += comparison_markdown(context.get("comparison", []))
    lines += defense_markdown(context.get("defenses", {}))
    if context.get("defense_seconds"):
        lines += ["Wall time of each defence's evaluation phase (calibration included): " + ", ".join(
            f"{name} {value:.0f} s" for name, value in context["defense_seconds"].items()) + ".", ""]
    activation = context.get("activation")
    if activation:
        layer = activation["mean_activation_layer"]
        layer = "none (no prompt activates)" if layer is None else f"{layer:.2f}"
        lines += [f"Activation layer of the text LLM (Algorithm 1, logit lens on toxic text prompts): "
                  f"{layer} of {activation['num_layers']} "
                  f"({activation['activated_fraction']:.0%} of prompts activate"
                  + (f"; {activation['control']['activated_fraction']:.0%} of benign control prompts"
                     if activation.get("control") else "")
                  + "); TGA layers `auto` align the band ending there.", ""]
    lines += ["## Per seed", "", "| method | seed | " + " | ".join(label for label, _, _ in TABLE) + " |",
              "|---|---:|" + "---:|" * len(TABLE)]
    for name, method in methods.items():
        for seed, stages in method["per_seed"].items():
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{stages[stage][key]:.3f}" for _, stage, key in TABLE)
                         + " |")
    lines += ["", "## Specificity per layer after stage 2 (cos to own caption - mean cos to other captions)", ""]
    for name, method in methods.items():
        curve = method["summary"]["stage2"]["specificity"]
        if curve is not None:
            lines.append(f"- {name}: " + ", ".join(f"{value:.3f}" for value in curve))
    clip, llm = context.get("clip_metrics", {}), context.get("llm_metrics", {})
    lines += ["", "## The world's pretrained models", "",
              f"- tiny CLIP, zero-shot on held-out images: concept {clip.get('concept_acc', math.nan):.3f} "
              f"(toxic {clip.get('toxic_concept_acc', math.nan):.3f}), colour {clip.get('colour_acc', math.nan):.3f}, "
              f"position {clip.get('position_acc', math.nan):.3f}",
              f"- text LLM on held-out text: refusal {llm.get('text_refusal_rate', math.nan):.3f}, benign describe "
              f"{llm.get('benign_describe_acc', math.nan):.3f}, false refusals {llm.get('false_refusal_rate', math.nan):.3f}"]
    shipped = context.get("shipped_models", {})
    if shipped:
        lines.append("- " + " and ".join(name.upper() for name in shipped) + " copied from the models shipped in `tga/demo/prebuilt/` (trained "
                     "by `tga demo-assets` in " + " and ".join(f"{value:.0f} s" for value in shipped.values())
                     + "); `--train_models` trains them in the run instead")
    lines += ["", f"Wall time of this run: {context['seconds']:.0f} s ({context['reused']} of {context['phases']} phases "
              f"reused from earlier runs; all phases took {context['phase_seconds']:.0f} s when they ran). Every "
              "phase's command is in `commands.sh`.", ""]
    return "\n".join(lines)


def phase_seconds(phases: dict, asset_steps: dict) -> float:
    """The time every phase took when it ran. The assets phase always runs (it skips finished steps), so its own
    record of a rerun is ~0 s: its steps count instead, except models copied from the shipped ones (their seconds are
    the shipped build's training, not this run's)."""
    return (sum(record["seconds"] for name, record in phases.items() if name != "assets")
            + sum(step["seconds"] for step in asset_steps.values() if not step.get("prebuilt")))


def write_report(plan: Plan, out: str, run: dict) -> dict:
    """Collect the metrics of a finished run and write report.json, report.md and the plots into `out`."""
    methods = collect(plan, out)
    with open(os.path.join(run["paths"]["assets_json"]), encoding="utf-8") as handle:
        assets = json.load(handle)
    activation_path = os.path.join(out, "activation", "activation.json")
    activation = None
    if os.path.exists(activation_path):
        with open(activation_path, encoding="utf-8") as handle:
            activation = json.load(handle)
    context = {"dsr_question": assets["dsr_question"], "clip_metrics": assets.get("clip_metrics", {}),
               "llm_metrics": assets.get("llm_metrics", {}), "seconds": run["seconds"],
               "activation": activation and {k: activation.get(k) for k in ("mean_activation_layer", "num_layers",
                                                                            "activated_fraction", "control")}}
    context["method_seconds"] = {  # its training and evaluation; the defences' phases are timed on their own
        method.name: sum(record["seconds"] for name, record in run["phases"].items()
                         if name.split("/")[1:2] == [method.name] and record.get("kind") != "defense")
        / len(plan.seeds) for method in plan.methods}
    context["defenses"] = collect_defenses(plan, out)
    context["defense_seconds"] = {
        name.split("/", 1)[1]: record["seconds"] for name, record in run["phases"].items()
        if record.get("kind") == "defense"}
    context["step_costs"] = step_costs(plan, out)
    context["comparison"] = comparison_rows(methods, context["defenses"], context["step_costs"])
    context["shipped_models"] = {name: step["seconds"] for name, step in assets.get("steps", {}).items()
                                 if step.get("prebuilt")}
    context["phases"] = len(run["phases"])
    context["reused"] = sum(bool(record["cached"]) for record in run["phases"].values())
    context["phase_seconds"] = phase_seconds(run["phases"], assets.get("steps", {}))
    report = {"plan": plan.source, "seeds": list(plan.seeds), "methods": methods, "context": context,
              "phases": {name: {k: record[k] for k in ("seconds", "cached", "commands")}
                         for name, record in run["phases"].items()}}
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    plot_rates(methods, os.path.join(out, "rates.png"))
    plot_layers(methods, "cosine", "cos(image, caption)", os.path.join(out, "cosine.png"))
    plot_layers(methods, "specificity", "specificity", os.path.join(out, "specificity.png"))
    plot_defenses(context["defenses"], os.path.join(out, "defenses.png"))
    plot_comparison(context["comparison"], os.path.join(out, "comparison.png"))
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(_markdown(plan, methods, context))
    return report
