"""tga/data/arrow_records.py

Records at LLaVA scale: every `--data_path` part (a JSON/JSONL file, a folder written by `Dataset.save_to_disk`, or
any `datasets.load_dataset` source) is converted once into an Arrow dataset of validated, normalised records, cached
under a key of the source (path, size and modification time, or the dataset fingerprint) and memory-mapped by every
rank and dataloader worker afterwards. The conversion runs `parse_record` on every record in a batched `map`
(`num_proc` processes), so errors are the in-memory path's `DataError`s naming the record id and the file, and it
stores the sampler's length column in the same pass. `ArrowRecords` then builds one `Record` per access, so no
Python list of all records stays in memory; `ArrowSupervisedDataset` is the lazy dataset over it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import datasets
import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, List, Value

from tga.data.dataset import LazySupervisedDataset, SampleBuilder, modality_length
from tga.data.records import Record, iter_data_paths, parse_record
from tga.data.templates import Message
from tga.errors import DataError
from tga.image_io import resolve_image_path
from tga.records_io import load_records as read_json_records

FORMAT_VERSION = 2  # bump when parse_record or the stored columns change: old caches are then ignored
RAW_COLUMN = "raw"  # JSON text of one source record (files are stored raw first, so Arrow infers no schema)
FEATURES = Features({
    "id": Value("string"),
    "roles": List(Value("string")),
    "contents": List(Value("string")),
    "image": Value("string"),
    "caption": Value("string"),
    "retrieved": Value("string"),
    "toxic": Value("bool"),
    "system": Value("string"),
    # The modality-length sampler's proxy (tga.data.dataset.modality_length); null for an invalid record, which is
    # never a training record and so has no length (a 0 here once reached the sampler of a --skip_bad_records run).
    "length": Value("int64"),
    "error": Value("string"),  # the DataError of an invalid record (kept, so the cache serves --skip_bad_records too)
})


def default_cache_dir() -> str:
    """The Arrow record cache: `HF_DATASETS_CACHE/tga_records` unless `--data_cache_dir` says otherwise."""
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "tga_records")


def is_record_file(part: str) -> bool:
    return part.endswith((".json", ".jsonl"))


def _raw_json_rows(path: str, signature: str) -> Iterator[dict]:
    """Source records as JSON text, in file order (`signature` only keys datasets' own cache)."""
    if path.endswith(".jsonl"):
        offset = 0
        with open(path, "rb") as handle:
            for number, data in enumerate(handle, start=1):
                if number == 1 and data.startswith(codecs.BOM_UTF8):  # a Windows byte-order mark, not record text
                    offset, data = len(codecs.BOM_UTF8), data[len(codecs.BOM_UTF8):]
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as error:  # the in-memory reader's message
                    raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {offset + error.start}); "
                                    "re-encode the file") from error
                offset += len(data)
                if line.strip():
                    yield {RAW_COLUMN: line, "line": number}
    else:
        # A JSON list must be parsed whole once; this happens only in the converting process. ASCII escapes keep
        # lone surrogates (which Arrow strings cannot hold) for parse_record to reject by name.
        for record in read_json_records(path):
            yield {RAW_COLUMN: json.dumps(record), "line": 0}


