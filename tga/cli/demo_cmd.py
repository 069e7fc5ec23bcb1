"""tga/cli/demo_cmd.py

`tga demo` (the built-in safety-transfer demo, `tga/demo/configs/demo.yaml`, shipped with the package) and
`tga sweep PLAN.yaml` (any grid of methods x seeds in the demo world, e.g. `configs/demo/study.yaml`). Both run the
phases of `tga.demo.pipeline`, reusing finished ones, and write the report; `--size`, `--seeds` and `--methods` narrow
a plan without editing it, `--jobs` runs phases side by side, `--dry_run` lists the phases and runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from tga.cli.switches import add_switch

# package data (setup.py), so an installed `tga demo` finds it from any folder
DEFAULT_PLAN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "configs", "demo.yaml")


def narrowed(plan, args: argparse.Namespace):
    """The plan with the command line's --size / --seeds / --methods applied (bases of kept methods stay)."""
    from tga.errors import ConfigError

    changes = {}
    if args.size:
        changes["assets_size"] = args.size
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.methods:
        unknown = sorted(set(args.methods) - {m.name for m in plan.methods})
        if unknown:
            raise ConfigError(f"--methods: {unknown} not in {plan.source} ({[m.name for m in plan.methods]})")
        keep = set(args.methods) | {plan.method(name).base for name in args.methods if plan.method(name).base}
        changes["methods"] = tuple(m for m in plan.methods if m.name in keep)
        changes["stage1_owners"] = tuple(m for m in plan.methods if not m.is_unlearning)
    return dataclasses.replace(plan, **changes)


def run(args: argparse.Namespace) -> int:
    from tga.cli import main
    from tga.demo.pipeline import dry_run_lines, run_plan
    from tga.demo.plan import load_plan
    from tga.demo.report import write_report

    plan = narrowed(load_plan(args.plan), args)
    if args.dry_run:
        print("\n".join(dry_run_lines(plan, args.out, args.train_models)))
        return 0
    result = run_plan(plan, args.out, main, jobs=args.jobs, train_models=args.train_models)
    report = write_report(plan, args.out, result)
    print(open(os.path.join(args.out, "report.md"), encoding="utf-8").read())
    print(f"total wall time {result['seconds']:.0f} s; report in {os.path.join(args.out, 'report.md')} "
          f"({len(report['methods'])} methods x {len(plan.seeds)} seeds)")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _common(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, help="run folder (finished phases in it are reused)")
    parser.add_argument("--size", choices=["full", "tiny"], default=None, help="world size instead of the plan's")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds instead of the plan's")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods of the plan")
    parser.add_argument("--jobs", type=_positive, default=1,
                        help="phases run side by side, each in its own processes with cores/jobs threads; their "
                             "output goes to the phase folder's log.txt (default 1: in this process)")
    add_switch(parser, "--train_models",
               help="train the world's CLIP and text LLM even when the shipped ones match (~12 min)")
    add_switch(parser, "--dry_run",
               help="print the plan, its recipe files, the shipped models used and every phase's commands; run nothing")
    parser.set_defaults(func=run)


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="the built-in safety-transfer demo (world, both stages per method, evaluation, report)",
        description="Build the demo world, train every method of the plan with every seed, evaluate after stage 1 "
                    "and stage 2, and write report.md / report.json with plots. Reruns reuse finished phases.",
    )
    demo.add_argument("--plan", default=DEFAULT_PLAN,
                      help="plan YAML; its recipe paths are relative to it (default: the shipped demo.yaml)")
    _common(demo, "runs/demo")
    sweep = subparsers.add_parser(
        "sweep", help="run a grid of methods x seeds in the demo world from a plan YAML and tabulate it",
        description="Like `tga demo` for any plan (e.g. configs/demo/study.yaml): phases shared between "
                    "configurations (world, models, equal stage-1 runs) run once; reruns resume.",
    )
    sweep.add_argument("plan", help="plan YAML")
    _common(sweep, "runs/sweep")
