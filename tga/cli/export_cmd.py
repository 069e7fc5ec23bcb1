"""tga/cli/export_cmd.py

`tga export SOURCE OUT [--format hf-llava]`: an HF-native model folder from a run folder or a DeepSpeed checkpoint.
"""

from __future__ import annotations

from tga.export import FORMATS, export_hf_llava


def run(args) -> int:
    print(f"exported to {export_hf_llava(args.source, args.out)}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write an HF-native model folder (transformers, vLLM, lmms-eval)")
    parser.add_argument("source", help="stage-2 output folder, or a DeepSpeed checkpoint-N folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--format", choices=FORMATS, default="hf-llava")
    parser.set_defaults(func=run)
