"""tga/cli/caption_cmd.py

`tga caption`: fill `image_caption` of image records with an HF image-to-text model (see tga/caption and
docs/retrieval_and_captioning.md). Parses options and prints the summary only.
"""

from __future__ import annotations

import argparse

from tga.cli.switches import add_switch


def register(subparsers) -> None:
    """Add the `caption` subcommand."""
    parser = subparsers.add_parser(
        "caption",
        help="caption each training image with an image-to-text model (fills image_caption)",
        description="Generate image_caption for records lacking one (or all, with --overwrite) by batched greedy "
        "decoding with any model AutoModelForImageTextToText loads.",
    )
    parser.add_argument("--model", required=True, help="image-to-text model folder (with its processor files)")
    parser.add_argument("--data", required=True, help="records file (.json list or .jsonl)")
    parser.add_argument("--image_folder", required=True, help="folder the records' image paths are relative to")
    parser.add_argument("--out", required=True, help="output records file (.json or .jsonl)")
    parser.add_argument("--prompt", default=None, help="chat models: instruction; others: caption prefix")
    parser.add_argument("--batch_size", type=int, default=8, help="images per generation batch")
    parser.add_argument("--max_new_tokens", type=int, default=40, help="longest caption, in tokens")
    add_switch(parser, "--overwrite", help="recaption records that already have a caption")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype (default: as saved)"
    )
    parser.add_argument("--num_workers", type=int, default=4, help="image-decoding threads")
    add_switch(parser, "--skip_bad_records", help="skip and report unreadable images")
    parser.add_argument("--max_batches", type=int, default=None, help="stop after N batches (rerun to resume)")
    add_switch(parser, "--trust_remote_code", help="run the model repository's own code")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run captioning with the parsed options; returns the exit status."""
    from dataclasses import fields

    from tga.caption import CaptionConfig, caption_file
    from tga.cli.job_summary import print_summary

    config = CaptionConfig(**{f.name: getattr(args, f.name) for f in fields(CaptionConfig)})
    print_summary(caption_file(config), {"empty_caption": "captions the model left empty"})
    return 0
