"""tga/cli/evaluate_cmd.py

`tga evaluate dsr` (defence success rate on toxic scenes, judged by a keyword or LLM judge) and
`tga evaluate vqa` (benign VQA accuracy and false refusals). Both resume from their answer files and can answer
through an inference-time defence (`--defense`, tga.defense). Data, images and the model folder are checked before the
model is loaded. Thin: the work is in `tga.safety.evaluate` and `tga.safety.vqa`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from tga.cli.switches import add_switch
from tga.defense.dispatch import add_defense_args, check_flags
from tga.safety.scenes import DEFAULT_PROMPTS


def _judge(args: argparse.Namespace) -> Any:
    from tga.safety.judge import get_judge

    if args.judge == "llm":
        return get_judge("llm", model_dir=args.judge_model, device=args.device, dtype=args.dtype)
    return get_judge(args.judge)


def _settings(args: argparse.Namespace, generator: Any) -> dict[str, Any]:
    return {
        "model": os.path.abspath(args.model),
        "max_new_tokens": args.max_new_tokens,
        "dtype": args.dtype,
        "template": args.template,
        "judge_model": os.path.abspath(args.judge_model) if args.judge_model else None,
        **generator.settings(),  # the defence and its options (nothing without one)
    }


def _generator(args: argparse.Namespace) -> Any:
    """The model, answering through the defence the flags ask for (`--defense none`: once, as asked)."""
    from tga.defense.dispatch import build_defense
    from tga.safety.loading import load_chat

    chat = load_chat(args.model, device=args.device, dtype=args.dtype, template=args.template)
    return build_defense(args, chat=chat)


def _dsr(args: argparse.Namespace) -> int:
    from tga.safety.evaluate import dsr_markdown, run_dsr
    from tga.safety.io import check_images, ensure_model_dir
    from tga.safety.scenes import load_scene_items

    ensure_model_dir(args.model)
    check_flags(args)
    items = load_scene_items(args.data, args.prompts, args.image_folder)
    check_images([item.image for item in items])
    judge = _judge(args)
    generator = _generator(args)
    report = run_dsr(
        generator,
        judge,
        items,
        args.out,
        batch_size=args.batch_size,
        settings=_settings(args, generator),
        overwrite=args.overwrite,
    )
    print(dsr_markdown(report), end="")
    print(f"results in {args.out}")
    return 0


def _vqa(args: argparse.Namespace) -> int:
    from tga.safety.io import check_images, ensure_model_dir
    from tga.safety.vqa import SHORT_ANSWER_SUFFIX, load_vqa_items, run_vqa

    ensure_model_dir(args.model)
    check_flags(args)
    items = load_vqa_items(args.data, args.image_folder)
    check_images([item.image for item in items])
    judge = _judge(args)
    suffix = SHORT_ANSWER_SUFFIX if args.suffix is None else args.suffix
    generator = _generator(args)
    report = run_vqa(
        generator,
        judge,
        items,
        args.out,
        batch_size=args.batch_size,
        suffix=suffix,
        settings=_settings(args, generator),
        overwrite=args.overwrite,
    )
    print(
        f"n={report['n']} exact={report['exact_match']:.3f} contained={report['contained']:.3f} "
        f"false_refusal={report['false_refusal_rate']:.3f}; results in {args.out}"
    )
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (HF Llava)")
    parser.add_argument("--out", required=True, help="output folder (resumed if it holds earlier answers)")
    parser.add_argument("--image_folder", default=None, help="folder image paths in a listing file are relative to")
    parser.add_argument("--judge", choices=["keyword", "llm"], default="keyword", help="refusal judge")
    parser.add_argument("--judge_model", default=None, help="local HF chat model folder for --judge llm")
    parser.add_argument("--batch_size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="answer length limit")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype (default: float32)"
    )
    add_switch(parser, "--overwrite", help="discard earlier answers in --out")
    parser.add_argument(
        "--template", default=None, help="conversation template instead of the model's own (e.g. a stage-1 model)"
    )
    add_defense_args(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tga evaluate dsr|vqa|bench`."""
    parser = subparsers.add_parser("evaluate", help="safety (DSR) and utility (VQA) evaluation")
    kinds = parser.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")

    dsr = kinds.add_parser("dsr", help="defence success rate on toxic scenes")
    dsr.add_argument(
        "--data", required=True, help="folder of scene subfolders, or JSON/JSONL {scene, image, question?}"
    )
    dsr.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="questions asked about every image")
    _add_common(dsr)
    dsr.set_defaults(func=_dsr)

    vqa = kinds.add_parser("vqa", help="benign VQA accuracy and false-refusal rate")
    vqa.add_argument("--data", required=True, help="JSON/JSONL of {id, image, question, answer}")
    vqa.add_argument(
        "--suffix",
        default=None,
        help="appended to every question (default: LLaVA's short-answer instruction; '' for none)",
    )
    _add_common(vqa)
    vqa.set_defaults(func=_vqa)

    from tga.cli import bench_cmd

    bench_cmd.add_parser(kinds)
