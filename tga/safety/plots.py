"""tga/safety/plots.py

PNG plots of the safety analyses, drawn with matplotlib's object API and the Agg canvas (no pyplot global
state, no display needed): the per-layer refusal-token rank of the activation analysis (of one model, or the
median ranks of several on a relative-depth axis), the activation layers of toxic prompts beside benign controls
(one panel per model), the per-layer
image-versus-caption cosine and specificity of one or more checkpoints, and activation patching with the refusal
direction.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tga.safety.activation import layer_shares


def _save(figure: Figure, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_activation(result: Any, path: str) -> None:
    """Plot the mean best refusal-token rank per layer and the share of prompts per activation layer (toxic prompts,
    and the benign control prompts beside them when the analysis had some).

    Args:
        result: an `ActivationResult`.
        path: the PNG file to write.
    """
    figure = Figure(figsize=(10, 4))
    ranks, hist = figure.subplots(1, 2)
    layers_axis = list(range(1, result.num_layers + 1))
    ranks.plot(layers_axis, result.mean_rank_per_layer, marker="o", label="mean rank")
    ranks.plot(layers_axis, result.median_rank_per_layer, marker=".", linestyle="--", label="median rank")
    ranks.axhline(result.top_k, color="grey", linewidth=0.8, label=f"top-{result.top_k}")
    if result.mean_activation_layer is not None:
        ranks.axvline(
            result.mean_activation_layer,
            color="red",
            linewidth=0.8,
            label=f"mean activation layer {result.mean_activation_layer:.1f}",
        )
    ranks.set_yscale("log")
    ranks.set_xlabel("layer j")
    ranks.set_ylabel("best refusal-token rank in D^j (1 = top)")
    ranks.set_title(f"Refusal-token rank per layer ({result.rule} rule)")
    ranks.legend(fontsize=8)
    groups = {"toxic": result.layers, **({"benign control": result.control_layers} if result.control_layers else {})}
    width = 0.8 / len(groups)
    for index, (label, layers) in enumerate(groups.items()):
        shares = layer_shares(layers, result.num_layers)
        active = sum(x is not None for x in layers) / len(layers)
        hist.bar([j + (index - (len(groups) - 1) / 2) * width for j in layers_axis], shares, width=width,
                 label=f"{label}: {active:.0%} of {len(layers)} activate")
    hist.set_xticks(layers_axis)
    hist.set_xlabel("activation layer")
    hist.set_ylabel("share of prompts")
    hist.set_title("Activation layers")
    hist.legend(fontsize=8)
    _save(figure, path)


def plot_rank_curves(curves: Mapping[str, Sequence[float]], path: str, *, band: tuple[float, float] = (0.3, 0.7)) -> None:
    """Median refusal-token rank per layer of several activation analyses on one relative-depth axis.

    Models of different depths share the x axis (layer j of L at j / L), with the middle `band` shaded, so where each
    LLM's refusal token rises can be compared.

    Args:
        curves: label -> median rank per layer (layer 1 first), e.g. `median_rank_per_layer` of activation.json.
        path: the PNG file to write.
        band: the relative depths to shade.
    """
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots()
    axes.axvspan(*band, color="grey", alpha=0.15, label=f"{band[0]:.0%}-{band[1]:.0%} of depth")
    for label, ranks in curves.items():
        depth = len(ranks)
        axes.plot([(j + 1) / depth for j in range(depth)], ranks, marker="o", label=label)
    axes.axhline(1, color="grey", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xlabel("layer j / L")
    axes.set_ylabel("median refusal-token rank in D^j (1 = top)")
    axes.set_title("Where the refusal token rises")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(figure, path)


def plot_activation_shares(panels: Mapping[str, Mapping[str, Sequence[int | None]]], depth: int, path: str, *,
                           band: tuple[float, float] = (0.3, 0.7)) -> None:
    """Share of prompts per activation layer, prompt groups side by side, one panel per model.

    Benign prompts are the control: a layer where they activate as often as toxic ones holds the answer-start prior,
    not a decision about content.

    Args:
        panels: model label -> prompt group label -> activation layer per prompt (None: never activates).
        depth: the models' number of layers.
        path: the PNG file to write.
        band: the relative depths to shade.
    """
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(3.2 * columns, 2.6 * rows))
    grid = figure.subplots(rows, columns, squeeze=False, sharey=True)
    for axes, (label, groups) in zip(grid.flat, panels.items()):
        width = 0.8 / max(len(groups), 1)
        axes.axvspan(band[0] * depth - 0.5, band[1] * depth + 0.5, color="grey", alpha=0.15)
        for index, (group, layers) in enumerate(groups.items()):
            shares = layer_shares(layers, depth)
            axes.bar([j + (index - (len(groups) - 1) / 2) * width for j in range(1, depth + 1)], shares, width=width,
                     label=group)
        axes.set_title(label, fontsize=9)
        axes.set_xticks(range(1, depth + 1))
        axes.set_xlabel("activation layer", fontsize=8)
    grid.flat[0].set_ylabel("share of prompts")
    grid.flat[0].legend(fontsize=7)
    for axes in list(grid.flat)[len(panels):]:
        axes.set_visible(False)
    _save(figure, path)


def plot_similarity(reports: Mapping[str, dict[str, Any]], path: str) -> None:
    """Plot per-layer cos(image, own caption) and specificity, one line per checkpoint.

    Args:
        reports: checkpoint label -> `similarity_report` output.
        path: the PNG file to write.
    """
    figure = Figure(figsize=(10, 4))
    cosine, specificity = figure.subplots(1, 2)
    for label, report in reports.items():
        layers = list(range(len(report["cosine"])))
        line = cosine.plot(layers, report["cosine"], marker="o", label=f"{label}: own caption")[0]
        if report.get("other_caption_cosine") is not None:
            cosine.plot(
                layers,
                report["other_caption_cosine"],
                linestyle=":",
                color=line.get_color(),
                label=f"{label}: other captions",
            )
        if report.get("specificity") is not None:
            specificity.plot(layers, report["specificity"], marker="o", color=line.get_color(), label=label)
    cosine.set_xlabel("layer (0 = embeddings)")
    cosine.set_ylabel("cos(mean image state, mean caption state)")
    cosine.set_title("Image vs caption hidden states")
    cosine.legend(fontsize=8)
    specificity.axhline(0.0, color="grey", linewidth=0.8)
    specificity.set_xlabel("layer (0 = embeddings)")
    specificity.set_ylabel("cos(own caption) - mean cos(other captions)")
    specificity.set_title("Alignment specificity")
    if specificity.get_legend_handles_labels()[0]:
        specificity.legend(fontsize=8)
    _save(figure, path)


def plot_patching(report: Mapping[str, Any], path: str) -> None:
    """Activation patching per block: the share of pairs whose refusal flips in each direction, and the projections
    on the refusal direction (toxic and benign prompts; image and caption prompts when measured).

    Args:
        report: the `patching.json` payload of `tga.safety.patching_run.run_patching`.
        path: the PNG file to write.
    """
    figure = Figure(figsize=(10, 4))
    flips, projections = figure.subplots(1, 2)
    blocks = list(range(1, report["num_layers"] + 1))
    for direction in ("toxic_into_benign", "benign_into_toxic", "benign_into_benign"):
        flips.plot(blocks, report[direction]["flip_share"], marker="o", label=direction.replace("_", " "))
    if report.get("causal_layer") is not None:
        flips.axvline(report["causal_layer"], color="red", linewidth=0.8, label=f"causal layer {report['causal_layer']}")
    flips.axhline(0.5, color="grey", linewidth=0.8)
    flips.set_ylim(-0.02, 1.02)
    flips.set_xticks(blocks)
    flips.set_xlabel("patched block j (its output at the patched positions)")
    flips.set_ylabel("share of pairs whose refusal flips")
    flips.set_title(f"Activation patching ({report['positions']} positions, {report['num_pairs']} pairs)")
    flips.legend(fontsize=8)
    depth = list(range(0, report["num_layers"] + 1))
    for label, values in report["direction"].items():
        projections.plot(depth, values, marker=".", label=label)
    projections.set_xlabel("layer (0 = embeddings)")
    projections.set_ylabel("mean projection on the refusal direction")
    projections.set_title("Refusal direction (toxic - benign, per layer)")
    projections.legend(fontsize=8)
    _save(figure, path)
