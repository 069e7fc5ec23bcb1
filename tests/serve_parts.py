"""What the `tga serve` tests share: the command's flags parsed by its own parser, and tiny saved VLM folders."""

from __future__ import annotations

import argparse

import torch

from tga.cli import serve_cmd
from tga.model.tokenizer import load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm
from tga.tiny import make_tiny_assets

NEW_TOKENS = 8
REQUEST = "Describe the image."


def serve_args(*argv: str) -> argparse.Namespace:
    """`tga serve`'s flags parsed by its own parser."""
    parser = argparse.ArgumentParser()
    serve_cmd.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def tiny_model_folders(root) -> tuple[dict[str, str], dict[str, str]]:
    """Two tiny random VLM folders `a` and `b` (different weights) under `root`, and the tiny assets they come from."""
    assets = make_tiny_assets(str(root / "assets"), seed=0, num_images=4)
    tokenizer = load_tokenizer(assets["llm"])
    models = {}
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        model = build_vlm(assets["llm"], assets["vision"], tokenizer, template="llava_llama_2")
        for part in (model, tokenizer, load_image_processor(assets["vision"])):
            part.save_pretrained(root / name)
        models[name] = str(root / name)
    return models, assets
