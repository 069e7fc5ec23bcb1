"""scripts/unlearn.py

Textual (or multimodal) unlearning of the LLM inside a saved VLM, the multi-GPU entry point of `tga unlearn`:

    deepspeed scripts/unlearn.py configs/unlearn/mistral7b.yaml --model DIR --harmful FILE --normal FILE

The YAML is optional; flags override it. See docs/unlearning.md.
"""

import logging
import sys

from tga.errors import TGAError
from tga.train.distributed import finish_distributed
from tga.unlearn import run_unlearn

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_unlearn(sys.argv[1:])
        finish_distributed()
    except TGAError as error:
        print(f"unlearn: error: {error}", file=sys.stderr)
        sys.exit(2)
