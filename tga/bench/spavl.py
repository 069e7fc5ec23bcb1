"""tga/bench/spavl.py

SPA-VL's test sets in their released Hugging Face layout: the `harm` and `help` parquet files of the `test`
configuration, with the columns `image, question, class1, class2, class3` (harm) and `image, question, ...` (help).
`harm` (265 harmful questions) gives ASR; `help` is judged for over-refusal here, since its paper metric, the win
rate against a reference answer, needs a reference judge model.
"""

from __future__ import annotations

import os

from tga.bench.items import BenchItem, ParquetImage, field
from tga.bench.parquet import parquet_files, read_rows
from tga.errors import DataError

SPLITS = {"spa-vl-harm": "harm", "spa-vl-help": "help"}


def read_spavl(root: str, variant: str = "spa-vl-harm") -> list[BenchItem]:
    """Read the harm or help test split (files named `harm*.parquet` / `help*.parquet` anywhere under `root`)."""
    if variant not in SPLITS:
        raise DataError(f"SPA-VL: unknown variant {variant!r}")
    split = SPLITS[variant]
    items = []
    for path in parquet_files(root, split, f"SPA-VL {split}"):
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        columns = ["question"] + [c for c in ("class1", "class2", "class3") if c in names]
        if split == "harm" and "class1" not in names:
            raise DataError(f"{path}: missing column class1 (has {', '.join(names)})")
        for index, row in enumerate(read_rows(path, columns)):
            label = f"{index} of {os.path.basename(path)}"
            question = field(row, "question", path, label)
            items.append(BenchItem(variant, f"{os.path.basename(path)}/{index}", question, ParquetImage(path, index),
                                   split == "harm", category=str(row.get("class1") or split),
                                   image_type="image", subset=str(row.get("class2") or "")))
    if not items:
        raise DataError(f"SPA-VL {split}: no rows under {root}")
    return items
