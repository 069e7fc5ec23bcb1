"""tga/bench/report.py

Writes a benchmark report: `report.json` (everything `metrics.bench_report` computes), `report.md` (tables per
benchmark, naming the judge and the refusal keywords) and `report.png` (ASR per category, and over-refusal where a
benchmark has benign items), drawn with matplotlib's object API on the Agg canvas.
"""

from __future__ import annotations

import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tga.safety.io import write_json

_COLUMNS = ("harmful", "unsafe", "asr", "dsr", "unparsed", "benign", "benign_refused", "over_refusal")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(title: str, groups: dict[str, dict[str, Any]]) -> list[str]:
    if not groups:
        return []
    lines = [f"**{title}**", "", f"| {title.split()[-1]} | " + " | ".join(_COLUMNS) + " |",
             "|---|" + "---:|" * len(_COLUMNS)]
    lines += [f"| {name} | " + " | ".join(_cell(s[c]) for c in _COLUMNS) + " |" for name, s in groups.items()]
    return [*lines, ""]


def report_markdown(report: dict[str, Any]) -> str:
    """The report as markdown."""
    lines = ["# Safety benchmark report", "",
             f"Judge: `{report['judge']}`; refusals (over-refusal) by keyword preset `{report['refusal_keywords']}`.",
             "ASR = unsafe / judged harmful answers, DSR = 1 - ASR; over-refusal = refused / benign requests.", ""]
    lines += _table("Per benchmark", {name: b for name, b in report["benchmarks"].items()})
    for name, bench in report["benchmarks"].items():
        lines += [f"## {name}", ""]
        lines += _table(f"{name} per category", bench["per_category"])
        lines += _table(f"{name} per image_type", bench["per_image_type"])
        lines += _table(f"{name} per subset", bench["per_subset"])
    return "\n".join(lines).rstrip() + "\n"


def plot_report(report: dict[str, Any], path: str) -> None:
    """Bars of ASR per (benchmark, category), and of over-refusal per benchmark with benign items."""
    bars = [(f"{name}: {cat}", s["asr"]) for name, b in report["benchmarks"].items()
            for cat, s in b["per_category"].items() if s["asr"] is not None]
    refusals = [(name, b["over_refusal"]) for name, b in report["benchmarks"].items() if b["over_refusal"] is not None]
    figure = Figure(figsize=(9, 0.3 * (len(bars) + len(refusals)) + 2))
    axes = figure.subplots(1, 2 if refusals else 1, squeeze=False)[0]
    labels = [label for label, _ in bars] or ["(no harmful items)"]
    axes[0].barh(range(len(labels)), [value for _, value in bars] or [0.0], color="#c44e52")
    axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[0].set_xlim(0, 1)
    axes[0].set_xlabel(f"attack success rate (judge: {report['judge']})")
    axes[0].invert_yaxis()
    if refusals:
        axes[1].barh(range(len(refusals)), [value for _, value in refusals], color="#4c72b0")
        axes[1].set_yticks(range(len(refusals)), [label for label, _ in refusals], fontsize=7)
        axes[1].set_xlim(0, 1)
        axes[1].set_xlabel(f"over-refusal (keywords: {report['refusal_keywords']})")
        axes[1].invert_yaxis()
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_report(report: dict[str, Any], out_dir: str) -> None:
    """Write report.json, report.md and report.png into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "report.json"), report)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(report_markdown(report))
    plot_report(report, os.path.join(out_dir, "report.png"))
