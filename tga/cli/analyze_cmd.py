"""tga/cli/analyze_cmd.py

`tga analyze activation` (the layer where the LLM's safety mechanism activates on toxic text, Algorithm 1 of
the paper) and `tga analyze similarity` (per-layer cosine between image-token and caption-text hidden
states, for one or more checkpoints). Thin: the work is in `tga.safety.analysis`.
"""

from __future__ import annotations

import argparse

from tga.safety.activation import DEFAULT_REFUSAL_PHRASES, RULES

CONTROL_WARNING = 0.2  # share of benign control prompts activating above which the layer is suspect


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for the JSON report and PNG plot")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype (default: float32)"
    )


def _activation(args: argparse.Namespace) -> int:
    from tga.safety.analysis import run_activation

    result = run_activation(
        args.model,
        args.data,
        args.out,
        rule=args.rule,
        top_k=args.top_k,
        refusal_phrases=args.refusal_tokens,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        template=args.template,
        control_path=args.control,
    )
    layer = "none" if result.mean_activation_layer is None else f"{result.mean_activation_layer:.2f}"
    print(
        f"mean activation layer: {layer} ({result.activated_fraction:.0%} of {len(result.layers)} prompts "
        f"activate, {result.rule} rule); report in {args.out}"
    )
    if result.control_layers:
        share = result.control_activated_fraction
        print(f"control: {share:.0%} of {len(result.control_layers)} benign prompts activate")
        if share >= CONTROL_WARNING:
            print(f"warning: benign control prompts activate too ({share:.0%}): the activation layer may hold the "
                  "answer-start prior (the opening of every answer) rather than a safety decision; compare the two "
                  "histograms in activation.png before choosing --tga_layers from it")
    return 0


def _similarity(args: argparse.Namespace) -> int:
    from tga.safety.analysis import run_similarity

    reports = run_similarity(
        args.model,
        args.data,
        args.out,
        image_folder=args.image_folder,
        question=args.question,
        labels=args.label,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        template=args.template,
    )
    for label, report in reports.items():
        cosine = ", ".join(f"{c:.2f}" for c in report["cosine"])
        print(f"{label}: cos(image, caption) per layer = [{cosine}]")
    print(f"report in {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tga analyze activation|similarity`."""
    parser = subparsers.add_parser("analyze", help="safety analyses: activation layer, image-text similarity")
    kinds = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    activation = kinds.add_parser("activation", help="layer where refusal tokens first rise (logit lens)")
    activation.add_argument("--model", required=True, help="checkpoint folder (Llava) or plain causal LM folder")
    activation.add_argument("--data", required=True, help="toxic prompts: .txt lines or JSON/JSONL with `text`")
    activation.add_argument(
        "--rule", choices=RULES, default="paper", help="paper: refusal token top-1 in D^j; released: within the top K"
    )
    activation.add_argument("--top_k", type=int, default=5, help="K of the released rule")
    activation.add_argument(
        "--refusal_tokens",
        nargs="+",
        default=list(DEFAULT_REFUSAL_PHRASES),
        help="phrases whose first tokens count as refusal tokens",
    )
    activation.add_argument(
        "--template", default=None, help="conversation template the prompts are asked in (default: the model's own)"
    )
    activation.add_argument(
        "--control",
        default=None,
        help="benign prompts (same formats as --data) analysed the same way: a layer where they activate as well "
        "holds the answer-start prior, not a safety decision",
    )
    _add_runtime(activation)
    activation.set_defaults(func=_activation)

    similarity = kinds.add_parser("similarity", help="per-layer cos(image states, caption states)")
    similarity.add_argument(
        "--model",
        required=True,
        action="append",
        help="checkpoint folder; repeat to compare (e.g. before and after TGA)",
    )
    similarity.add_argument("--label", action="append", help="label per --model (default: folder names)")
    similarity.add_argument("--data", required=True, help="JSON/JSONL of {image, caption, scene?}")
    similarity.add_argument("--image_folder", default=None, help="folder image paths are relative to")
    similarity.add_argument("--question", default="Describe this image.", help="user text beside each image")
    similarity.add_argument("--template", default=None, help="conversation template instead of each model's own")
    _add_runtime(similarity)
    similarity.set_defaults(func=_similarity)
