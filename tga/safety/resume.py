"""tga/safety/resume.py

Resumable result files for long evaluations. Finished results are appended to a JSONL file one batch at a
time (flushed and synced), each line keyed by a stable item key; a rerun reads the file, skips finished keys
and only processes what is left, so a killed run continues where it stopped. A sidecar settings file
records what produced the answers (model, prompts, judge, ...) so that a rerun with different settings
cannot silently mix results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

from tga.errors import ConfigError, DataError

Item = TypeVar("Item")


class ResultStore:
    """An append-only JSONL file of results keyed by their `key` field.

    Args:
        path: the JSONL file (created if missing).
        settings: what produced the results; stored beside the file as `<stem>.settings.json` and compared
            on reopening.
        overwrite: start afresh, discarding existing results.
    """

    def __init__(self, path: str, settings: dict[str, Any], *, overwrite: bool = False) -> None:
        self.path = path
        self.settings_path = os.path.splitext(path)[0] + ".settings.json"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if overwrite:
            for stale in (path, self.settings_path):
                if os.path.exists(stale):
                    os.remove(stale)
        self._check_settings(settings)
        self.results: dict[str, dict[str, Any]] = self._read()

    def _check_settings(self, settings: dict[str, Any]) -> None:
        settings = json.loads(json.dumps(settings))  # normalise tuples etc. to what JSON gives back
        if os.path.exists(self.settings_path) and os.path.exists(self.path):
            with open(self.settings_path, encoding="utf-8") as handle:
                previous = json.load(handle)
            if previous != settings:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise ConfigError(
                    f"{self.path} was produced with different settings ({', '.join(changed)}); "
                    "use another --out folder or pass --overwrite"
                )
        with open(self.settings_path, "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2)

    def _read(self) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        if not os.path.exists(self.path):
            return results
        with open(self.path, encoding="utf-8") as handle:
            lines = handle.readlines()
        good_bytes = 0
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not line.endswith("\n"):
                    raise ValueError("unterminated line")
            except ValueError as error:
                if number == len(lines):  # a run killed mid-write leaves a partial last line: drop it
                    with open(self.path, "r+", encoding="utf-8") as handle:
                        handle.truncate(good_bytes)
                    break
                raise DataError(f"{self.path}:{number}: corrupt result line ({error})") from error
            results[record["key"]] = record
            good_bytes += len(line.encode("utf-8"))
        return results

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append finished records (each with a `key`) and make them durable before returning."""
        with open(self.path, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            self.results[record["key"]] = record


def run_resumable(
    items: Sequence[Item],
    keys: Sequence[str],
    store: ResultStore,
    process: Callable[[list[Item]], list[dict[str, Any]]],
    *,
    batch_size: int,
    desc: str,
) -> list[dict[str, Any]]:
    """Process the items not yet in `store`, batch by batch, appending each finished batch.

    Args:
        items: everything the evaluation covers.
        keys: one unique, stable key per item.
        store: where finished results live.
        process: maps a batch of items to one result dict per item (the key is added here).
        batch_size: items per call of `process`.
        desc: progress-bar label.

    Returns:
        The results for `items`, in item order (finished earlier or now).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    if len(set(keys)) != len(keys):
        raise DataError("duplicate evaluation items (same scene/image/prompt or id listed twice)")
    todo = [(item, key) for item, key in zip(items, keys) if key not in store.results]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            outputs = process([item for item, _ in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"{desc}: got {len(outputs)} results for a batch of {len(batch)}")
            store.append([{"key": key, **output} for (_, key), output in zip(batch, outputs)])
            bar.update(len(batch))
    return [store.results[key] for key in keys]
