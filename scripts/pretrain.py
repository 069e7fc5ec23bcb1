"""scripts/pretrain.py

Stage 1: projector pretraining (vision tower and LLM frozen).

    deepspeed scripts/pretrain.py configs/pretrain/mistral7b_tga.yaml [--flag value ...]

The YAML is optional; flags (LLaVA's names included) override it. See docs/training.md.
"""

import sys

from tga.cli.script_help import print_help_if_asked

if __name__ == "__main__":
    print_help_if_asked("pretrain", sys.argv[1:])  # before torch is imported
    from tga.train.distributed import run_entry_point
    from tga.train.run import run_stage

    run_entry_point("pretrain", lambda argv: run_stage("pretrain", argv), sys.argv[1:])
