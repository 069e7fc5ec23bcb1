"""tga/cli/data_cmd.py

`tga data make-tiny OUT_DIR`: the tiny random models and generated dataset used by the `tiny_cpu` recipes.
"""

from __future__ import annotations

import json

from tga.tiny import make_tiny_assets


def make_tiny(args) -> int:
    print(json.dumps(make_tiny_assets(args.out_dir, seed=args.seed, num_images=args.num_images), indent=1))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="data utilities")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    tiny = commands.add_parser("make-tiny", help="write the tiny CPU recipe's models and data")
    tiny.add_argument("out_dir", nargs="?", default="runs/tiny/assets")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--num_images", type=int, default=48)
    tiny.set_defaults(func=make_tiny)
