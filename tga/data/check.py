"""tga/data/check.py

The full data check behind `tga data check`: every record of a data file is validated (schema, alternating roles,
one `<image>` in the first human turn, string caption and retrieved fields), its image is resolved inside the image
folder and decoded, and, given a tokenizer, the rendered conversation is tokenized as training would do it to find
samples that do not fit `model_max_length` (truncated in text, or with no answer or image tokens left). Training runs
the cheap part of these checks at start (tga/data/guard.py); this one decodes every image, so it is the one to run
once on a new data set.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from tga.data.dataset import SampleBuilder, leak_guarded
from tga.data.records import Record, iter_data_paths, parse_record
from tga.data.templates import Message
from tga.errors import DataError
from tga.image_io import open_image, resolve_image_path
from tga.records_io import load_records as read_json_records


@dataclass
class Problem:
    """One bad record: its id (or `#position`), the file and the reason."""

    id: str
    source: str
    error: str


@dataclass
class CheckReport:
    """The outcome of a data check."""

    total: int = 0
    problems: list[Problem] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # ids of samples longer than model_max_length (text cut)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"total": self.total, "num_bad": len(self.problems), "num_truncated": len(self.truncated),
                "seconds": round(self.seconds, 3), "bad": [asdict(p) for p in self.problems],
                "truncated": self.truncated}

    def summary(self, max_listed: int = 50) -> str:
        """Human-readable summary: counts, then the bad records' ids and reasons (the first `max_listed`)."""
        lines = [f"{self.total} records checked in {self.seconds:.1f} s: {self.total - len(self.problems)} good, "
                 f"{len(self.problems)} bad, {len(self.truncated)} truncated to model_max_length (text only)"]
        for problem in self.problems[:max_listed]:
            lines.append(f"  bad {problem.id}: {problem.error}")
        if len(self.problems) > max_listed:
            lines.append(f"  ... and {len(self.problems) - max_listed} more (use --json for all)")
        if self.truncated:
            shown = ", ".join(self.truncated[:max_listed])
            lines.append(f"  truncated: {shown}{' ...' if len(self.truncated) > max_listed else ''}")
        return "\n".join(lines)


def check_text(record: Record, builder: SampleBuilder) -> bool:
    """Render and tokenize a record as training does (no image decoding); returns whether the text was truncated.

    Raises `DataError` when the image tokens do not fit or no answer token is left.
    """
    retrieved = leak_guarded(record.retrieved, record.caption) if builder.use_retrieved else None
    segments = builder.template.render(list(record.messages), has_image=record.image is not None,
                                       retrieved=retrieved, system=record.system)
    encoded = builder.encode(segments, record.id)
    if not bool((encoded.labels != -100).any()):
        raise DataError(f"record {record.id!r}: no answer tokens left after truncation to {builder.max_length} tokens")
    truncated = encoded.truncated
    if builder.caption_target and record.caption and record.image is not None and not record.toxic:
        caption = builder.template.render([Message("user", record.caption)], system=record.system, as_caption=True,
                                          add_generation_prompt=True)
        truncated = builder.encode(caption, record.id).truncated or truncated
    return truncated


def check_data(
    data_path: str,
    image_folder: str | None,
    *,
    builder: SampleBuilder | None = None,
    decode_images: bool = True,
    progress: bool = True,
) -> CheckReport:
    """Check every record of one or more data files.

    Args:
        data_path: JSON/JSONL record file(s), comma-separated.
        image_folder: the folder image paths are relative to.
        builder: a `SampleBuilder` (tokenizer, template, max length); None skips the token-length check.
        decode_images: decode every image (else only check that it exists).
        progress: show a progress bar.

    Returns:
        The report; `report.ok` is False when any record is bad.
    """
    started, report = time.perf_counter(), CheckReport()
    for path in iter_data_paths(data_path):
        try:
            raws = read_json_records(path)
        except DataError as error:  # the whole file is unreadable: one problem, named by the file
            report.problems.append(Problem(id="*", source=path, error=str(error)))
            continue
        for index, raw in enumerate(tqdm(raws, desc=f"checking {path}", unit="record", disable=not progress)):
            report.total += 1
            record_id = str(raw.get("id", f"#{index}")) if isinstance(raw, dict) else f"#{index}"
            try:
                record = parse_record(raw, index, path)
                if record.image is not None:
                    if image_folder is None:
                        raise DataError(f"record {record.id!r} has an image but no --image_folder was given")
                    image_path = resolve_image_path(image_folder, record.image, repr(record.id))
                    if decode_images:
                        open_image(image_path, repr(record.id))
                    elif not os.path.isfile(image_path):
                        raise DataError(f"record {record.id!r}: image not found: {image_path}")
                if builder is not None and check_text(record, builder):
                    report.truncated.append(record.id)
            except DataError as error:
                report.problems.append(Problem(id=record_id, source=path, error=str(error)))
    report.seconds = time.perf_counter() - started
    return report
