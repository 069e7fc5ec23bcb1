"""tga/tiny.py

Tiny random assets for the `tiny_cpu` recipes and the tests: a 4-layer Mistral-architecture LLM with the real
Mistral-7B tokenizer (shipped by the `mistral-common` package), a 2-layer CLIP vision tower at 32 px, and a small
generated dataset of coloured shapes in LLaVA JSON (stage-1 captions; stage-2 multi-turn instructions with captions,
retrieved text, toxic flags and text-only records). Everything goes through the same `from_pretrained` folders and
data files as a 7B run; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import torch
from PIL import Image, ImageDraw
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaTokenizer,
    MistralConfig,
    MistralForCausalLM,
)

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
TOXIC_SHAPE = "triangle"  # the tiny world's stand-in for toxic content (excluded from the guide loss)


def mistral_tokenizer_file() -> str:
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


def save_tiny_llm(folder: str, *, seed: int, num_layers: int = 4, hidden_size: int = 64) -> str:
    os.makedirs(folder, exist_ok=True)
    shutil.copy(mistral_tokenizer_file(), os.path.join(folder, "tokenizer.model"))
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, legacy=False)
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    MistralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_vision(folder: str, *, seed: int, image_size: int = 32, patch_size: int = 8) -> str:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(folder)
    return folder


def draw_shape(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    margin = rng.randint(2, size // 4)
    box = (margin, margin, size - margin, size - margin)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, margin), (margin, size - margin), (size - margin, size - margin)], fill=fill)
    return image


def write_tiny_dataset(folder: str, *, seed: int, num_images: int = 48, image_size: int = 32) -> dict[str, str]:
    rng = random.Random(seed)
    images_dir = os.path.join(folder, "images")
    os.makedirs(images_dir, exist_ok=True)
    stage1, stage2 = [], []
    for index in range(num_images):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        name = f"img_{index:04d}.png"
        draw_shape(shape, colour, image_size, rng).save(os.path.join(images_dir, name))
        caption = f"a {colour} {shape}"
        other = f"a {rng.choice(sorted(COLOURS))} {rng.choice(SHAPES)}"
        stage1.append({"id": f"cap-{index}", "image": name, "image_caption": caption,
                       "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": caption}]})
        turns = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": colour}]
        if index % 2:
            turns += [{"from": "human", "value": "And which shape is it?"}, {"from": "gpt", "value": f"It is a {shape}."}]
        stage2.append({"id": f"vqa-{index}", "image": name, "image_caption": caption, "retrieved_caption": other,
                       "toxic": shape == TOXIC_SHAPE, "conversations": turns})
        if index % 4 == 0:
            stage2.append({"id": f"text-{index}", "conversations": [
                {"from": "human", "value": f"Name a colour like {colour}."}, {"from": "gpt", "value": colour}]})
    paths = {"image_folder": images_dir, "stage1": os.path.join(folder, "stage1.json"),
             "stage2": os.path.join(folder, "stage2.json")}
    for key, records in (("stage1", stage1), ("stage2", stage2)):
        with open(paths[key], "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
    return paths


def make_tiny_assets(out_dir: str, *, seed: int = 0, num_images: int = 48) -> dict[str, str]:
    """Write the tiny LLM, vision tower and dataset under `out_dir` (idempotent); returns their paths."""
    paths = {"llm": os.path.join(out_dir, "llm"), "vision": os.path.join(out_dir, "vision")}
    manifest = os.path.join(out_dir, "assets.json")
    if os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as handle:
            return json.load(handle)
    save_tiny_llm(paths["llm"], seed=seed)
    save_tiny_vision(paths["vision"], seed=seed)
    paths.update(write_tiny_dataset(os.path.join(out_dir, "data"), seed=seed, num_images=num_images))
    with open(manifest, "w", encoding="utf-8") as handle:
        json.dump(paths, handle, indent=1)
    return paths
