"""tga/cli/train_cmd.py

`tga pretrain CONFIG.yaml [--flag value ...]` and `tga finetune ...`: the two training stages in one process (the
same code as `deepspeed scripts/pretrain.py` / `scripts/finetune.py`, which are the multi-GPU entry points).
"""

from __future__ import annotations

from tga.train.run import run_stage

HELP = {"pretrain": "stage 1: train the projector (vision tower and LLM frozen)",
        "finetune": "stage 2: instruction tuning of LLM + projector"}


def register(subparsers) -> None:
    for stage, text in HELP.items():
        parser = subparsers.add_parser(stage, help=text, description=f"{text}. Flags override the YAML config.")
        parser.add_argument("config", nargs="?", help="YAML recipe (configs/<stage>/*.yaml)")
        parser.set_defaults(func=lambda args, stage=stage: run_stage(stage, ([args.config] if args.config else [])
                                                                   + args.extra) and 0,
                            accepts_extra=True)
