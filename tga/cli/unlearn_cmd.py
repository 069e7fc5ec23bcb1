"""tga/cli/unlearn_cmd.py

`tga unlearn --model DIR --harmful harmful.jsonl --normal normal.jsonl [--refusal refusals.jsonl] [config.yaml]
[--flag value ...]`: textual (or, with LLaVA image records, multimodal) unlearning of the LLM inside a saved VLM.
The same code runs under `deepspeed scripts/unlearn.py ...`. Options: tga/unlearn/config.py and docs/unlearning.md.
"""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from tga.unlearn import run_unlearn

    # Everything is passed through: the YAML path may stand anywhere (tga.config.config_argv finds it), and argparse
    # would otherwise take the value of an unknown flag (`--model DIR`) for a positional argument.
    run_unlearn(args.extra)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tga unlearn`."""
    parser = subparsers.add_parser(
        "unlearn", help="textual unlearning baseline (gradient ascent + mismatch + KL to the original)",
        description="Unlearn harmful responses from the LLM of a saved VLM (vision tower and projector frozen). "
        "Required: --model DIR --harmful FILE --normal FILE. Optional: --refusal FILE, --image_folder DIR, "
        "--w_fgt 0.5 --w_rdn 1 --w_nor 1 --forget_ceiling 100, --lora_enable true, any HF TrainingArguments flag "
        "(--output_dir, --max_steps 1000, --learning_rate 2e-6, --per_device_train_batch_size 2, --deepspeed ...). "
        "A YAML file (configs/unlearn/*.yaml) may hold the same options; flags override it.",
    )
    parser.set_defaults(func=_run, accepts_extra=True)
