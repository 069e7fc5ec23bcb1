"""tga/serve/examples.py

The examples under `tga serve`'s page (`--examples DIR`). A demo run folder (`tga demo --out DIR`, or its `assets`
folder) gives the demo world's scenes: one toxic test scene per toxic concept with the DSR question, and held-out
benign scenes with their describe and VQA questions, so that the page works on `make demo`'s output with no data of
one's own. Any other folder gives its images, each with a describe request.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tga.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DESCRIBE = "Describe the image."
MAX_FOLDER_EXAMPLES = 12
BENIGN_PER_SET = 2  # benign scenes taken from each of the demo's describe and VQA test sets


@dataclass(frozen=True)
class Example:
    image: str
    request: str
    label: str


def _assets_json(folder: str) -> str | None:
    for candidate in (os.path.join(folder, "assets", "assets.json"), os.path.join(folder, "assets.json")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _read_json(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ConfigError(f"--examples: the demo's test set {path} is missing (was the run folder moved?)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def demo_examples(assets_json: str) -> list[Example]:
    """The demo world's toxic and benign test scenes named by a `tga demo-assets` summary."""
    with open(assets_json, encoding="utf-8") as handle:
        summary = json.load(handle)
    paths = summary["paths"]
    toxic_folder, image_folder = paths["toxic_test_folder"], paths["image_folder"]
    if not os.path.isdir(toxic_folder):
        raise ConfigError(f"--examples: the demo's toxic scenes {toxic_folder} are missing (was the run folder moved?)")
    examples = []
    for concept in sorted(os.listdir(toxic_folder)):
        images = sorted(f for f in os.listdir(os.path.join(toxic_folder, concept)) if f.endswith(IMAGE_SUFFIXES))
        if images:
            examples.append(Example(os.path.join(toxic_folder, concept, images[0]), summary["dsr_question"],
                                    f"toxic: {concept}"))
    benign = [record for key in ("benign_describe_test", "benign_vqa_test")
              for record in _read_json(paths[key])[:BENIGN_PER_SET]]
    for number, record in enumerate(benign, 1):  # numbered: two scenes may share a question
        examples.append(Example(os.path.join(image_folder, record["image"]), record["question"],
                                f"benign {number}: {record['question']}"))
    return examples


def folder_examples(folder: str) -> list[Example]:
    """The images of a folder (the first `MAX_FOLDER_EXAMPLES` by name), each with a describe request."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise ConfigError(f"--examples: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) and is not a demo "
                          "run folder (no assets/assets.json)")
    return [Example(os.path.join(folder, name), DESCRIBE, name) for name in names[:MAX_FOLDER_EXAMPLES]]


def load_examples(folder: str | None) -> list[Example]:
    """The page's examples from `--examples` (none without it)."""
    if folder is None:
        return []
    if not os.path.isdir(folder):
        raise ConfigError(f"--examples: {folder} is not a folder")
    assets = _assets_json(folder)
    return demo_examples(assets) if assets else folder_examples(folder)
