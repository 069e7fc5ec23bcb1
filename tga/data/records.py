"""tga/data/records.py

LLaVA JSON records: loading (JSON list or JSONL) and validation.

A record is `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}` plus the TGA fields
`image_caption` (C), `retrieved_caption` (R) and `toxic` (bool). Validation is cheap (no image decoding) so training
runs it on every record at start; every problem is a `DataError` naming the record id and the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tga.data.templates import IMAGE_PLACEHOLDER, Message
from tga.errors import DataError
from tga.records_io import load_records as read_json_records

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}


@dataclass(frozen=True)
class Record:
    """A validated record, normalised to the project's message type."""

    id: str
    messages: tuple[Message, ...]
    image: str | None = None
    caption: str | None = None
    retrieved: str | None = None
    toxic: bool = False
    system: str | None = None


def check_unicode(text: str, where: str) -> None:
    """JSON can carry lone UTF-16 surrogates (`"\\ud800"`), which no tokenizer accepts: reject them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{where}: text holds an invalid Unicode code point at position {error.start}") from error


def parse_record(raw: object, index: int, source: str) -> Record:
    """Validate one raw record and normalise it; raises DataError naming the record and the file."""
    if not isinstance(raw, dict):
        raise DataError(f"record #{index} in {source}: expected an object, got {type(raw).__name__}")
    record_id = str(raw.get("id", f"#{index}"))
    where = f"record {record_id!r} in {source}"
    image = raw.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise DataError(f"{where}: {len(image)} images; one image per record is supported")
        image = image[0]
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{where}: `image` must be a non-empty string path")
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: missing or empty `conversations`")
    system, messages = None, []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise DataError(f"{where}: turn {position} must be an object with string `from` and `value`")
        speaker = turn["from"]
        if speaker == "system" and position == 0:
            system = turn["value"]
            continue
        role = "user" if speaker in USER_ROLES else "assistant" if speaker in ASSISTANT_ROLES else None
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"{where}: turn {position} is from {speaker!r}; turns must alternate human/gpt from human")
        messages.append(Message(role, turn["value"]))
    if len(messages) < 2:
        raise DataError(f"{where}: needs at least one human turn and one gpt answer")
    for text in [system or "", *(message.content for message in messages)]:
        check_unicode(text, where)
    placeholders = sum(message.content.count(IMAGE_PLACEHOLDER) for message in messages)
    expected_placeholders = 1 if image is not None else 0
    if placeholders != expected_placeholders or (image and IMAGE_PLACEHOLDER not in messages[0].content):
        raise DataError(
            f"{where}: has {'an image' if image else 'no image'} but {placeholders} '<image>' placeholder(s); "
            "an image record needs exactly one, in its first human turn"
        )
    fields = {}
    for key in ("image_caption", "retrieved_caption"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: `{key}` must be a string")
        check_unicode(value or "", where)
        fields[key] = value.strip() if isinstance(value, str) and value.strip() else None
    toxic = raw.get("toxic", False)
    if not isinstance(toxic, bool):
        raise DataError(f"{where}: `toxic` must be true or false")
    return Record(record_id, tuple(messages), image, fields["image_caption"], fields["retrieved_caption"], toxic, system)


def load_records(path: str) -> list[Record]:
    """All records of a file, validated (the first bad record raises)."""
    return [parse_record(raw, index, path) for index, raw in enumerate(read_json_records(path))]


def iter_data_paths(data_path: str) -> Iterator[str]:
    """LLaVA's `--data_path` may list several files separated by commas."""
    for part in data_path.split(","):
        if part.strip():
            yield part.strip()
