"""tga/data/guard.py

Bad records during training: the cheap start-up checks, `--skip_bad_records`, and the `bad_records.json` report.

At start every record is parsed and validated and its image path is resolved inside `--image_folder` and must
exist (a stat, no decoding). Without `--skip_bad_records` the first bad record stops the run before any step with a
`DataError` naming it; with it, bad records are left out and counted. At access time `GuardedDataset` counts samples
truncated to `model_max_length` (text only) and, when skipping, replaces a record whose image fails to decode by the
next record of the same modality that builds (so the batches of `--group_by_modality_length` stay single-modality;
any next record when none of that modality is left), which keeps the data order deterministic and identical on resume. Each process appends what
it saw to `OUTPUT_DIR/bad_records.parts/` (dataloader workers and ranks are separate processes); rank 0 merges the
parts and the start-up rejects into `OUTPUT_DIR/bad_records.json` at the end of training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from tga.data.records import Record, iter_data_paths, parse_record
from tga.errors import DataError
from tga.image_io import resolve_image_path
from tga.records_io import load_records as read_json_records

REPORT_FILE = "bad_records.json"
PARTS_DIR = "bad_records.parts"


def check_image_path(record: Record, image_folder: str | None) -> None:
    """The cheap image check: the path stays inside the folder and the file exists (DataError otherwise)."""
    if record.image is None:
        return
    label = repr(record.id)
    if image_folder is None:
        raise DataError(f"record {label} has an image but no --image_folder was given")
    path = resolve_image_path(image_folder, record.image, label)
    if not os.path.isfile(path):
        raise DataError(f"record {label}: image not found: {path}")


def load_training_records(data_path: str, image_folder: str | None, *, skip_bad: bool) -> tuple[list[Record], list[dict]]:
    """Parse and check every record of `--data_path` (comma-separated files).

    Args:
        data_path: one or more JSON/JSONL files, comma-separated.
        image_folder: the folder images are resolved in.
        skip_bad: leave bad records out (and return them) instead of raising the first `DataError`.

    Returns:
        The good records and, for each bad one, `{"id", "source", "stage": "load", "error"}`.
    """
    records, rejected = [], []
    for path in iter_data_paths(data_path):
        for index, raw in enumerate(read_json_records(path)):
            try:
                record = parse_record(raw, index, path)
                check_image_path(record, image_folder)
            except DataError as error:
                if not skip_bad:
                    raise
                record_id = str(raw.get("id", f"#{index}")) if isinstance(raw, dict) else f"#{index}"
                rejected.append({"id": record_id, "source": path, "stage": "load", "error": str(error)})
                continue
            records.append(record)
    return records, rejected


@dataclass
class BadRecordLog:
    """What one run saw: start-up rejects (in memory, identical on every rank) and access-time events (in files).

    Args:
        output_dir: the run folder; None keeps events in memory only (tests, analysis).
        rejected: the start-up rejects from `load_training_records`.
    """

    output_dir: str | None
    rejected: list[dict] = field(default_factory=list)
    seen: set = field(default_factory=set)  # (kind, id) already written by this process
    events: list[dict] = field(default_factory=list)  # this process's access-time events

    def add(self, kind: str, record_id: str, error: str = "") -> None:
        if (kind, record_id) in self.seen:
            return
        self.seen.add((kind, record_id))
        event = {"id": record_id, "stage": kind, **({"error": error} if error else {})}
        self.events.append(event)
        if self.output_dir is not None:
            folder = os.path.join(self.output_dir, PARTS_DIR)
            os.makedirs(folder, exist_ok=True)
            # One short line per append: O_APPEND writes of a line do not interleave between processes.
            with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event, ensure_ascii=False) + "\n")

    def collect(self) -> dict:
        """The merged report: start-up rejects plus the events of every process (parts files, kills included)."""
        events = list(self.events)
        folder = os.path.join(self.output_dir, PARTS_DIR) if self.output_dir else None
        if folder and os.path.isdir(folder):
            events = []
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    for line in handle:
                        try:
                            events.append(json.loads(line))
                        except ValueError:
                            continue  # a line cut short by a kill
        unique = {(event["stage"], event["id"]): event for event in events}
        skipped = self.rejected + [event for event in unique.values() if event["stage"] == "skipped"]
        truncated = sorted(event["id"] for event in unique.values() if event["stage"] == "truncated")
        return {"num_skipped": len(skipped), "skipped": skipped, "num_truncated": len(truncated), "truncated": truncated}

    def write(self) -> str | None:
        """Write `bad_records.json` (call on rank 0 once every rank is done); returns its path."""
        if self.output_dir is None:
            return None
        path = os.path.join(self.output_dir, REPORT_FILE)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
            json.dump(self.collect(), handle, indent=1, ensure_ascii=False)
        os.replace(f"{path}.tmp", path)
        return path


class GuardedDataset(Dataset):
    """Wraps a dataset of records: counts truncations and, with `skip_bad`, replaces records that fail to build.

    Args:
        dataset: a `LazySupervisedDataset` (its `records` and `modality_lengths` are used).
        log: where truncations and skips are recorded.
        skip_bad: replace a failing record by the next one that builds; otherwise the `DataError` propagates.
    """

    def __init__(self, dataset, log: BadRecordLog, *, skip_bad: bool):
        self.dataset = dataset
        self.log = log
        self.skip_bad = skip_bad
        self.bad_indices: set[int] = set()  # per process; only a cache, the outcome does not depend on it

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def records(self) -> list[Record]:
        return self.dataset.records

    @property
    def modality_lengths(self) -> list[int]:
        return self.dataset.modality_lengths

    def has_image(self, index: int) -> bool:
        return self.dataset.records[index].image is not None

    def __getitem__(self, index: int) -> dict:
        size = len(self.dataset)
        modality = None  # a replacement has the failed record's modality (first pass), else any (second pass)
        for offset in range(size * 2 if self.skip_bad else 1):
            candidate = (index + offset) % size
            if offset and modality is None:
                modality = self.has_image(index)
            if candidate in self.bad_indices or (0 < offset < size and self.has_image(candidate) != modality):
                continue
            try:
                sample = self.dataset[candidate]
            except DataError as error:
                if not self.skip_bad:
                    raise
                self.bad_indices.add(candidate)
                self.log.add("skipped", self.dataset.records[candidate].id, str(error))
                continue
            if sample.get("truncated"):
                self.log.add("truncated", sample["id"])
            return sample
        raise DataError(f"no record of the {size} left could be built (see {REPORT_FILE}); check the data")
