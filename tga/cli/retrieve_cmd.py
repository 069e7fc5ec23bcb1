"""tga/cli/retrieve_cmd.py

`tga retrieve`: fill `retrieved_caption` and `retrieved_topk` of image records from a caption corpus
(see tga/retrieval and docs/retrieval_and_captioning.md). Parses options and prints the summary only.
"""

from __future__ import annotations

import argparse

from tga.cli.switches import add_switch


def register(subparsers) -> None:
    """Add the `retrieve` subcommand."""
    parser = subparsers.add_parser(
        "retrieve",
        help="retrieve corpus texts for each training image (fills retrieved_caption)",
        description="Embed images and a caption corpus with a CLIP model, index the corpus with faiss and store "
        "the top-k texts per record; the record's own image_caption is never returned.",
    )
    parser.add_argument("--data", required=True, help="records file (.json list or .jsonl)")
    parser.add_argument("--image_folder", required=True, help="folder the records' image paths are relative to")
    parser.add_argument("--corpus", required=True, help="caption corpus: .txt (one per line), .jsonl or .json")
    parser.add_argument("--out", required=True, help="output records file (.json or .jsonl)")
    parser.add_argument("--backend", choices=["open_clip", "hf_clip"], default="open_clip", help="CLIP implementation")
    parser.add_argument("--model", default="ViT-L-14", help="open_clip name or local-dir:PATH; HF CLIPModel folder")
    parser.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--model_config", default=None, help="open_clip JSON config registering a custom --model")
    parser.add_argument("--index", choices=["flat", "ivf"], default="flat", help="exact or IVF faiss index")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default ~4 sqrt(corpus size))")
    parser.add_argument(
        "--nprobe", type=int, default=None, help="IVF cells searched per query (default min(nlist, 32))"
    )
    parser.add_argument("--index_path", default=None, help="folder caching corpus embeddings and index")
    parser.add_argument("--top_k", type=int, default=5, help="corpus texts kept per record (retrieved_topk)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch")
    parser.add_argument("--text_batch_size", type=int, default=256, help="corpus texts per embedding call")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="model dtype")
    parser.add_argument("--num_workers", type=int, default=4, help="image-decoding threads")
    add_switch(parser, "--skip_bad_records", help="skip and report unreadable images")
    parser.add_argument("--max_batches", type=int, default=None, help="stop after N batches (rerun to resume)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run retrieval with the parsed options; returns the exit status."""
    from dataclasses import fields

    from tga.cli.job_summary import print_summary
    from tga.retrieval import RetrieveConfig, retrieve_file

    config = RetrieveConfig(**{f.name: getattr(args, f.name) for f in fields(RetrieveConfig)})
    report, duplicates = retrieve_file(config)
    if duplicates:
        print(f"corpus: dropped {duplicates} duplicate captions")
    print_summary(report, {"leak_skipped": "records whose own caption was retrieved and skipped (leak guard)"})
    return 0
