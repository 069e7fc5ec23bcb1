"""tga/bench/project.py

This project's own evaluation sets as benchmarks: a scenes folder or listing (the input of `tga evaluate dsr`, see
`tga.safety.scenes`), and a demo assets folder (`tga demo-assets --out DIR`), whose test sets are its toxic test
images (asked the demo's describe question), its toxic scenes given in words, and its benign describe requests on
held-out images (over-refusal).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from tga.bench.items import BenchItem, field, find_file, image_in
from tga.errors import DataError
from tga.records_io import load_records, record_label
from tga.safety.scenes import DEFAULT_PROMPTS, load_scene_items


def read_scenes(data: str, prompts: Sequence[str] = DEFAULT_PROMPTS, benchmark: str = "scenes") -> list[BenchItem]:
    """Every (scene, image, prompt) of a scenes folder or listing file as a harmful item (category: the scene)."""
    return [BenchItem(benchmark, f"{item.image_id}\t{item.prompt}", item.prompt, item.image, True, category=item.scene,
                      image_type="image" if item.image is not None else "text") for item in load_scene_items(data, prompts)]


def read_demo(root: str) -> list[BenchItem]:
    """The test sets of a demo assets folder (`assets.json` names their files)."""
    summary_path = find_file(root, ("assets.json",), "demo assets summary")
    with open(summary_path, encoding="utf-8") as handle:
        summary = json.load(handle)
    paths = field(summary, "paths", summary_path, "assets", dict)
    question = field(summary, "dsr_question", summary_path, "assets")
    toxic_folder = field(paths, "toxic_test_folder", summary_path, "paths")
    if not os.path.isdir(toxic_folder):  # a moved assets folder: look beside assets.json
        toxic_folder = os.path.join(root, "images", "toxic_test")
    items = read_scenes(toxic_folder, [question], benchmark="demo")
    items = [BenchItem("demo", f"toxic_image/{i.id}", i.request, i.image, True, category=i.category,
                       image_type="image", subset="toxic_image") for i in items]
    text_file = _moved(field(paths, "toxic_text_prompts", summary_path, "paths"), root)
    for index, record in enumerate(load_records(text_file)):
        label = record_label(record, index)
        items.append(BenchItem("demo", f"toxic_text/{field(record, 'id', text_file, label)}",
                               field(record, "text", text_file, label), None, True,
                               category=field(record, "scene", text_file, label), image_type="text",
                               subset="toxic_text"))
    benign_file = _moved(field(paths, "benign_describe_test", summary_path, "paths"), root)
    image_folder = field(paths, "image_folder", summary_path, "paths")
    if not os.path.isdir(image_folder):
        image_folder = os.path.join(root, "images")
    for index, record in enumerate(load_records(benign_file)):
        label = record_label(record, index)
        items.append(BenchItem("demo", f"benign_describe/{field(record, 'id', benign_file, label)}",
                               field(record, "question", benign_file, label),
                               image_in(image_folder, field(record, "image", benign_file, label), benign_file, label),
                               False, category="benign", image_type="image", subset="benign_describe"))
    if not items:
        raise DataError(f"{root}: the demo assets hold no test items")
    return items


def _moved(path: str, root: str) -> str:
    """A file named in assets.json, or the same relative place under `root` if the folder was moved."""
    if os.path.isfile(path):
        return path
    for relative in (os.path.join("data", os.path.basename(path)), os.path.basename(path)):
        if os.path.isfile(os.path.join(root, relative)):
            return os.path.join(root, relative)
    raise DataError(f"demo assets: file not found: {path}")
