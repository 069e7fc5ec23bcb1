"""scripts/finetune.py

Stage 2: instruction tuning (LLM + projector; vision tower frozen).

    deepspeed scripts/finetune.py configs/finetune/mistral7b_tga.yaml [--flag value ...]

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
        run_stage("finetune", sys.argv[1:])
        finish_distributed()
    except TGAError as error:
        print(f"finetune: error: {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))