def _without_nulls(value):
    """Arrow fills fields a record lacks with None; the JSON record simply did not have them."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _decode(batch: dict, row: int, source: str):
    if RAW_COLUMN not in batch:
        return _without_nulls({key: column[row] for key, column in batch.items()})
    try:
        return json.loads(batch[RAW_COLUMN][row])
    except json.JSONDecodeError as error:
        raise DataError(f"{source}:{batch['line'][row]}: invalid JSON ({error.msg})") from error


def normalise_batch(batch: dict, indices: list[int], source: str) -> dict:
    """Validate a batch of source records and return the stored columns (the `map` function of the conversion)."""
    out = {name: [] for name in FEATURES}
    for row, index in enumerate(indices):
        raw = _decode(batch, row, source)  # invalid JSON is fatal, as in the in-memory reader
        try:
            record = parse_record(raw, index, source)
        except DataError as error:
            out["id"].append(str(raw.get("id", f"#{index}")) if isinstance(raw, dict) else f"#{index}")
            for name in ("roles", "contents"):
                out[name].append([])
            for name in ("image", "caption", "retrieved", "system"):
                out[name].append(None)
            out["toxic"].append(False)
            out["length"].append(None)
            out["error"].append(str(error))
            continue
        out["error"].append(None)
        out["id"].append(record.id)
        out["roles"].append([message.role for message in record.messages])
        out["contents"].append([message.content for message in record.messages])
        for name in ("image", "caption", "retrieved", "toxic", "system"):
            out[name].append(getattr(record, name))
        out["length"].append(modality_length(record))
    return out


def row_to_record(row: dict) -> Record:
    """The `Record` of one stored row (what `parse_record` returned during the conversion)."""
    messages = tuple(Message(role, content) for role, content in zip(row["roles"], row["contents"], strict=True))
    return Record(row["id"], messages, row["image"], row["caption"], row["retrieved"], row["toxic"], row["system"])


def _load_source(part: str) -> Dataset:
    """A saved dataset folder or a `load_dataset` source, as one Dataset (the `train` split of a DatasetDict)."""
    if os.path.isdir(part) and (os.path.exists(os.path.join(part, "dataset_info.json"))
                                or os.path.exists(os.path.join(part, "dataset_dict.json"))):
        loaded = datasets.load_from_disk(part)
    else:
        try:
            loaded = datasets.load_dataset(part)
        except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            raise DataError(f"--data_path {part}: not a JSON/JSONL file, saved dataset folder or loadable dataset "
                            f"({type(error).__name__}: {error})") from error
    if isinstance(loaded, DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise DataError(f"--data_path {part}: splits {sorted(loaded)}; expected a `train` split")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def _source_key(part: str) -> tuple[str, Dataset | None]:
    """A cache key that changes when the source changes, and the loaded source when it had to be opened for it."""
    if is_record_file(part):
        if not os.path.isfile(part):
            raise DataError(f"records file not found: {part}")
        stat = os.stat(part)
        identity, source = f"file:{os.path.abspath(part)}:{stat.st_size}:{stat.st_mtime_ns}", None
    else:
        source = _load_source(part)
        identity = f"dataset:{part}:{source._fingerprint}"
    digest = hashlib.sha256(f"{identity}:v{FORMAT_VERSION}".encode()).hexdigest()[:24]
    return f"{os.path.basename(part.rstrip('/')) or 'data'}-{digest}", source


def convert(part: str, cache_dir: str, num_proc: int | None = None) -> str:
    """Convert one `--data_path` part into the Arrow cache unless it is there already; returns its folder.

    Args:
        part: a JSON/JSONL file, a saved dataset folder or a `load_dataset` source.
        cache_dir: the cache root (one folder per source version).
        num_proc: processes for the validation `map` (None: one).

    Returns:
        The folder holding the converted records (`datasets.load_from_disk` opens it).
    """
    key, source = _source_key(part)
    final = os.path.join(cache_dir, key)
    if os.path.isdir(final):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir)
    try:
        if source is None:
            signature = key  # part of gen_kwargs: datasets' own generator cache must not outlive a file change
            try:
                source = Dataset.from_generator(_raw_json_rows, gen_kwargs={"path": part, "signature": signature},
                                                cache_dir=os.path.join(work, "raw"))
            except datasets.exceptions.DatasetGenerationError as error:
                if isinstance(error.__cause__, DataError):  # datasets wraps the reader's errors; show ours
                    raise error.__cause__ from None
                raise
        converted = source.map(
            normalise_batch, batched=True, with_indices=True, fn_kwargs={"source": part}, features=FEATURES,
            remove_columns=source.column_names, num_proc=num_proc if num_proc and num_proc > 1 else None,
            cache_file_name=os.path.join(work, "map", "records.arrow"), desc=f"validating {part}",
        )
        converted.save_to_disk(os.path.join(work, "final"))
        del converted
        try:
            os.replace(os.path.join(work, "final"), final)  # atomic: readers see no folder or the whole one
        except OSError:
            if not os.path.isdir(final):  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


class ArrowRecords(Sequence[Record]):
    """Validated records memory-mapped from the Arrow cache; `records[i]` builds one `Record`.

    Args:
        table: the stored rows (only valid ones).
        sources: the `--data_path` parts, in order.
        rejected: bad records left out with `skip_bad`, as `{"id", "source", "stage": "load", "error"}`.
        lengths: the length column of exactly the rows of `table` (default: the table's own column, right when no
            row was left out).
    """

    def __init__(self, table: Dataset, sources: list[str], rejected: list[dict] | None = None,
                 lengths: pa.ChunkedArray | None = None):
        self.table = table
        self.sources = sources
        self.rejected = rejected or []
        self.lengths = lengths

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return row_to_record(self.table[int(index)])

    @property
    def modality_lengths(self) -> list[int]:
        """The stored length column (computed once, during the conversion), one entry per kept record.

        `table.data` is the whole stored table: rows left out by `skip_bad` are hidden only by the dataset's index
        mapping, so the kept rows' lengths are the ones `open_records` selected with them."""
        lengths = self.lengths if self.lengths is not None else self.table.data.column("length")
        return lengths.to_pylist()


