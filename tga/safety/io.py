"""tga/safety/io.py

Small file helpers of the analysis and evaluation tools: reading prompt files, checking every image of an
evaluation before a model is loaded, checking a model folder, and writing JSON reports. Record files and
images go through the project's shared `tga.records_io` and `tga.image_io`, so paths resolve and errors read
the same everywhere. Every failure a user can cause raises a `TGAError` subclass naming the file or option.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tga.errors import ConfigError, DataError
from tga.image_io import open_image
from tga.records_io import load_records

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEXT_FIELDS = ("text", "prompt", "question", "instruction")


def ensure_model_dir(path: str, option: str = "--model") -> str:
    """Check that a model folder exists and looks like a saved HF model.

    Args:
        path: the folder given by the user.
        option: the command-line option it came from, for the error message.

    Returns:
        The path unchanged.

    Raises:
        ConfigError: the folder or its `config.json` is missing.
    """
    if not os.path.isdir(path):
        raise ConfigError(f"{option}: model folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{option}: {path} has no config.json (not a saved Hugging Face model folder)")
    return path


def write_json(path: str, payload: Any) -> None:
    """Write `payload` as indented JSON, creating the parent folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def read_texts(path: str) -> list[str]:
    """Read prompts from a `.txt` file (one per line) or a JSON/JSONL file.

    JSON records may be plain strings or objects with one of the fields `text`, `prompt`, `question` or
    `instruction` (first found wins).

    Raises:
        DataError: the file is missing or empty, or a record has no text field (named by its id or index).
    """
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as handle:
            texts = [line.strip() for line in handle if line.strip()]
    else:
        raw: Any = None
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                raw = json.loads(handle.read() or "null")
        if isinstance(raw, list) and raw and all(isinstance(r, str) for r in raw):
            texts = list(raw)
        else:
            texts = []
            for index, record in enumerate(load_records(path)):
                field = next((f for f in TEXT_FIELDS if isinstance(record.get(f), str)), None)
                if field is None:
                    raise DataError(
                        f"{path}: record {record.get('id', index)} has none of the fields {', '.join(TEXT_FIELDS)}"
                    )
                texts.append(record[field])
    if not texts:
        raise DataError(f"{path}: no prompts found")
    return texts


def check_images(paths: Sequence[str | None]) -> None:
    """Decode every distinct image once before any model is loaded, so a bad file fails fast (None: a text-only item).

    Raises:
        DataError: naming the first missing or unreadable image.
    """
    for path in tqdm([p for p in dict.fromkeys(paths) if p is not None], desc="checking images", unit="image", leave=False):
        open_image(path, os.path.basename(path))
