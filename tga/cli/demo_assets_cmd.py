"""tga/cli/demo_assets_cmd.py

`tga demo-assets`: builds (or reuses) the demo world, its tiny CLIP and its tiny text LLM in a folder and prints
where everything is and how well the two pretrained models do. The work is done by `tga.demo.assets.build_assets`; the full
world's models are copied from the shipped ones unless `--train_models` is given.
"""

from __future__ import annotations

import argparse
import json

from tga.cli.switches import add_switch


def run(args: argparse.Namespace) -> int:
    from tga.demo.assets import build_assets

    paths = build_assets(args.out, seed=args.seed, size=args.size, workers=args.workers,
                         train_models=args.train_models)
    with open(paths["assets_json"], encoding="utf-8") as handle:
        summary = json.load(handle)
    clip, llm = summary["clip_metrics"], summary["llm_metrics"]
    for name, step in summary["steps"].items():
        state = "shipped" if step.get("prebuilt") else "reused" if step["cached"] else "built"
        print(f"{name:6s} {state:7s} ({step['seconds']:.1f} s when built)")
    print(f"CLIP zero-shot on held-out images: concept {clip['concept_acc']:.3f} (toxic {clip['toxic_concept_acc']:.3f}), "
          f"colour {clip['colour_acc']:.3f}, position {clip['position_acc']:.3f}, caption R@1 {clip['caption_r1']:.3f}")
    print(f"LLM on held-out text: refusal {llm['text_refusal_rate']:.3f}, benign describe {llm['benign_describe_acc']:.3f}, "
          f"attribute {llm['attribute_acc']:.3f}, false refusals {llm['false_refusal_rate']:.3f}")
    print(f"assets: {paths['assets_json']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-assets", help="build the demo world, its tiny CLIP and its tiny text LLM",
        description="Build (or reuse, when the spec is unchanged) the synthetic world of `make demo`: images and data "
                    "files, a tiny CLIP and a tiny text LLM that refuses to describe toxic scenes.",
    )
    parser.add_argument("--out", required=True, help="assets folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of both trainings")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full demo world or a tiny test one")
    parser.add_argument("--workers", type=int, default=2, help="processes that render images")
    add_switch(parser, "--train_models",
               help="train the CLIP and the LLM even when the shipped ones (tga/demo/prebuilt) match the spec")
    parser.set_defaults(func=run)
