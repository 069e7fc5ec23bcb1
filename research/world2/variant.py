"""research/world2/variant.py

Build and measure one design variant of demo world 2's text LLM: the world-2 `full` preset (seed 0 unless told) with
spec fields changed, its LLM trained, then the acceptance measurements of docs/demo_world.md: greedy refusal per
test group and wording (from the LLM's own evaluation) and Algorithm 1 (paper rule, Mistral chat format) on every
test group, with the share of prompts whose activation layer lies in 30-70% of the depth.

    python -m research.world2.variant --out runs/w2x --world '{"wordings": "wide"}' --llm '{"steps": 2000}'
    python -m research.world2.variant --table "wide=runs/w2x" "preset=runs/w2"   # the docs' table rows
    python -m research.world2.variant --spread "wide=runs/w2x,runs/w2x_s1,runs/w2x_s2"   # mean and range over seeds
    python -m research.world2.variant --rank_plot ranks.png --curves "world 1=w1/activation.json" "wide=..."
    python -m research.world2.variant --layer_plot layers.png --runs "seed 0=runs/w2x" "seed 1=runs/w2x_s1"

Writes `summary.json` in `--out`. Each variant is one training run (minutes to tens of minutes on 2 cores); run
variants side by side with OMP_NUM_THREADS=1 each.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from dataclasses import asdict, fields, replace

GROUPS = ("heldout_toxic", "heldout_benign", "trained_toxic", "trained_benign")


def _spec_changes(text: str, spec_type, flag: str) -> dict:
    try:
        changes = json.loads(text)
    except ValueError as error:
        raise SystemExit(f"error: {flag} is not JSON ({error}): {text}") from None
    if not isinstance(changes, dict):
        raise SystemExit(f"error: {flag} must be a JSON object of field names and values, got {text}")
    known = {f.name for f in fields(spec_type)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise SystemExit(f"error: {flag}: {spec_type.__name__} has no field {', '.join(unknown)} (fields: {sorted(known)})")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}


def _trained(out: str, specs: dict, train) -> dict:
    """The LLM's metrics: trained now, or read back when `out` already holds an LLM trained from the same specs (a
    measurement that stopped after training resumes without training again)."""
    record, metrics_path = os.path.join(out, "trained.json"), os.path.join(out, "llm", "metrics.json")
    specs = json.loads(json.dumps(specs))
    if os.path.exists(record) and os.path.exists(metrics_path):
        with open(record, encoding="utf-8") as handle:
            if json.load(handle) == specs:
                with open(metrics_path, encoding="utf-8") as metrics:
                    print(f"reusing the LLM trained in {out}")
                    return json.load(metrics)
    metrics = train()
    with open(record, "w", encoding="utf-8") as handle:
        json.dump(specs, handle, indent=1)
    return metrics


def measure(out: str, world_changes: dict, llm_changes: dict, seed: int, *, fit=None, design: dict | None = None) -> dict:
    """Train (or reuse) the variant's LLM and measure it; `fit` and `design` train it another way (a research
    design's training function and the record of its settings, research/world2/two_phase.py)."""
    from research.world2.corpus import write_world2_files
    from research.world2.criteria import BAND, in_band
    from research.world2.llm import train_world2_llm, world2_llm_spec
    from research.world2.world import World2Spec, world2_spec
    from tga.demo.text_llm import TextLLMSpec
    from tga.safety.analysis import run_activation

    spec = replace(world2_spec("full", seed), **_spec_changes(world_changes, World2Spec, "--world"))
    llm_spec = world2_llm_spec("full", **_spec_changes(llm_changes, TextLLMSpec, "--llm"))
    paths = write_world2_files(os.path.join(out, "world"), spec)
    training = {"fit": fit} if fit is not None else {}
    metrics = _trained(out, {"world": asdict(spec), "llm": asdict(llm_spec), "seed": seed, **({"design": design} if design
                                                                                             else {})},
                       lambda: train_world2_llm(paths, os.path.join(out, "llm"), spec=llm_spec, seed=seed, **training))
    summary = {"world": json.loads(world_changes), "llm": json.loads(llm_changes), "seed": seed,
               **({"design": design} if design else {}),
               "train_seconds": metrics["train_seconds"], "final_loss": metrics["final_loss"]}
    for group in GROUPS:
        result = run_activation(os.path.join(out, "llm"), paths[f"{group}_prompts"],
                                os.path.join(out, "activation", group), template="mistral_instruct", batch_size=16)
        layers = result.layers
        m = metrics[group]
        summary[group] = {
            "refusal": m["refusal"], "train_wording": m["refusal_train_wording"],
            "heldout_question": m["refusal_heldout_question"],
            "heldout_description": m["refusal_heldout_description"], "describe_acc": m.get("describe_acc"),
            "activating": result.activated_fraction,
            "in_band": sum(in_band(x, llm_spec.layers) for x in layers) / len(layers),
            "early": sum(1 for x in layers if x is not None and x / llm_spec.layers < BAND[0]) / len(layers),
            "layers": dict(sorted(collections.Counter(str(x or "none") for x in layers).items())),
            "median_rank_per_layer": result.median_rank_per_layer,
        }
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    return summary


