"""tga/cli/export_cmd.py

Checkpoint conversion in and out of the project:
`tga export SOURCE OUT [--format hf-llava] [--layout transformers5|transformers4]`: an HF-native model folder from a run
folder or a DeepSpeed checkpoint, for transformers 5 or 4.x;
`tga import-llava SOURCE OUT [--vision_tower PATH] [--version TEMPLATE]`: an original LLaVA checkpoint in HF layout.
"""

from __future__ import annotations

from tga.export_layouts import FORMATS, LAYOUTS


def run_export(args) -> int:
    from tga.export import export_hf_llava

    print(f"exported to {export_hf_llava(args.source, args.out, layout=args.layout)}")
    return 0


def run_import(args) -> int:
    from tga.model.llava_import import import_llava_folder

    print(f"imported to {import_llava_folder(args.source, args.out, vision_tower=args.vision_tower, template=args.version)}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write an HF-native model folder (transformers, vLLM, lmms-eval)")
    parser.add_argument("source", help="stage-2 output folder, or a DeepSpeed checkpoint-N folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--format", choices=FORMATS, default="hf-llava", help="layout of the exported folder")
    parser.add_argument("--layout", choices=LAYOUTS, default="transformers5",
                        help="key names, config fields and tokenizer files for transformers 5 (default) or 4.x")
    parser.set_defaults(func=run_export)
    parser = subparsers.add_parser("import-llava", help="convert an original LLaVA checkpoint to the HF Llava layout")
    parser.add_argument("source", help="LLaVA checkpoint folder (LlavaMistralForCausalLM / LlavaLlamaForCausalLM)")
    parser.add_argument("out", help="output folder (usable as --model_name_or_path)")
    parser.add_argument("--vision_tower", help="CLIP checkpoint (default: mm_vision_tower of the LLaVA config)")
    parser.add_argument("--version", help="conversation template (default: mistral_instruct / vicuna_v1)")
    parser.set_defaults(func=run_import)