def _files_in(folder: str, relative: str, listings: dict[str, set[str]]) -> set[str]:
    """Names of the regular files (symlinks followed) in a folder, listed once per start (no stat per record)."""
    if relative not in listings:
        try:
            with os.scandir(os.path.join(folder, relative)) as entries:
                listings[relative] = {entry.name for entry in entries if entry.is_file()}
        except OSError:
            listings[relative] = set()
    return listings[relative]


def _image_errors(table: Dataset, image_folder: str | None) -> Iterator[tuple[int, str]]:
    """(row, message) for image paths that escape the folder or do not exist; no decoding. Each image folder is
    listed once instead of a stat per record (LLaVA's 665K records live in a handful of folders)."""
    folder = os.path.abspath(image_folder) if image_folder is not None else None
    listings: dict[str, set[str]] = {}
    offset = 0
    for chunk in table.data.column("image").chunks:  # chunk by chunk: never the whole column as Python strings
        for row, image in enumerate(chunk.to_pylist(), start=offset):
            if image is None:
                continue
            if folder is None:
                yield row, f"record {table[row]['id']!r} has an image but no --image_folder was given"
                continue
            # Fast path for plain relative paths (no `..`, not absolute); anything else takes the image_io checks.
            directory, _, name = image.rpartition("/")
            if not image.startswith("/") and ".." not in image and name in _files_in(folder, directory, listings):
                continue
            label = repr(table[row]["id"])  # the slow path, only for a bad row: the image_io checks and messages
            try:
                path = resolve_image_path(image_folder, image, label)
            except DataError as error:
                yield row, str(error)
                continue
            if not os.path.isfile(path):
                yield row, f"record {label}: image not found: {path}"
        offset += len(chunk)


def _checked(table: Dataset, part: str, image_folder: str | None, check_images: bool, skip_bad: bool,
             rejected: list[dict]) -> tuple[Dataset, pa.ChunkedArray]:
    """The valid rows of one part and their lengths; without `skip_bad` the first bad record raises its DataError."""
    errors = table.data.column("error")
    bad = {}
    if errors.null_count < len(errors):
        bad = {row: message for row, message in enumerate(errors.to_pylist()) if message is not None}
    if check_images:
        for row, message in _image_errors(table, image_folder):
            bad.setdefault(row, message)
            if not skip_bad:
                break
    lengths = table.data.column("length")  # a freshly opened part: no index mapping, the stored rows in order
    if not bad:
        return table, lengths
    if not skip_bad:
        raise DataError(bad[min(bad)])
    ids = table.select(sorted(bad))["id"]
    rejected += [{"id": ids[i], "source": part, "stage": "load", "error": bad[row]} for i, row in enumerate(sorted(bad))]
    kept = [row not in bad for row in range(table.num_rows)]
    return table.select([row for row, keep in enumerate(kept) if keep]), lengths.filter(pa.array(kept))


def open_records(data_path: str, *, cache_dir: str | None = None, num_proc: int | None = None,
                 image_folder: str | None = None, check_images: bool = False, skip_bad: bool = False) -> ArrowRecords:
    """Open (converting on first use) every part of a `--data_path`, in order.

    Args:
        data_path: comma-separated JSON/JSONL files, saved dataset folders or `load_dataset` sources.
        cache_dir: the Arrow cache root (default: `default_cache_dir()`).
        num_proc: processes for the first conversion's validation.
        image_folder: where record images are resolved (for `check_images`).
        check_images: also check that every image path stays inside `image_folder` and exists (a stat each).
        skip_bad: leave bad records out (listed in `.rejected`) instead of raising the first `DataError`.

    Returns:
        The valid records of all parts, concatenated in order.
    """
    parts = list(iter_data_paths(data_path))
    cache_dir = cache_dir or default_cache_dir()
    rejected: list[dict] = []
    checked = [_checked(datasets.load_from_disk(convert(part, cache_dir, num_proc)), part, image_folder, check_images,
                        skip_bad, rejected) for part in parts]
    tables = [table for table, _ in checked]
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    # Memory-mapped chunks when nothing was left out; the kept rows' lengths otherwise.
    lengths = pa.chunked_array([chunk for _, part_lengths in checked for chunk in part_lengths.chunks], pa.int64())
    return ArrowRecords(table, parts, rejected, lengths)


class ArrowSupervisedDataset(LazySupervisedDataset):
    """The lazy dataset over Arrow records: same samples as `LazySupervisedDataset`, length column precomputed."""

    def __init__(self, records: ArrowRecords, builder: SampleBuilder):
        super().__init__(records, builder)

    @property
    def modality_lengths(self) -> list[int]:
        return self.records.modality_lengths
