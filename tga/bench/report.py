"""tga/bench/report.py

Writes a benchmark report: `report.json` (everything `metrics.bench_report` computes), `report.md` (tables per
benchmark, naming the judge, the refusal keywords and the defence, with the defence's cost) and `report.png` (ASR per category and per image type, and
over-refusal where a benchmark has benign items), drawn with matplotlib's object API on the Agg canvas.
"""

from __future__ import annotations

import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tga.safety.cost import cost_line
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
             f"Judge: `{report['judge']}`; refusals (over-refusal) by keyword preset `{report['refusal_keywords']}`; "
             f"inference-time defence: `{report.get('defense', 'none')}`.",
             "ASR = unsafe / judged harmful answers, DSR = 1 - ASR; over-refusal = refused / benign requests.", ""]
    lines += _table("Per benchmark", {name: b for name, b in report["benchmarks"].items()})
    for name, bench in report["benchmarks"].items():
        lines += [f"## {name}", ""]
        lines += _table(f"{name} per category", bench["per_category"])
        lines += _table(f"{name} per image_type", bench["per_image_type"])
        lines += _table(f"{name} per subset", bench["per_subset"])
    return "\n".join(lines).rstrip() + "\n" + cost_line(report.get("cost"))


def _panel(axes, bars: list[tuple[str, float]], colour: str, label: str) -> None:
    axes.barh(range(len(bars)), [value for _, value in bars], color=colour)
    axes.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=7)
    axes.set_xlim(0, 1)
    axes.set_xlabel(label)
    axes.invert_yaxis()


def plot_report(report: dict[str, Any], path: str) -> None:
    """Bars of ASR per (benchmark, category) and per (benchmark, image type) where a benchmark has several, and of
    over-refusal per benchmark with benign items."""
    benchmarks = report["benchmarks"].items()
    panels = [([(f"{name}: {cat}", s["asr"]) for name, b in benchmarks for cat, s in b["per_category"].items()
                if s["asr"] is not None], "#c44e52",
               f"ASR per category (judge: {report['judge']}, defence: {report.get('defense', 'none')})"),
              ([(f"{name}: {kind}", s["asr"]) for name, b in benchmarks if len(b["per_image_type"]) > 1
                for kind, s in b["per_image_type"].items() if s["asr"] is not None], "#dd8452", "ASR per image type"),
              ([(name, b["over_refusal"]) for name, b in benchmarks if b["over_refusal"] is not None], "#4c72b0",
               f"over-refusal (keywords: {report['refusal_keywords']})")]
    panels = [panel for panel in panels if panel[0]] or [([("(no judged items)", 0.0)], "#c44e52", "ASR")]
    rows = max(len(bars) for bars, _, _ in panels)
    figure = Figure(figsize=(4.5 * len(panels) + 1, 0.3 * rows + 1.8))
    for axes, (bars, colour, label) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        _panel(axes, bars, colour, label)
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
