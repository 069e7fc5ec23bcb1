"""scripts/pretrain.py

Stage 1: projector pretraining (vision tower and LLM frozen).

    deepspeed scripts/pretrain.py configs/pretrain/mistral7b_tga.yaml [--flag value ...]

The YAML is optional; flags (LLaVA's names included) override it. See docs/training.md.
"""

import logging
import sys

from tga.errors import TGAError
from tga.train.distributed import finish_distributed
from tga.train.run import run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_stage("pretrain", sys.argv[1:])
        finish_distributed()
    except TGAError as error:
        print(f"pretrain: error: {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))
