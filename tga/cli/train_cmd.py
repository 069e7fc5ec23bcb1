"""tga/cli/train_cmd.py

`tga pretrain CONFIG.yaml [--flag value ...]` and `tga finetune ...`: the two training stages in one process (the
same code as `deepspeed scripts/pretrain.py` / `scripts/finetune.py`, which are the multi-GPU entry points).
"""

from __future__ import annotations

HELP = {"pretrain": "stage 1: train the projector (vision tower and LLM frozen)",
        "finetune": "stage 2: instruction tuning of LLM + projector"}


def register(subparsers) -> None:
    for stage, text in HELP.items():
        parser = subparsers.add_parser(stage, help=text, description=f"{text}. Flags override the YAML config.")
        parser.add_argument("config", nargs="?", help="YAML recipe (configs/<stage>/*.yaml)")
        parser.set_defaults(func=lambda args, stage=stage: train(stage, args), accepts_extra=True)


def train(stage: str, args) -> int:
    from tga.train.run import run_stage

    run_stage(stage, ([args.config] if args.config else []) + args.extra)
    return 0
