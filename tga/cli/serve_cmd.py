"""tga/cli/serve_cmd.py

`tga serve --model NAME=DIR [--model NAME=DIR ...] [--defense none ecso cmrm adashield] [--examples DIR]`: a page in
the browser where every model answers every request through every listed defence, side by side (docs/serve.md).
Thin: the answering is in `tga.serve.session`, the page in `tga.serve.app`; gradio is imported only when the command
runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress

from tga.defense.dispatch import DEFENSES, add_adashield_args, add_cmrm_args, add_ecso_args
from tga.errors import ConfigError


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(args: argparse.Namespace) -> int:
    from tga.serve.examples import load_examples
    from tga.serve.loading import build_playground

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be 1-65535, got {args.port}")
    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("tga serve needs gradio, which is in the serve extra: pip install -e '.[serve]' "
                          "(make install installs it)")
    examples = load_examples(args.examples)
    playground = build_playground(args)
    from tga.serve.app import Server

    server = Server(playground, host=args.host, port=args.port, examples=examples)
    with server as url:
        print(f"tga serve: columns {', '.join(c.label for c in playground.columns)}; "
              f"judge {args.judge}, {len(examples)} examples")
        if not _is_loopback(args.host):
            print(f"tga serve: listening on {args.host}: anyone who can reach it can use the models (no login)")
        print(f"tga serve: open {url} (Ctrl-C stops)", flush=True)
        server.wait()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tga serve`."""
    parser = subparsers.add_parser("serve", help="red-teaming playground in the browser: models x defences")
    parser.add_argument("--model", required=True, action="append", metavar="NAME=DIR",
                        help="a checkpoint folder and the name its columns show; repeat for more models")
    parser.add_argument("--defense", nargs="+", default=["none"], choices=DEFENSES, metavar="DEFENSE",
                        help="defences to answer through, each in its own column per model: none (as asked), "
                             "ecso, cmrm, adashield (default: none)")
    parser.add_argument("--judge", choices=["keyword", "llm"], default="keyword", help="refusal judge")
    parser.add_argument("--judge_model", default=None, help="local HF chat model folder for --judge llm")
    parser.add_argument("--examples", default=None, metavar="DIR",
                        help="a `tga demo` run folder (its toxic and benign test scenes) or a folder of images")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="answer length limit")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype (default: float32)"
    )
    group = parser.add_argument_group("defence options (docs/evaluation.md#inference-time-defences)")
    add_adashield_args(group)
    add_ecso_args(group)
    add_cmrm_args(group, per_model=True)
    parser.set_defaults(func=_serve)
