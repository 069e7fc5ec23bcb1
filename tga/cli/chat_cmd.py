"""tga/cli/chat_cmd.py

`tga chat --model DIR [--image PATH] ["question"]`: answers one question with the tokens streamed to the
terminal, or, without a question, runs an interactive loop about the same image. `--retrieve INDEX` puts the
top corpus text for the image (a `tga retrieve --index_path` folder) into the prompt; `--defense` answers through an
inference-time defence (tga.defense). Thin: the work is in `tga.safety.chat`.
"""

from __future__ import annotations

import argparse

from tga.defense.dispatch import add_defense_args, check_flags
from tga.errors import ConfigError


def _chat(args: argparse.Namespace) -> int:
    from tga.image_io import open_image
    from tga.safety.chat import answer, interactive, load_retriever
    from tga.safety.io import ensure_model_dir
    from tga.safety.loading import load_chat

    ensure_model_dir(args.model)
    check_flags(args)
    image = open_image(args.image, "--image") if args.image else None
    if args.retrieve and image is None:
        raise ConfigError("--retrieve needs --image (retrieval looks up text for the image)")
    if args.retrieve and args.defense != "none":
        raise ConfigError("--retrieve and --defense cannot be combined (a defence builds its own prompts)")
    retriever = None
    if args.retrieve:
        retriever = load_retriever(args.retrieve, device=args.device, model_config=args.retrieval_model_config)
    chat = load_chat(args.model, device=args.device, dtype=args.dtype)
    defense = None
    if args.defense != "none":
        from tga.defense.dispatch import build_defense

        defense = build_defense(args, chat=chat)
    if args.question:
        answer(chat, image, " ".join(args.question), max_new_tokens=args.max_new_tokens, retriever=retriever,
               defense=defense)
        return 0
    print("Ask about the image; 'exit' or Ctrl-D to leave.")
    interactive(chat, image, max_new_tokens=args.max_new_tokens, retriever=retriever, defense=defense)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tga chat`."""
    parser = subparsers.add_parser("chat", help="ask a checkpoint about an image (streamed answer)")
    parser.add_argument("question", nargs="*", help="the question; omit for an interactive session")
    parser.add_argument("--model", required=True, help="checkpoint folder (HF Llava)")
    parser.add_argument("--image", default=None, help="image file (omit for a text-only question)")
    parser.add_argument("--retrieve", default=None, metavar="INDEX", help="retrieval index folder (tga retrieve)")
    parser.add_argument(
        "--retrieval_model_config",
        default=None,
        help="open_clip JSON config the index's embedder was built from (custom models only)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=256, help="answer length limit")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype (default: float32)"
    )
    add_defense_args(parser)
    parser.set_defaults(func=_chat)
