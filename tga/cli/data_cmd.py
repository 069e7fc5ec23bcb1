"""tga/cli/data_cmd.py

`tga data make-tiny OUT_DIR`: the tiny random models and generated dataset used by the `tiny_cpu` recipes.
`tga data check DATA.json --image_folder DIR [--tokenizer DIR ...]`: the full data check (tga/data/check.py).
"""

from __future__ import annotations

import json

from tga.cli.switches import add_switch


def make_tiny(args) -> int:
    from tga.tiny import make_tiny_assets

    print(json.dumps(make_tiny_assets(args.out_dir, seed=args.seed, num_images=args.num_images), indent=1))
    return 0


def check(args) -> int:
    from tga.data.check import check_data

    report = check_data(args.data_path, args.image_folder, builder=text_builder(args),
                        decode_images=not args.no_decode, progress=not args.json)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary())
    return 0 if report.ok else 1


def text_builder(args):
    """The SampleBuilder used for the token-length check (None without --tokenizer)."""
    if args.tokenizer is None:
        return None
    from tga.data.dataset import SampleBuilder
    from tga.data.templates import get_template
    from tga.model.sources import check_model_source
    from tga.model.tokenizer import image_token_id, load_tokenizer

    check_model_source("tokenizer", args.tokenizer)
    tokenizer = load_tokenizer(args.tokenizer, model_max_length=args.model_max_length)
    return SampleBuilder(tokenizer=tokenizer, template=get_template(args.template), image_processor=None,
                         image_folder=args.image_folder, image_token_id=image_token_id(tokenizer),
                         num_image_tokens=args.num_image_tokens, max_length=args.model_max_length,
                         use_retrieved=args.use_retrieved_in_prompt, caption_target=args.tga)


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="data utilities")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    tiny = commands.add_parser("make-tiny", help="write the tiny CPU recipe's models and data")
    tiny.add_argument("out_dir", nargs="?", default="runs/tiny/assets", help="folder to write (default: runs/tiny/assets)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random models and the data")
    tiny.add_argument("--num_images", type=int, default=48, help="images (and stage-1 records) to generate")
    tiny.set_defaults(func=make_tiny)
    checker = commands.add_parser("check", help="check every record and image of a data file (exit 1 if any is bad)")
    checker.add_argument("data_path", help="LLaVA JSON/JSONL file(s), comma-separated")
    checker.add_argument("--image_folder", default=None, help="folder the records' image paths are relative to")
    checker.add_argument("--tokenizer", default=None, help="LLM folder: also check token lengths")
    checker.add_argument("--model_max_length", type=int, default=2048, help="training sequence length the token check uses")
    checker.add_argument("--template", default="llava_llama_2", help="conversation template (--version)")
    checker.add_argument("--num_image_tokens", type=int, default=576, help="tokens per image (576: CLIP-L/14 336px)")
    add_switch(checker, "--use_retrieved_in_prompt", help="render R into the prompt (stage 2)")
    add_switch(checker, "--tga", help="also check the caption-only pass")
    add_switch(checker, "--no_decode", help="only check that images exist")
    add_switch(checker, "--json", help="print the full report as JSON")
    checker.set_defaults(func=check)
