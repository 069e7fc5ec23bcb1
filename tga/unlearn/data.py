"""tga/unlearn/data.py

Data adapters for unlearning: the usual public formats become (prompt, response[, image]) pairs. Users pass files;
nothing is downloaded.

Harmful data (`--harmful`), detected per record:
    PKU-SafeRLHF     {prompt, response_0, response_1, is_response_0_safe, is_response_1_safe}: every unsafe
                     response is one harmful pair (the QA variant {prompt, response, is_safe} too)
    plain            {prompt|question|instruction, response|answer|output}
    LLaVA            {id, image?, conversations}: the first human turn and the first answer; with an image this is
                     multimodal unlearning
Normal data (`--normal`): plain pairs, or TruthfulQA ({question, best_answer} JSON/JSONL, or the released CSV with
`Question` / `Best Answer` columns). Refusals (`--refusal`): JSON/JSONL with `response` or `text`, or a .txt file
with one refusal per line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from tga.data.records import parse_record
from tga.data.templates import IMAGE_PLACEHOLDER
from tga.errors import DataError
from tga.records_io import load_records as read_json_records

PROMPT_KEYS = ("prompt", "question", "instruction", "Question")
RESPONSE_KEYS = ("response", "answer", "output", "best_answer", "Best Answer")


@dataclass(frozen=True)
class Pair:
    """One prompt and one response (the first user turn and its answer), with an optional image path."""

    id: str
    prompt: str
    response: str
    image: str | None = None


def _read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    if path.endswith(".csv"):
        with open(path, encoding="utf-8-sig", newline="") as handle:  # a Windows byte-order mark is not a column name
            return [dict(row) for row in csv.DictReader(handle)]
    return read_json_records(path)


def _first(row: dict, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _is_safe(value, where: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"{where}: `{key}` must be true or false")


def _plain_pair(row: dict, row_id: str, where: str) -> Pair:
    prompt, response = _first(row, PROMPT_KEYS), _first(row, RESPONSE_KEYS)
    if prompt is None or response is None:
        raise DataError(f"{where}: needs a prompt ({'/'.join(PROMPT_KEYS)}) and a response ({'/'.join(RESPONSE_KEYS)})")
    if IMAGE_PLACEHOLDER in prompt:
        raise DataError(f"{where}: '<image>' in a text-only prompt; use a LLaVA record with an `image` for that")
    return Pair(row_id, prompt, response)


def pairs_from_row(row: dict, index: int, path: str) -> list[Pair]:
    """The pairs one record contributes (PKU-SafeRLHF: one per unsafe response)."""
    row_id = str(row.get("id", f"#{index}"))
    where = f"record {row_id!r} in {path}"
    if "conversations" in row:
        record = parse_record(row, index, path)
        prompt = record.messages[0].content.replace(IMAGE_PLACEHOLDER, "").strip()
        return [Pair(record.id, prompt, record.messages[1].content.strip(), record.image)]
    if "response_0" in row or "response_1" in row:
        pairs = []
        for k in (0, 1):
            response, key = row.get(f"response_{k}"), f"is_response_{k}_safe"
            if key not in row:
                raise DataError(f"{where}: PKU-SafeRLHF record without `{key}`")
            if not _is_safe(row[key], where, key) and isinstance(response, str) and response.strip():
                pairs.append(_plain_pair({"prompt": row.get("prompt"), "response": response}, f"{row_id}/{k}", where))
        return pairs
    if "is_safe" in row:
        return [] if _is_safe(row["is_safe"], where, "is_safe") else [_plain_pair(row, row_id, where)]
    return [_plain_pair(row, row_id, where)]


def load_pairs(path: str, *, what: str) -> list[Pair]:
    """All pairs of a harmful or normal data file.

    Args:
        path: JSON, JSONL or CSV file in one of the formats of this module.
        what: the option that named the file (for error messages), e.g. "--harmful".

    Returns:
        The pairs in file order; a file that yields none raises DataError.
    """
    pairs = [pair for index, row in enumerate(_read_rows(path)) for pair in pairs_from_row(row, index, path)]
    if not pairs:
        raise DataError(f"{what} {path}: no usable prompt/response pairs (PKU-SafeRLHF files need unsafe responses)")
    return pairs


def load_refusals(path: str) -> list[str]:
    """Refusal responses: a .txt file with one per line, or JSON/JSONL records with `response` or `text`."""
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            raise DataError(f"--refusal: file not found: {path}")
        with open(path, encoding="utf-8-sig") as handle:
            texts = [line.strip() for line in handle if line.strip()]
    else:
        texts = []
        for index, row in enumerate(_read_rows(path)):
            text = _first(row, ("response", "text", "refusal"))
            if text is None:
                raise DataError(f"--refusal {path}: record #{index} has no `response` or `text`")
            texts.append(text)
    if not texts:
        raise DataError(f"--refusal {path}: no refusals")
    return texts
