"""tga/cli/analyze_cmd.py

`tga analyze activation` (the layer where the LLM's safety mechanism activates on toxic text, Algorithm 1 of
the paper), `tga analyze similarity` (per-layer cosine between image-token and caption-text hidden
states, for one or more checkpoints), `tga analyze patching` (where the refusal is decided, causally: activation
patching on matched prompt pairs, and the refusal direction) and `tga analyze patching-pairs` (such pairs from a
prompts file). Thin: the work is in `tga.safety.analysis` and `tga.safety.patching_run`.
"""

from __future__ import annotations

import argparse

from tga.safety.refusal_tokens import DEFAULT_REFUSAL_PHRASES, RULES

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


def _patching(args: argparse.Namespace) -> int:
    from tga.safety.patching_run import run_patching

    report = run_patching(args.model, args.data, args.out, positions=args.positions, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
                          template=args.template, refusal_phrases=args.refusal_tokens, images_path=args.images,
                          image_folder=args.image_folder)
    flips = report["toxic_into_benign"]["flip_share"]
    causal = report["causal_layer"]
    print(f"causal layer: {causal if causal is not None else 'none'} of {report['num_layers']} (first block whose "
          f"toxic state flips >= 50% of {report['num_pairs']} benign prompts into refusals; per block: "
          f"{', '.join(f'{share:.2f}' for share in flips)}); control flips at most "
          f"{max(report['benign_into_benign']['flip_share']):.2f}; clean refusal toxic "
          f"{report['clean_refused']['toxic']:.2f}, benign {report['clean_refused']['benign']:.2f}; report in {args.out}")
    if report.get("image_caption_ratio") is not None:
        print(f"image / caption projection on the refusal direction at the causal layer: {report['image_caption_ratio']:.2f}")
    return 0


def _patching_pairs(args: argparse.Namespace) -> int:
    from tga.records_io import write_records
    from tga.safety.patching_run import patching_pairs

    benign = args.benign
    if args.vocabulary:  # world 2: its held-out benign names, as `tga demo-assets --world 2` lists them
        from tga.records_io import load_records

        benign = [row["name"] for row in load_records(args.vocabulary) if row.get("heldout") and not row.get("harmful")]
    if not benign:
        from tga.demo.world import BENIGN_CONCEPTS

        benign = list(BENIGN_CONCEPTS)
    pairs = patching_pairs(args.data, benign, concept_field=args.concept_field)
    write_records(args.out, pairs)
    print(f"{len(pairs)} pairs -> {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tga analyze activation|similarity`."""
    parser = subparsers.add_parser("analyze", help="safety analyses: activation layer, image-text similarity, patching")
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

    patching = kinds.add_parser("patching", help="where the refusal is decided, causally (activation patching)")
    patching.add_argument("--model", required=True, help="checkpoint folder (Llava: its LLM) or plain causal LM folder")
    patching.add_argument("--data", required=True, help="matched pairs, JSON/JSONL (docs/evaluation.md)")
    patching.add_argument("--positions", choices=["last", "concept"], default="last",
                          help="patch the last prompt token, or every token of the concept (names of equal length)")
    patching.add_argument("--max_new_tokens", type=int, default=16, help="greedy answer length judged for refusal")
    patching.add_argument("--refusal_tokens", nargs="+", default=list(DEFAULT_REFUSAL_PHRASES),
                          help="phrases whose first tokens are the refusal openers")
    patching.add_argument("--template", default=None, help="conversation template (default: the model's own)")
    patching.add_argument("--images", default=None,
                          help="VLM only: JSON/JSONL of {image, caption} projected on the refusal direction beside "
                               "the same scenes given as captions")
    patching.add_argument("--image_folder", default=None, help="folder the --images paths are relative to")
    _add_runtime(patching)
    patching.set_defaults(func=_patching)

    pairs = kinds.add_parser("patching-pairs", help="matched pairs for `analyze patching` from a prompts file")
    pairs.add_argument("--data", required=True, help="prompts with their toxic concept: {text, concept} per record")
    pairs.add_argument("--benign", nargs="+", default=None,
                       help="benign concepts put in the toxic concept's place (default: the demo world's)")
    pairs.add_argument("--vocabulary", default=None,
                       help="world 2's vocabulary.jsonl: its held-out benign names are put in the toxic name's place")
    pairs.add_argument("--concept_field", default="concept", help="the record field naming the toxic concept")
    pairs.add_argument("--out", required=True, help="the pairs JSONL to write")
    pairs.set_defaults(func=_patching_pairs)
