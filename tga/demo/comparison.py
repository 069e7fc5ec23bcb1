"""tga/demo/comparison.py

Every method of a run side by side, the user's question in one table: which method makes the model refuse toxic
images, with how many false refusals, at what cost. Training methods (stage 2 models) and the inference-time defences
(on the model of the method they are listed under) share the columns: image DSR (all toxic concepts, the safety data's
concepts, the held-out ones), describes / recognises the toxic object, text refusal, benign VQA accuracy, false
refusal, training cost per step relative to the first method, inference tokens per request relative to no defence.
A cell a method does not measure (a defence is evaluated on the image sets only) is "n/a". One plot: image DSR
against false refusal, training cost and inference cost.
"""

from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tga.demo.defense_report import HELDOUT_LABEL, SAFETY_LABEL

COLUMNS = (  # (label, metric)
    ("image DSR, stage 1", "image_dsr_stage1"), ("image DSR, stage 2", "image_dsr"),
    (f"DSR, {SAFETY_LABEL}", "image_dsr_safety_concepts"), (f"DSR, {HELDOUT_LABEL}", "image_dsr_heldout_concepts"),
    ("describes the toxic object", "describes_toxic"), ("recognises the toxic object", "recognises_toxic"),
    ("text refusal", "text_refusal"), ("benign VQA accuracy", "benign_vqa_accuracy"),
    ("false refusal", "false_refusal"), ("training cost / step", "training_cost"),
    ("inference tokens / request", "inference_tokens"),
)
RATIOS = {"training_cost", "inference_tokens"}
NOT_MEASURED = {"mean": math.nan, "std": math.nan, "n": 0}


def _ratio(value: float | None, base: float | None) -> dict:
    if value is None or not base:
        return NOT_MEASURED
    return {"mean": value / base, "std": 0.0, "n": 1}


def comparison_rows(methods: dict, defenses: dict, step_costs: dict) -> list[dict]:
    """[{"name", "kind": "training"|"defence", metric: {"mean", "std", "n"}}] for every method and defence.

    Args:
        methods: `tga.demo.report.collect`'s result (summaries per stage).
        defenses: `tga.demo.defense_report.collect_defenses`'s result.
        step_costs: `tga.demo.report.step_costs`'s result (seconds per step; the first method is the reference).
    """
    reference = next(iter(step_costs.values()), {}).get("stage2")
    rows = []
    for name, method in methods.items():
        stage1, stage2 = method["summary"]["stage1"], method["summary"]["stage2"]
        row = {"name": name, "kind": "training", "image_dsr_stage1": stage1["image_dsr"],
               **{metric: stage2[metric] for _, metric in COLUMNS if metric in stage2},
               "training_cost": _ratio(step_costs.get(name, {}).get("stage2"), reference),
               "inference_tokens": {"mean": 1.0, "std": 0.0, "n": 1}}
        rows.append(row)
    for method, entries in defenses.items():
        base = next((row for row in rows if row["name"] == method), None)
        for label, entry in entries.items():
            if label == "none":  # the method's own row above
                continue
            summary = entry["summary"]
            rows.append({"name": f"{method} + {label}", "kind": "defence",
                         **{metric: summary[metric] for _, metric in COLUMNS if metric in summary},
                         "training_cost": base["training_cost"] if base else NOT_MEASURED,
                         "inference_tokens": summary["tokens_relative"]})
    return rows


def _cell(stat: dict | None, ratio: bool) -> str:
    if not stat or not stat.get("n") or stat["mean"] != stat["mean"]:
        return "n/a"
    if ratio:
        return f"{stat['mean']:.2f}×"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["n"] > 1 else f"{stat['mean']:.3f}"


def comparison_markdown(rows: list[dict]) -> list[str]:
    """The report's side-by-side section."""
    if not rows:
        return []
    lines = ["## Every method side by side", "",
             "Training methods by their stage-2 model; defences on the stage-2 model of the method before the `+`. "
             f"DSR on {SAFETY_LABEL} (the concepts of the VLGuard-style safety data) and on {HELDOUT_LABEL} (held "
             "out of it) are the same split for every method. Training cost: seconds per stage-2 step relative to the "
             "first method (compare within one run); inference: prompt + generated tokens per request relative to no "
             "defence.", "",
             "| method | " + " | ".join(label for label, _ in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        lines.append(f"| {row['name']} | " + " | ".join(_cell(row.get(metric), metric in RATIOS)
                                                         for _, metric in COLUMNS) + " |")
    return lines + ["", "![every method](comparison.png)", ""]


def plot_comparison(rows: list[dict], path: str) -> str | None:
    """Stage-2 image DSR (mean ± std over seeds) against false refusal, training cost and inference cost."""
    if not rows:
        return None
    panels = (("false_refusal", "false refusal on benign images"), ("training_cost", "training cost / step (×)"),
              ("inference_tokens", "inference tokens / request (×)"))
    figure = Figure(figsize=(13.5, 4.2))
    colours = [f"C{index % 10}" for index in range(len(rows))]  # one colour per method, the same in every panel
    for column, (metric, label) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), column + 1)
        placed: dict[tuple[float, float], int] = {}  # labels of points at the same place stack upwards
        for row, colour in zip(rows, colours):
            x, y = row.get(metric, NOT_MEASURED), row["image_dsr"]
            if not x.get("n") or x["mean"] != x["mean"]:
                continue
            axes.errorbar([x["mean"]], [y["mean"]], yerr=[y["std"]], fmt="o" if row["kind"] == "training" else "s",
                          markersize=5, capsize=2, color=colour)
            spot = (round(x["mean"], 2), round(y["mean"], 2))
            above = placed.get(spot, 0)
            placed[spot] = above + 1
            axes.annotate(row["name"], (x["mean"], y["mean"]), fontsize=6.5, xytext=(4, 3 + 8 * above),
                          textcoords="offset points", color=colour)
        axes.set_ylim(-0.05, 1.05)
        axes.set_xlabel(label)
        axes.set_ylabel("image DSR, stage 2")
    figure.suptitle("which method refuses toxic images, with how many false refusals, at what cost "
                    "(circles: training methods, squares: inference-time defences)", fontsize=9)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
