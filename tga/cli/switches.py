"""tga/cli/switches.py

One option style for the whole command line. Training (HfArgumentParser) takes a boolean as `--tga` or `--tga true`
(`false`, `yes`, `no`, `1`, `0` too); `add_switch` gives the `tga` subcommands' on/off options the same behaviour,
so a flag copied between a recipe, a training command and a `tga` command means the same. `ExactParser` takes option
names only as spelled: argparse would otherwise expand a prefix (`--tg` -> `--tga`), as training refuses to.
"""

from __future__ import annotations

import argparse

from transformers.hf_argparser import string_to_bool


class ExactParser(argparse.ArgumentParser):
    """An ArgumentParser without abbreviations; the subcommand parsers it creates are ExactParsers too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A boolean option, off by default: `--flag` or `--flag true` turns it on, `--flag false` leaves it off."""
    parser.add_argument(flag, type=string_to_bool, nargs="?", const=True, default=False, metavar="{true,false}",
                        help=help)
