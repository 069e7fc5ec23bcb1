"""tga/bench/parquet.py

Benchmarks released as Hugging Face parquet files (HADES, SPA-VL): finding the files of a split in a downloaded
dataset folder, reading their text columns with pyarrow, and decoding an image cell (the `datasets` Image struct
`{bytes, path}`) on demand, one file's image column at a time, so a run never holds a whole image set in memory.
"""

from __future__ import annotations

import glob
import io
import os
from typing import Any

from PIL import Image

from tga.bench.items import ParquetImage, require_columns
from tga.errors import DataError


def parquet_files(root: str, prefix: str, what: str) -> list[str]:
    """The parquet files under `root` (searched recursively) whose name starts with `prefix`, sorted."""
    if os.path.isfile(root) and root.endswith(".parquet"):
        return [root]
    if not os.path.isdir(root):
        raise DataError(f"{what}: not found: {root}")
    files = sorted(path for path in glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)
                   if os.path.basename(path).startswith(prefix))
    if not files:
        raise DataError(f"{what}: no {prefix}*.parquet file under {root}")
    return files


def read_rows(path: str, columns: list[str], image_column: str = "image") -> list[dict[str, Any]]:
    """The rows of a parquet file as dicts of the given text columns (the image column is checked, not read)."""
    import pyarrow.parquet as pq

    try:
        schema_names = pq.read_schema(path).names
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({error})") from error
    require_columns(schema_names, [*columns, image_column], path)
    return pq.read_table(path, columns=columns).to_pylist()


class ParquetImageLoader:
    """Decodes `ParquetImage` cells, keeping the image column of the most recently used file."""

    def __init__(self) -> None:
        self._file: tuple[str, str] | None = None
        self._cells: Any = None

    def load(self, ref: ParquetImage) -> Image.Image:
        import pyarrow.parquet as pq

        if self._file != (ref.file, ref.column):
            self._cells = pq.read_table(ref.file, columns=[ref.column]).column(ref.column)
            self._file = (ref.file, ref.column)
        cell = self._cells[ref.row].as_py()
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, (bytes, bytearray)):
            raise DataError(f"{ref.file}: row {ref.row} column `{ref.column}` holds no image bytes")
        try:
            image = Image.open(io.BytesIO(data))
            return image.convert("RGB")
        except Exception as error:  # PIL raises several types for undecodable data
            raise DataError(f"{ref.file}: row {ref.row} image cannot be decoded ({error})") from error
