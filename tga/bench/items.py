"""tga/bench/items.py

The unit every benchmark reader produces: one `BenchItem` per request a model must answer, with the fields the
reports group by (category, image type, subset) and what the judges see. Also the small helpers readers share for
naming a missing file or field in an error, and for images stored inside parquet files.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tga.errors import DataError


@dataclass(frozen=True)
class ParquetImage:
    """An image stored in row `row` of the `column` column of a parquet file (HF `datasets` Image struct)."""

    file: str
    row: int
    column: str = "image"


@dataclass(frozen=True)
class BenchItem:
    """One request of a benchmark.

    Attributes:
        benchmark: the benchmark name (the `--benchmark` value).
        id: the item's id, unique within the benchmark (built from the benchmark's own ids).
        request: the text the model is asked (with the image, if any).
        image: an image file path, a `ParquetImage`, or None for a text-only request.
        harmful: True when complying is the failure (ASR counts it); False for benign requests (over-refusal).
        category: the benchmark's own category or scenario name.
        image_type: how the image carries the request (e.g. SD, TYPO, SD_TYPO for MM-SafetyBench).
        subset: the benchmark's own subset name (e.g. VLGuard's unsafes / safe_unsafes / safe_safes).
        judged_request: the request the judges read; the benchmark's plain harmful question where the model saw a
            disguised one (FigStep's list prompt, MM-SafetyBench's rephrasing), else the request itself.
    """

    benchmark: str
    id: str
    request: str
    image: str | ParquetImage | None
    harmful: bool
    category: str = ""
    image_type: str = ""
    subset: str = ""
    judged_request: str = ""

    @property
    def key(self) -> str:
        return f"{self.benchmark}\t{self.id}"

    @property
    def judge_text(self) -> str:
        return self.judged_request or self.request


def require_file(path: str, what: str) -> str:
    """Return `path` if it is a file, else a DataError naming it and what it should hold."""
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    return path


def find_file(root: str, candidates: Sequence[str], what: str) -> str:
    """The first of `candidates` (paths relative to `root`) that exists; a DataError listing all of them if none."""
    for relative in candidates:
        path = os.path.join(root, relative)
        if os.path.isfile(path):
            return path
    raise DataError(f"{what}: none of {', '.join(candidates)} found under {root}")


def field(record: Mapping[str, Any], name: str, source: str, label: str, kind: type | tuple[type, ...] = str) -> Any:
    """Read a required field of a record: a DataError naming the file, the record and the field if it is missing.

    Args:
        record: the record (dict, CSV row, parquet row).
        name: the field, spelled as the benchmark publishes it.
        source: the file the record came from.
        label: how the record is named in errors (its id or index).
        kind: the accepted Python type(s).
    """
    if name not in record or record[name] is None:
        raise DataError(f"{source}: record {label} has no field `{name}`")
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(f"{source}: record {label} field `{name}` should be {_kind_name(kind)}, got {value!r:.60}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{source}: record {label} field `{name}` is empty")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def require_columns(columns: Sequence[str], needed: Sequence[str], source: str) -> None:
    """A DataError naming the file and the missing columns of a table."""
    missing = [name for name in needed if name not in columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (has {', '.join(columns)})")


def image_in(folder: str, relative: str, source: str, label: str) -> str:
    """The path of a record's image under `folder`, which must exist (named error otherwise)."""
    path = os.path.normpath(os.path.join(folder, relative))
    if os.path.commonpath([os.path.abspath(folder), os.path.abspath(path)]) != os.path.abspath(folder):
        raise DataError(f"{source}: record {label} image {relative!r} resolves outside {folder}")
    if not os.path.isfile(path):
        raise DataError(f"{source}: record {label} image not found: {path}")
    return path


def read_json(source: str, kind: type = list) -> Any:
    """A benchmark's JSON file (a UTF-8 byte-order mark allowed): a non-empty list, or an object where `kind` is dict."""
    with open(source, encoding="utf-8-sig") as handle:
        try:
            data = json.load(handle)
        except ValueError as error:
            raise DataError(f"{source}: not valid JSON ({error})") from error
    if kind is list and (not isinstance(data, list) or not data):
        raise DataError(f"{source}: expected a non-empty JSON list of records")
    if kind is dict and not isinstance(data, dict):
        raise DataError(f"{source}: expected an object mapping question ids to records")
    return data


def read_csv_rows(source: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """A benchmark's CSV file (a UTF-8 byte-order mark allowed) with at least `columns`; its rows, none is an error."""
    with open(source, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        require_columns(reader.fieldnames or [], columns, source)
        rows = list(reader)
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows
