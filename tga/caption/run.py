"""tga/caption/run.py

The `tga caption` job: fill `image_caption` (C) for every record with an image that lacks one (or for all,
with `overwrite`), batch by batch, resumably, using a `Captioner`; records without an image pass through.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from tga.caption.captioner import Captioner
from tga.errors import ConfigError
from tga.image_jobs import ItemResult, JobReport, run_image_job
from tga.records_io import file_sha256, file_signature, load_records

EMPTY_FLAG = "empty_caption"


def needs_caption(record: dict[str, Any], overwrite: bool) -> bool:
    """Whether a record's caption must be (re)generated."""
    caption = record.get("image_caption")
    return overwrite or not (isinstance(caption, str) and caption.strip())


def caption_records(
    records: list[dict[str, Any]],
    *,
    image_folder: str,
    captioner: Captioner,
    out_path: str,
    header: dict[str, Any],
    overwrite: bool = False,
    batch_size: int = 8,
    skip_bad_records: bool = False,
    max_batches: int | None = None,
    num_workers: int = 4,
) -> JobReport:
    """Caption the records that need it and write all records to `out_path`, resumably.

    Args:
        records: LLaVA records.
        image_folder: folder the `image` paths are relative to.
        captioner: the captioning model.
        out_path: output records file; partial results go to `out_path + ".partial.jsonl"`.
        header: identifies the run's settings and inputs in the partial file.
        overwrite: caption every record with an image, replacing existing captions.
        batch_size, skip_bad_records, max_batches, num_workers: see `run_image_job`.

    Returns:
        The job report; `flags["empty_caption"]` counts captions the model left empty.
    """

    def process(images: list[Image.Image], batch: list[dict[str, Any]]) -> list[ItemResult]:
        return [
            ItemResult({"image_caption": text}, () if text else (EMPTY_FLAG,)) for text in captioner.caption(images)
        ]

    return run_image_job(
        records,
        image_folder=image_folder,
        out_path=out_path,
        process=process,
        needs_work=lambda record: needs_caption(record, overwrite),
        header=header,
        batch_size=batch_size,
        desc="caption",
        skip_bad_records=skip_bad_records,
        max_batches=max_batches,
        num_workers=num_workers,
    )


@dataclass
class CaptionConfig:
    """Options of `tga caption` (names match the command-line flags)."""

    model: str  # image-to-text model folder
    data: str  # records file (.json list or .jsonl)
    image_folder: str  # folder the records' image paths are relative to
    out: str  # output records file (.json or .jsonl)
    prompt: str | None = None  # chat models: instruction; others: caption prefix; None: unconditional
    batch_size: int = 8  # images per generate call
    max_new_tokens: int = 40  # generation budget per caption
    overwrite: bool = False  # recaption records that already have image_caption
    device: str = "cpu"  # torch device
    dtype: str | None = None  # float32 | float16 | bfloat16; None: as saved
    num_workers: int = 4  # image-decoding threads
    skip_bad_records: bool = False  # skip (and report) missing/corrupt/escaping images
    max_batches: int | None = None  # stop after N batches (resumable); for smoke tests
    trust_remote_code: bool = False  # run the model repository's own code (explicit opt-in)


def _model_identity(model: str) -> str:
    """The model folder plus its weights files' sizes and times, so a retrained model is not mixed in."""
    if not os.path.isdir(model):
        return model
    weights = sorted(glob.glob(os.path.join(model, "*.safetensors")) + glob.glob(os.path.join(model, "*.bin")))
    return f"{os.path.abspath(model)}|{','.join(file_signature(path) for path in weights)}"


def caption_file(config: CaptionConfig, captioner: Captioner | None = None) -> JobReport:
    """Run the whole `tga caption` pipeline.

    Args:
        config: the options.
        captioner: a ready captioner (tests, notebooks); loaded from `config` when None.

    Returns:
        The job report.
    """
    if not os.path.isdir(config.image_folder):
        raise ConfigError(f"--image_folder is not a folder: {config.image_folder}")
    records = load_records(config.data)
    if captioner is None:
        captioner = Captioner.load(
            config.model,
            device=config.device,
            dtype=config.dtype,
            prompt=config.prompt,
            max_new_tokens=config.max_new_tokens,
            trust_remote_code=config.trust_remote_code,
        )
    header = {
        "job": "caption",
        "model": _model_identity(config.model),
        "prompt": config.prompt,
        "max_new_tokens": config.max_new_tokens,
        "overwrite": config.overwrite,
        "dtype": config.dtype,
        "data_sha256": file_sha256(config.data),
        "image_folder": os.path.abspath(config.image_folder),
    }
    return caption_records(
        records,
        image_folder=config.image_folder,
        captioner=captioner,
        out_path=config.out,
        header=header,
        overwrite=config.overwrite,
        batch_size=config.batch_size,
        skip_bad_records=config.skip_bad_records,
        max_batches=config.max_batches,
        num_workers=config.num_workers,
    )
