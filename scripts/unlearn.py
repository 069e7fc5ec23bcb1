"""scripts/unlearn.py

Textual (or multimodal) unlearning of the LLM inside a saved VLM, the multi-GPU entry point of `tga unlearn`:

    deepspeed scripts/unlearn.py configs/unlearn/mistral7b.yaml --model DIR --harmful FILE --normal FILE

The YAML is optional; flags override it. See docs/unlearning.md.
"""

import sys

from tga.cli.script_help import print_help_if_asked

if __name__ == "__main__":
    print_help_if_asked("unlearn", sys.argv[1:])  # before torch is imported
    from tga.train.distributed import run_entry_point
    from tga.unlearn import run_unlearn

    run_entry_point("unlearn", run_unlearn, sys.argv[1:])
