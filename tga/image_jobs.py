"""tga/image_jobs.py

The shared loop of jobs that fill fields of image records batch by batch (`tga retrieve`, `tga caption`):
pick the records that need work, skip those already in the partial-results sidecar, load each batch's images
on a small thread pool (the next batch loads while the model runs), call the job's `process` function, append
the finished batch to the sidecar, and at the end merge the results into the records and write the output
file atomically. Bad images raise a `DataError` naming the record, or with `skip_bad_records` are skipped,
counted and listed in the report; skipped records stay in the output unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from tga.errors import ConfigError, DataError
from tga.image_io import open_image, resolve_image_path
from tga.records_io import PARTIAL_SUFFIX, PartialResults, record_label, require_batch_size, write_records


@dataclass
class ItemResult:
    """What `process` returns for one record: fields to merge into it and flags to count in the report."""

    fields: dict[str, Any]
    flags: tuple[str, ...] = ()


@dataclass
class JobReport:
    """Outcome of one (possibly partial) run of an image job."""

    out_path: str
    complete: bool  # False when stopped by `max_batches`; rerun to continue
    total_records: int
    processed: int = 0  # records processed in this run
    resumed: int = 0  # records whose results came from an earlier, interrupted run
    passed_through: int = 0  # records that needed no work (no image, or already filled)
    skipped_ids: list[str] = field(default_factory=list)  # bad records skipped with `skip_bad_records`
    flags: Counter = field(default_factory=Counter)  # per-job counters, e.g. leak_skipped


ProcessFn = Callable[[list[Image.Image], list[dict[str, Any]]], list[ItemResult]]


def has_image(record: dict[str, Any]) -> bool:
    """Whether a record carries an image (`image` present and not null)."""
    return record.get("image") is not None


def _load(record: dict[str, Any], index: int, image_folder: str) -> Image.Image | DataError:
    label = record_label(record, index)
    image = record["image"]
    if isinstance(image, list) and len(image) == 1:  # some LLaVA exports wrap the single image in a list
        image = image[0]
    try:
        return open_image(resolve_image_path(image_folder, image, label), label)
    except DataError as error:
        return error


def run_image_job(
    records: Sequence[dict[str, Any]],
    *,
    image_folder: str,
    out_path: str,
    process: ProcessFn,
    needs_work: Callable[[dict[str, Any]], bool],
    header: dict[str, Any],
    batch_size: int,
    desc: str,
    skip_bad_records: bool = False,
    max_batches: int | None = None,
    num_workers: int = 4,
) -> JobReport:
    """Run `process` over every record that needs work, resumably, and write the merged records to `out_path`.

    `records` are identified in the sidecar (`out_path + ".partial.jsonl"`) by position and id; `image` paths are
    relative to `image_folder`; `process` maps a batch of RGB images and their records to one `ItemResult` each;
    `needs_work` says whether a record with an `image` must be processed (others pass through); a sidecar written
    under another `header` (options, model, input hash) is refused; `skip_bad_records` skips (and reports) records
    whose image is missing, corrupt or outside the folder; `max_batches` stops early without writing `out_path` (the
    run stays resumable); `num_workers` threads decode images. Returns a `JobReport` (`complete`: written).
    """
    require_batch_size(batch_size)
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"--max_batches must be >= 1, got {max_batches}")
    partial = PartialResults(out_path + PARTIAL_SUFFIX, header)
    report = JobReport(out_path=out_path, complete=False, total_records=len(records))
    pending = _pending(records, partial, needs_work, report)
    batches = [pending[start : start + batch_size] for start in range(0, len(pending), batch_size)][:max_batches]
    with (
        ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool,
        tqdm(total=len(pending), desc=desc, unit="img") as bar,
    ):

        def submit(batch: list[int]) -> list[Future]:
            return [pool.submit(_load, records[i], i, image_folder) for i in batch]

        loading = submit(batches[0]) if batches else []
        for number, batch in enumerate(batches):
            loaded = [future.result() for future in loading]
            loading = submit(batches[number + 1]) if number + 1 < len(batches) else []  # prefetch
            entries, processed = _process_batch(batch, loaded, records, process, skip_bad_records, desc)
            partial.append(entries)
            report.processed += processed
            bar.update(len(batch))

    if all(index in partial.results for index in pending):  # not stopped by max_batches
        output = [_merged(record, partial.results.get(index) if has_image(record) and needs_work(record) else None)
                  for index, record in enumerate(records)]
        write_records(out_path, output)
        partial.remove()
        report.complete = True
    return _summarise(report, partial, records)


def _pending(records, partial: PartialResults, needs_work, report: JobReport) -> list[int]:
    """Indices of the records still to process; counts the ones passed through and the ones already done."""
    pending = []
    for index, record in enumerate(records):
        if not has_image(record) or not needs_work(record):
            report.passed_through += 1
        elif partial.finished(index, record) is None:
            pending.append(index)
        else:
            report.resumed += 1
    return pending


def _process_batch(batch: list[int], loaded: list, records, process: ProcessFn, skip_bad_records: bool,
                   desc: str) -> tuple[list[dict], int]:
    """The sidecar entries of one batch (results and skipped records, in record order) and how many were processed."""
    entries, good, images = [], [], []
    for index, item in zip(batch, loaded):
        if isinstance(item, DataError):
            if not skip_bad_records:
                raise DataError(f"{item} (pass --skip_bad_records to skip such records)") from item
            entries.append({"index": index, "id": records[index].get("id"), "skipped": str(item)})
        else:
            good.append(index)
            images.append(item)
    results = process(images, [records[i] for i in good]) if good else []
    if len(results) != len(good):
        raise RuntimeError(f"{desc}: got {len(results)} results for a batch of {len(good)} images")
    for index, result in zip(good, results):
        entries.append({"index": index, "id": records[index].get("id"), "fields": result.fields,
                        "flags": list(result.flags)})
    return sorted(entries, key=lambda entry: entry["index"]), len(good)


def _merged(record: dict, entry: dict | None) -> dict:
    """A record with the fields its job produced (a skipped or passed-through record as it was)."""
    return {**record, **entry["fields"]} if entry is not None and "fields" in entry else record


def _summarise(report: JobReport, partial: PartialResults, records: Sequence[dict[str, Any]]) -> JobReport:
    """Fill the report's skipped ids and flag counts from every stored result (this run and earlier ones)."""
    for index in sorted(partial.results):
        entry = partial.results[index]
        if "skipped" in entry:
            report.skipped_ids.append(record_label(records[index], index))
        report.flags.update(entry.get("flags", ()))
    return report