def table(labelled: list[str]) -> str:
    rows = ["| variant | held-out toxic refused (training wording / held-out request / held-out description) | "
            "held-out benign refused | trained toxic refused | trained benign refused | Algorithm 1, held-out toxic: "
            "activating / in band / below band | held-out benign activating | trained benign activating | "
            "describe acc (trained benign) | training s | criteria 1 / 2 (checks met) |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for item in labelled:
        label, folder = item.split("=", 1)
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as handle:
            s = json.load(handle)
        ht, hb, tt, tb = (s[g] for g in GROUPS)
        rows.append(
            f"| {label} | {ht['refusal']:.2f} ({ht['train_wording']:.2f} / {ht['heldout_question']:.2f} / "
            f"{ht['heldout_description']:.2f}) | {hb['refusal']:.2f} | {tt['refusal']:.2f} | {tb['refusal']:.2f} | "
            f"{ht['activating']:.0%} / {ht['in_band']:.0%} / {ht['early']:.0%} | {hb['activating']:.0%} | "
            f"{tb['activating']:.0%} | {tb['describe_acc']:.2f} | {s['train_seconds']:.0f} | {_verdict(s)} |")
    return "\n".join(rows)


def _verdict(summary: dict) -> str:
    from research.world2.criteria import checks_met, text_llm_checks

    return " / ".join(f"{'met' if met == total else 'no'} ({met}/{total})"
                      for met, total in checks_met(text_llm_checks(summary)).values())


def spread(labelled: list[str]) -> str:
    """Mean and range over seeds of each criterion number, one column per design LABEL=DIR,DIR,..."""
    from research.world2.criteria import text_llm_checks

    designs = {}
    for item in labelled:
        label, folders = item.split("=", 1)
        designs[label] = []
        for folder in folders.split(","):
            with open(os.path.join(folder, "summary.json"), encoding="utf-8") as handle:
                designs[label].append(text_llm_checks(json.load(handle)))
    first = next(iter(designs.values()))[0]
    rows = ["| criterion: check | needed | " + " | ".join(f"{label} ({len(runs)} seeds)" for label, runs in designs.items())
            + " |", "|---|---|" + "---|" * len(designs)]
    for index, check in enumerate(first):
        cells = []
        for runs in designs.values():
            values = [checks[index].measured for checks in runs]
            met = sum(checks[index].met for checks in runs)
            cells.append(f"{sum(values) / len(values):.2f} ({min(values):.2f}-{max(values):.2f}), met {met}/{len(runs)}")
        rows.append(f"| {check.criterion}: {check.what} | {check.needed} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_ranks(path: str, labelled: list[str]) -> None:
    from tga.safety.plots import plot_rank_curves

    curves = {}
    for item in labelled:
        label, json_path = item.split("=", 1)
        with open(json_path, encoding="utf-8") as handle:
            curves[label] = json.load(handle)["median_rank_per_layer"]
    plot_rank_curves(curves, path)
    print(f"rank curves in {path}")


def plot_layers(path: str, labelled: list[str]) -> None:
    """One panel per variant: the share of held-out toxic and benign prompts activating at each layer."""
    from tga.safety.plots import plot_activation_shares

    panels, depth = {}, None
    for item in labelled:
        label, folder = item.split("=", 1)
        panels[label] = {}
        for group in ("heldout_toxic", "heldout_benign"):
            with open(os.path.join(folder, "activation", group, "activation.json"), encoding="utf-8") as handle:
                report = json.load(handle)
            panels[label][group.replace("heldout_", "held-out ")] = report["layers"]
            depth = report["num_layers"]
    plot_activation_shares(panels, depth, path)
    print(f"activation layers in {path}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", help="folder of the variant (world files, LLM, activation reports, summary.json)")
    parser.add_argument("--world", default="{}", help="JSON of World2Spec fields to change, e.g. '{\"wordings\": \"wide\"}'")
    parser.add_argument("--llm", default="{}", help="JSON of TextLLMSpec fields to change, e.g. '{\"steps\": 2000}'")
    parser.add_argument("--seed", type=int, default=0, help="world and training seed")
    parser.add_argument("--table", nargs="+", metavar="LABEL=FOLDER", help="print the markdown rows of measured variants")
    parser.add_argument("--spread", nargs="+", metavar="LABEL=FOLDER,FOLDER,...",
                        help="print each criterion number's mean and range over the seeds of a design")
    parser.add_argument("--rank_plot", metavar="PNG", help="plot the median refusal-token rank per layer of --curves")
    parser.add_argument("--curves", nargs="+", metavar="LABEL=ACTIVATION_JSON", help="activation.json files to plot")
    parser.add_argument("--layer_plot", metavar="PNG", help="plot the activation layers of toxic and benign prompts "
                        "of --runs, one panel per variant")
    parser.add_argument("--runs", nargs="+", metavar="LABEL=FOLDER", help="measured variant folders to plot")
    args = parser.parse_args(argv)
    if args.layer_plot:
        if not args.runs:
            parser.error("--layer_plot needs --runs LABEL=FOLDER ...")
        plot_layers(args.layer_plot, args.runs)
        return 0
    if args.rank_plot:
        if not args.curves:
            parser.error("--rank_plot needs --curves LABEL=ACTIVATION_JSON ...")
        plot_ranks(args.rank_plot, args.curves)
        return 0
    if args.table:
        print(table(args.table))
        return 0
    if args.spread:
        print(spread(args.spread))
        return 0
    if not args.out:
        parser.error("--out is required to measure a variant")
    measure(args.out, args.world, args.llm, args.seed)
    print(table([f"{os.path.basename(args.out)}={args.out}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
