"""tga/records_io.py

Reading and writing LLaVA record files, and the resumable sidecar that long record-filling jobs
(`tga retrieve`, `tga caption`) append to. Records files are a JSON list (`.json`) or one JSON object per
line (`.jsonl`); the final file is written under a temporary name and renamed, so a reader never sees half a
file. The sidecar `<out>.partial.jsonl` starts with a header line (what produced the results) followed by one
line per finished record, keyed by the record's position and id, so a rerun after a kill continues where it
stopped and a rerun with other settings or data is refused instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from tga.errors import ConfigError, DataError

PARTIAL_SUFFIX = ".partial.jsonl"


def load_records(path: str) -> list[dict[str, Any]]:
    """Read LLaVA records from a JSON list file or a JSONL file.

    Args:
        path: a `.json` file holding a list of objects, or a `.jsonl` file with one object per line.

    Returns:
        The records, in file order.
    """
    if not os.path.isfile(path):
        raise DataError(f"records file not found: {path}")
    try:
        # utf-8-sig: a byte-order mark (common from Windows tools) is read as the start of the file, not as text.
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {error.start}); re-encode the file") from error
    if path.endswith(".jsonl"):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from error
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from error
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records (or use a .jsonl file)")
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record #{number} is not a JSON object")
    return records


def write_records(path: str, records: Iterable[dict[str, Any]]) -> None:
    """Write records atomically: JSONL if `path` ends with `.jsonl`, else an indented JSON list.

    Args:
        path: destination file; its folder is created if needed.
        records: the records to write.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            json.dump(list(records), handle, ensure_ascii=False, indent=2)
            handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the whole new one


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (used to tie partial results to the exact input)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_signature(path: str) -> str:
    """Cheap identity of a (large) file: name, size and modification time, so caches notice a retrained model."""
    stat = os.stat(path)
    return f"{os.path.basename(path)}:{stat.st_size}:{int(stat.st_mtime)}"


def record_label(record: dict[str, Any], index: int) -> str:
    """How errors name a record: its id, or its position when it has none."""
    return f"id {record['id']!r}" if "id" in record else f"#{index}"


class PartialResults:
    """The append-only sidecar of finished per-record results of one job.

    Each result line is `{"index": i, "id": id, ...payload}`. Opening an existing sidecar checks that its
    header equals `header` (else `ConfigError`) and drops a last line cut short by a kill.

    Args:
        path: the sidecar file (normally `<out>` + `.partial.jsonl`).
        header: JSON-able description of what produces the results (options, model, input hash).
    """

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self.path = path
        self.header = json.loads(json.dumps(header))  # normalise tuples etc. to what JSON reads back
        self.results: dict[int, dict[str, Any]] = {}
        if os.path.exists(path):
            self._read()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._append_lines([{"header": self.header}])

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            lines = handle.readlines()
        good_bytes = 0
        for number, line in enumerate(lines, start=1):
            try:
                if not line.endswith("\n"):
                    raise ValueError("line cut short")
                entry = json.loads(line)
            except ValueError as error:
                if number == len(lines):  # a kill mid-write leaves a partial last line: drop it
                    with open(self.path, "rb+") as handle:
                        handle.truncate(good_bytes)
                    break
                raise DataError(
                    f"{self.path}:{number}: corrupt partial-results line ({error}); delete the file"
                ) from error
            good_bytes += len(line.encode("utf-8"))
            if number == 1:
                self._check_header(entry.get("header") if isinstance(entry, dict) else None)
            else:
                self.results[entry["index"]] = entry
        if good_bytes == 0:  # empty, or killed while writing the header
            self._append_lines([{"header": self.header}])

    def _check_header(self, previous: Any) -> None:
        if not isinstance(previous, dict):
            raise DataError(f"{self.path}: not a partial-results file (no header line); delete it")
        if previous != self.header:
            changed = sorted(k for k in set(previous) | set(self.header) if previous.get(k) != self.header.get(k))
            raise ConfigError(
                f"{self.path} holds results made with different settings or data ({', '.join(changed)}); "
                "rerun with the same options, or delete it to start over"
            )

    def _append_lines(self, entries: list[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())  # durable before the job moves on: a kill loses at most one batch

    def finished(self, index: int, record: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result for record `index`, or None; a stored id that differs is a `DataError`."""
        entry = self.results.get(index)
        if entry is not None and entry.get("id") != record.get("id"):
            raise DataError(
                f"{self.path}: record #{index} has id {record.get('id')!r} but the partial results hold "
                f"{entry.get('id')!r}; the input changed, delete the partial file"
            )
        return entry

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append finished results (each with `index` and `id`) and make them durable."""
        self._append_lines(entries)
        for entry in entries:
            self.results[entry["index"]] = entry

    def remove(self) -> None:
        """Delete the sidecar once the final file is in place."""
        if os.path.exists(self.path):
            os.remove(self.path)


def require_batch_size(batch_size: int, option: str = "--batch_size") -> None:
    """Reject a non-positive batch size with a `ConfigError` naming the option."""
    if batch_size < 1:
        raise ConfigError(f"{option} must be >= 1, got {batch_size}")
