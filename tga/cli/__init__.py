"""tga/cli

The `tga` command. Each subcommand lives in its own module of this package and exposes
`register(subparsers)`, which adds its parser and sets `func` (a callable taking the parsed args).
`SUBCOMMANDS` lists those modules; `main` dispatches and turns `TGAError` into a clean message.
"""

from __future__ import annotations

import importlib
import sys

from tga.cli.switches import ExactParser
from tga.errors import TGAError

# Subcommand modules, in the order `tga --help` shows them. Imported lazily so that `tga --help` stays fast.
SUBCOMMANDS = [
    "tga.cli.train_cmd",
    "tga.cli.data_cmd",
    "tga.cli.retrieve_cmd",
    "tga.cli.caption_cmd",
    "tga.cli.analyze_cmd",
    "tga.cli.evaluate_cmd",
    "tga.cli.calibrate_cmd",
    "tga.cli.chat_cmd",
    "tga.cli.serve_cmd",
    "tga.cli.unlearn_cmd",
    "tga.cli.export_cmd",
    "tga.cli.demo_assets_cmd",
    "tga.cli.demo_cmd",
]


def build_parser() -> ExactParser:
    parser = ExactParser(prog="tga", description="Text-Guided vision-language Alignment toolkit.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        result = args.func(args)
    except TGAError as error:
        print(f"tga {args.command}: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
