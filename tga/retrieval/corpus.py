"""tga/retrieval/corpus.py

Loading the caption corpus that texts are retrieved from: a `.txt` file (one caption per line), a `.jsonl`
file (objects with a `caption` or `text` field, or plain strings) or a `.json` list of the same. Captions are
stripped, blank ones dropped, and exact duplicates removed (they would only fill the top-k with copies).
"""

from __future__ import annotations

import json
import os
from typing import Any

from tga.errors import DataError

TEXT_FIELDS = ("caption", "text")


def _text_of(item: Any, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for name in TEXT_FIELDS:
            if isinstance(item.get(name), str):
                return item[name]
    raise DataError(f"{where}: expected a string or an object with a 'caption' or 'text' string field")


def load_corpus(path: str) -> tuple[list[str], int]:
    """Read, clean and de-duplicate a caption corpus.

    Args:
        path: `.txt`, `.jsonl` or `.json` corpus file.

    Returns:
        (the unique non-empty captions in file order, how many duplicates were dropped).
    """
    if not os.path.isfile(path):
        raise DataError(f"corpus file not found: {path}")
    with open(path, encoding="utf-8-sig") as handle:  # a Windows byte-order mark is not corpus text
        content = handle.read()
    if path.endswith(".jsonl"):
        raw = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                try:
                    raw.append(_text_of(json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from error
    elif path.endswith(".json"):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from error
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of captions")
        raw = [_text_of(item, f"{path}: item #{number}") for number, item in enumerate(items)]
    else:
        raw = content.splitlines()
    texts = [" ".join(text.split()) for text in raw]  # one line per caption: collapse inner newlines/tabs
    unique = list(dict.fromkeys(text for text in texts if text))
    if not unique:
        raise DataError(f"{path}: the corpus holds no captions")
    return unique, sum(1 for text in texts if text) - len(unique)
