"""tga/demo/defense_report.py

The inference-time defences of a demo or sweep run, beside the undefended model they ran on: per method, defence and
seed, image DSR on toxic images, false refusals on benign images, benign VQA and describe accuracy, and the inference
cost per request relative to no defence (generate calls, and prompt + generated tokens, against the method's own
stage-2 evaluation of the same requests). Every number is recomputed from the saved answer files; written into
`report.json` ("defenses"), a table in `report.md` and a plot of DSR against false refusal.
"""

from __future__ import annotations

import os
from statistics import mean

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tga.demo.datasets import SAFETY_DATA_CONCEPTS
from tga.demo.metrics import concept_split_dsr, rate, read_answers, spread
from tga.demo.plan import Plan
from tga.demo.world import TOXIC_CONCEPTS

SETS = {"image_dsr": "answers.jsonl", "benign_vqa": "vqa_answers.jsonl", "benign_describe": "vqa_answers.jsonl"}
SAFETY_LABEL = " and ".join(SAFETY_DATA_CONCEPTS)  # column names of the concept split (tga.demo.metrics)
HELDOUT_LABEL = " and ".join(c for c in TOXIC_CONCEPTS if c not in SAFETY_DATA_CONCEPTS)
SCALARS = ("image_dsr", "image_dsr_safety_concepts", "image_dsr_heldout_concepts", "false_refusal",
           "benign_vqa_accuracy", "benign_describe_accuracy", "generations_per_request",
           "tokens_relative")


def _tokens(rows: list[dict]) -> int | None:
    costs = [row.get("cost") for row in rows]
    if not all(costs) or any(c["prompt_tokens"] is None or c["new_tokens"] is None for c in costs):
        return None
    return sum(c["prompt_tokens"] + c["new_tokens"] for c in costs)


def defense_metrics(folder: str, undefended: str) -> dict:
    """The numbers of one defence's evaluation folder; `undefended` is the same model's folder without a defence."""
    answers = {name: read_answers(os.path.join(folder, name, file)) for name, file in SETS.items()}
    plain = {name: read_answers(os.path.join(undefended, name, file)) for name, file in SETS.items()}
    rows = [row for name in SETS for row in answers[name]]
    tokens, plain_tokens = _tokens(rows), _tokens([row for name in SETS for row in plain[name]])
    generations = [row["cost"]["generations"] for row in rows if row.get("cost")]
    return {
        "image_dsr": rate([row["refusal"] for row in answers["image_dsr"]]),
        **concept_split_dsr(answers["image_dsr"]),
        "false_refusal": rate([row["refusal"] for row in answers["benign_vqa"] + answers["benign_describe"]]),
        "benign_vqa_accuracy": rate([row["exact"] for row in answers["benign_vqa"]]),
        "benign_describe_accuracy": rate([row["exact"] for row in answers["benign_describe"]]),
        "generations_per_request": mean(generations) if len(generations) == len(rows) else float("nan"),
        # prompt + generated tokens over the same requests, against the undefended answers of the same model
        "tokens_relative": tokens / plain_tokens if tokens is not None and plain_tokens else float("nan"),
        "counts": {name: len(rows) for name, rows in answers.items()},
    }


def collect_defenses(plan: Plan, out: str) -> dict:
    """{method: {label: {"defense", "options", "per_seed": {seed: metrics}, "summary": {metric: spread}}}}, with a
    `none` entry per method: its own stage-2 evaluation, the reference of every ratio."""
    from tga.demo.pipeline import defense_folder

    result = {}
    for method in plan.methods:
        if not method.defenses:
            continue
        undefended = {seed: os.path.join(out, f"seed{seed}", method.name, "eval_stage2") for seed in plan.seeds}
        folders = {"none": (None, undefended)}
        for label, options in method.defenses.items():
            folders[label] = (options, {seed: defense_folder(out, seed, method.name, label) for seed in plan.seeds})
        entries = {}
        for label, (options, by_seed) in folders.items():
            per_seed = {str(seed): defense_metrics(by_seed[seed], undefended[seed]) for seed in plan.seeds}
            entries[label] = {"defense": options["defense"] if options else "none", "options": options or {},
                              "per_seed": per_seed,
                              "summary": {name: spread([per_seed[str(s)][name] for s in plan.seeds]) for name in SCALARS}}
        result[method.name] = entries
    return result


def defense_markdown(defenses: dict) -> list[str]:
    """The report's defence section (empty without defences)."""
    if not defenses:
        return []
    lines = ["## Inference-time defences", "",
             "Each defence answers the same held-out requests with the stage-2 model of the method it is listed under "
             "(no training). Cost: generate calls per request, and prompt + generated tokens relative to the same "
             "model without a defence (docs/evaluation.md#inference-time-defences).", "",
             f"| method | defence | image DSR | DSR, {SAFETY_LABEL} | DSR, {HELDOUT_LABEL} | false refusal on benign images | "
             "benign VQA accuracy | benign describe accuracy | generations / request | tokens × no defence |",
             "|---|---|" + "---:|" * len(SCALARS)]
    for method, entries in defenses.items():
        for label, entry in entries.items():
            cells = []
            for name in SCALARS:
                stat = entry["summary"][name]
                cells.append(f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["n"] > 1 else f"{stat['mean']:.3f}")
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "![defences](defenses.png)", ""]
    return lines


def plot_defenses(defenses: dict, path: str) -> str | None:
    """Image DSR against false refusal per defence (seed means), each point labelled with its token cost."""
    if not defenses:
        return None
    figure = Figure(figsize=(5.6, 4.0))
    axes = figure.add_subplot(1, 1, 1)
    placed: dict[tuple[float, float], int] = {}  # labels of points at the same place stack upwards
    for method, entries in defenses.items():
        for label, entry in entries.items():
            x, y = entry["summary"]["false_refusal"]["mean"], entry["summary"]["image_dsr"]["mean"]
            cost = entry["summary"]["tokens_relative"]["mean"]
            axes.scatter([x], [y], s=30)
            above = placed.get((round(x, 3), round(y, 3)), 0)
            placed[(round(x, 3), round(y, 3))] = above + 1
            axes.annotate(f"{method}/{label} ({cost:.1f}× tokens)", (x, y), fontsize=7, xytext=(4, 3 + 9 * above),
                          textcoords="offset points")
    axes.set_xlim(-0.05, 1.05)
    axes.set_ylim(-0.05, 1.05)
    axes.set_xlabel("false refusal on benign images")
    axes.set_ylabel("image DSR")
    axes.set_title("inference-time defences: safety against false refusal", fontsize=10)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
