"""tga/bench/jailbreakv.py

JailBreakV-28K in its released layout: `JailBreakV_28K.csv` (28,000 rows) or `mini_JailBreakV_28K.csv` (the
280-row mini set) with the columns `id, jailbreak_query, redteam_query, format, policy, image_path, ...`; image paths
are relative to the CSV's folder. The model gets the image with `jailbreak_query`; judges read `redteam_query`.
Reports group by `policy` (category) and `format` (the attack: Template, Persuade, Logic, figstep, query_related, ...).
"""

from __future__ import annotations

import os

from tga.bench.items import BenchItem, field, find_file, image_in, read_csv_rows
from tga.errors import DataError

COLUMNS = ("id", "jailbreak_query", "redteam_query", "format", "policy", "image_path")
CSV_NAMES = {"jailbreakv-mini": "mini_JailBreakV_28K.csv", "jailbreakv": "JailBreakV_28K.csv"}


def read_jailbreakv(root: str, variant: str = "jailbreakv-mini") -> list[BenchItem]:
    """Read the mini or full CSV (in `root` or `root/JailBreakV_28K/`), or a CSV path given directly."""
    if variant not in CSV_NAMES:
        raise DataError(f"JailBreakV-28K: unknown variant {variant!r}")
    name = CSV_NAMES[variant]
    source = root if os.path.isfile(root) else find_file(root, (name, f"JailBreakV_28K/{name}"), f"{variant} CSV")
    folder = os.path.dirname(os.path.abspath(source))
    rows = read_csv_rows(source, COLUMNS)
    items = []
    for line, row in enumerate(rows, start=2):
        label = f"on line {line}"
        rid = field(row, "id", source, label)
        image = image_in(folder, field(row, "image_path", source, label), source, label)
        items.append(BenchItem(variant, rid, field(row, "jailbreak_query", source, label), image, True,
                               category=field(row, "policy", source, label),
                               image_type=field(row, "format", source, label),
                               judged_request=field(row, "redteam_query", source, label)))
    return items
