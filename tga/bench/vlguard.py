"""tga/bench/vlguard.py

The VLGuard test set in its released layout: `test.json`, a list of records `{id, image, safe, instr-resp,
harmful_category?, harmful_subcategory?}` with the images under `test/` (image paths are relative to that folder).
It splits into the three subsets the VLGuard evaluation reports: `unsafes` (an unsafe image with its instruction),
`safe_unsafes` (a safe image with an unsafe instruction) and `safe_safes` (a safe image with a safe instruction,
which measures over-refusal).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tga.bench.items import BenchItem, field, find_file, image_in, read_json
from tga.errors import DataError

SUBSETS: tuple[str, ...] = ("unsafes", "safe_unsafes", "safe_safes")
_INSTRUCTION_KEY = {"unsafes": "instruction", "safe_unsafes": "unsafe_instruction", "safe_safes": "safe_instruction"}


def read_vlguard(root: str, subsets: Sequence[str] = SUBSETS) -> list[BenchItem]:
    """Read VLGuard's test split.

    Args:
        root: the folder holding `test.json` and `test/` (or the path of `test.json`; images are then looked up in
            `test/` beside it, else beside the file).
        subsets: which of unsafes, safe_unsafes, safe_safes to include.
    """
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise DataError(f"VLGuard: unknown subset(s) {', '.join(unknown)} (choose from {', '.join(SUBSETS)})")
    source = root if os.path.isfile(root) else find_file(root, ("test.json",), "VLGuard test file")
    base = os.path.dirname(os.path.abspath(source))
    folder = os.path.join(base, "test") if os.path.isdir(os.path.join(base, "test")) else base
    records = read_json(source)
    items = []
    for index, record in enumerate(records):
        label = repr(record.get("id", index)) if isinstance(record, dict) else str(index)
        if not isinstance(record, dict):
            raise DataError(f"{source}: record {label} is not an object")
        rid = str(field(record, "id", source, label, (str, int)))
        safe = field(record, "safe", source, label, bool)
        pairs = field(record, "instr-resp", source, label, list)
        image = image_in(folder, field(record, "image", source, label), source, label)
        category = record.get("harmful_category") or ("safe" if safe else "")
        wanted = ("safe_unsafes", "safe_safes") if safe else ("unsafes",)
        for subset in (s for s in wanted if s in subsets):
            key = _INSTRUCTION_KEY[subset]
            texts = [p[key] for p in pairs if isinstance(p, dict) and isinstance(p.get(key), str)]
            if not texts:
                raise DataError(f"{source}: record {label} has no `instr-resp` entry with `{key}` ({subset} subset)")
            for number, text in enumerate(texts):
                suffix = f"#{number}" if len(texts) > 1 else ""
                items.append(BenchItem("vlguard", f"{subset}/{rid}{suffix}", text, image, subset != "safe_safes",
                                       category=str(category), image_type="safe_image" if safe else "unsafe_image",
                                       subset=subset))
    return items
