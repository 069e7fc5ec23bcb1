"""tga/bench/siuo.py

SIUO (safe inputs, unsafe output) generation split in its released layout: `siuo_gen.json`, a list of records
`{question_id, image, question, category, ...}`, with the images in `images/` beside it. Image and question are
each harmless; together they ask for something unsafe, so every item counts as harmful.
"""

from __future__ import annotations

import os

from tga.bench.items import BenchItem, field, find_file, image_in, read_json
from tga.errors import DataError


def read_siuo(root: str) -> list[BenchItem]:
    """Read `siuo_gen.json` (in `root`, or `root/data/`) with its `images/` folder."""
    source = root if os.path.isfile(root) else find_file(root, ("siuo_gen.json", "data/siuo_gen.json"), "SIUO file")
    base = os.path.dirname(os.path.abspath(source))
    folder = next((f for f in (os.path.join(base, "images"), os.path.join(os.path.dirname(base), "images"))
                   if os.path.isdir(f)), os.path.join(base, "images"))
    records = read_json(source)
    items = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{source}: record {index} is not an object")
        label = repr(record.get("question_id", index))
        qid = str(field(record, "question_id", source, label, (str, int)))
        image = image_in(folder, field(record, "image", source, label), source, label)
        items.append(BenchItem("siuo", qid, field(record, "question", source, label), image, True,
                               category=field(record, "category", source, label), image_type="image"))
    return items
