"""tga/cli/switches.py

One option style for the whole command line. Training (HfArgumentParser) takes a boolean as `--tga` or `--tga true`
(`false`, `yes`, `no`, `1`, `0` too); `add_switch` gives the `tga` subcommands' on/off options the same behaviour,
so a flag copied between a recipe, a training command and a `tga` command means the same. `ExactParser` takes option
names only as spelled: argparse would otherwise expand a prefix (`--tg` -> `--tga`), as training refuses to.

Nothing here imports transformers: building the parsers is what `tga --help` does, and it must stay fast.
"""

from __future__ import annotations

import argparse

TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")


class ExactParser(argparse.ArgumentParser):
    """An ArgumentParser without abbreviations; the subcommand parsers it creates are ExactParsers too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def string_to_bool(value: str | bool) -> bool:
    """The words HfArgumentParser takes for a boolean (case-insensitive); another word is an argparse error."""
    if isinstance(value, bool):
        return value
    if value.lower() in TRUE_WORDS:
        return True
    if value.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, "
                                     "y/n, 1/0 (case insensitive).")  # training's message, word for word


def add_switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A boolean option, off by default: `--flag` or `--flag true` turns it on, `--flag false` leaves it off."""
    parser.add_argument(flag, type=string_to_bool, nargs="?", const=True, default=False, metavar="{true,false}",
                        help=help)
