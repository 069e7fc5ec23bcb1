"""tga/cli/script_help.py

`--help` of the training scripts (scripts/pretrain.py, scripts/finetune.py, scripts/unlearn.py) without loading
torch. Their flags are HfArgumentParser's over the project's dataclasses and TrainingArguments, and building that
parser imports transformers and torch: about 10 s on 2 cores, for a page of text that changes only with the code.
The pages are generated from the dataclasses into tga/cli/script_help/<script>.txt, the scripts print them, and
tests/test_help.py fails when one is out of date; `python -m tga.cli.script_help` rewrites them.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

SCRIPTS = ("pretrain", "finetune", "unlearn")
HELP_FLAGS = ("-h", "--help")
WIDTH = 100  # fixed, so that the stored page does not depend on the terminal that generated it


def help_path(script: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "script_help", f"{script}.txt")


def print_help_if_asked(script: str, argv: list[str]) -> None:
    """Print the stored help page of `scripts/<script>.py` and exit 0 when `argv` asks for it (as argparse would)."""
    if not any(arg in HELP_FLAGS for arg in argv):
        return
    with open(help_path(script), encoding="utf-8") as handle:
        sys.stdout.write(handle.read())
    sys.exit(0)


def generate_help(script: str) -> str:
    """The help page argparse prints for `scripts/<script>.py --help`, built from the argument dataclasses."""
    from tga.options import OptionParser

    if script == "unlearn":
        from tga.config import TrainingArguments
        from tga.unlearn.config import UnlearnArguments

        classes = (UnlearnArguments, TrainingArguments)
    else:
        from tga.config import ARGUMENT_CLASSES as classes
    parser = OptionParser(classes)
    parser.prog = f"{script}.py"
    parser.formatter_class = functools.partial(argparse.ArgumentDefaultsHelpFormatter, width=WIDTH)
    return parser.format_help()


def write_help_pages() -> None:
    for script in SCRIPTS:
        with open(help_path(script), "w", encoding="utf-8") as handle:
            handle.write(generate_help(script))
        print(f"wrote {help_path(script)}")


if __name__ == "__main__":
    write_help_pages()
