"""tga/retrieval/retrieve.py

Filling `retrieved_caption` (R) and `retrieved_topk` for every record with an image: embed the images,
take the top-k corpus texts by cosine, and choose the best text that is not the record's own caption C after
normalisation (the leak guard: R = C would let the guide loss be met by copying). `retrieve_file` is the
whole `tga retrieve` pipeline: records, embedder, corpus index, the resumable batch loop, output file.
"""

from __future__ import annotations

import os
import string
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from tga.errors import ConfigError
from tga.image_jobs import ItemResult, JobReport, run_image_job
from tga.records_io import file_sha256, load_records
from tga.retrieval.backends import build_embedder
from tga.retrieval.corpus import load_corpus
from tga.retrieval.embedders import ClipEmbedder
from tga.retrieval.index import CaptionIndex, corpus_sha256, load_or_build_caption_index

LEAK_FLAG = "leak_skipped"
NO_TEXT_FLAG = "no_text_left"
LEAK_MARGIN = 4  # extra candidates fetched so that skipped copies of the caption still leave top_k
SCORE_DECIMALS = 6  # scores are rounded so resumed and uninterrupted runs write the same bytes


def normalize_text(text: str) -> str:
    """Case-folded, whitespace-collapsed text without surrounding punctuation (what the leak guard compares)."""
    return " ".join(text.casefold().split()).strip(string.punctuation + " ")


def pick_retrieved(candidates: list[tuple[str, float]], own_caption: str | None, top_k: int) -> ItemResult:
    """Apply the leak guard to ranked candidates and build the record's new fields.

    Args:
        candidates: (text, cosine) pairs, best first (a few more than top_k, so skipped copies still leave top_k).
        own_caption: the record's `image_caption`, or None.
        top_k: how many texts `retrieved_topk` keeps.

    Returns:
        `retrieved_caption` (the best non-leaking text) and `retrieved_topk` ([{text, score}]), flagged
        `leak_skipped` when the record's own caption would have been among the top_k.
    """
    own = normalize_text(own_caption) if isinstance(own_caption, str) and own_caption.strip() else None
    kept = [(text, score) for text, score in candidates if own is None or normalize_text(text) != own]
    leaked = own is not None and any(normalize_text(text) == own for text, _ in candidates[:top_k])
    flags = (LEAK_FLAG,) if leaked else ()
    topk = [{"text": text, "score": round(score, SCORE_DECIMALS)} for text, score in kept[:top_k]]
    if not topk:
        return ItemResult({"retrieved_topk": []}, flags + (NO_TEXT_FLAG,))
    return ItemResult({"retrieved_caption": topk[0]["text"], "retrieved_topk": topk}, flags)


def retrieve_for_records(
    records: list[dict[str, Any]],
    *,
    image_folder: str,
    embedder: ClipEmbedder,
    index: CaptionIndex,
    out_path: str,
    header: dict[str, Any],
    top_k: int = 5,
    batch_size: int = 64,
    skip_bad_records: bool = False,
    max_batches: int | None = None,
    num_workers: int = 4,
) -> JobReport:
    """Retrieve texts for every record with an image and write the filled records to `out_path`, resumably.

    Args:
        records: LLaVA records; those without `image` pass through unchanged.
        image_folder: folder the `image` paths are relative to.
        embedder: embeds the images (the same model that embedded the corpus).
        index: the corpus index.
        out_path: output records file; partial results go to `out_path + ".partial.jsonl"`.
        header: identifies the run's settings and inputs in the partial file.
        top_k: texts kept per record.
        batch_size, skip_bad_records, max_batches, num_workers: see `run_image_job`.

    Returns:
        The job report; `flags["leak_skipped"]` counts records whose own caption was skipped.
    """
    if top_k < 1:
        raise ConfigError(f"--top_k must be >= 1, got {top_k}")

    def process(images: list[Image.Image], batch: list[dict[str, Any]]) -> list[ItemResult]:
        ranked = index.search(embedder.embed_images(images), top_k + LEAK_MARGIN)
        return [
            pick_retrieved(candidates, record.get("image_caption"), top_k) for candidates, record in zip(ranked, batch)
        ]

    return run_image_job(
        records,
        image_folder=image_folder,
        out_path=out_path,
        process=process,
        needs_work=lambda record: True,
        header=header,
        batch_size=batch_size,
        desc="retrieve",
        skip_bad_records=skip_bad_records,
        max_batches=max_batches,
        num_workers=num_workers,
    )


@dataclass
class RetrieveConfig:
    """Options of `tga retrieve` (names match the command-line flags)."""

    data: str  # records file (.json list or .jsonl)
    image_folder: str  # folder the records' image paths are relative to
    corpus: str  # caption corpus (.txt, .jsonl or .json)
    out: str  # output records file (.json or .jsonl)
    backend: str = "open_clip"  # open_clip | hf_clip
    model: str = "ViT-L-14"  # open_clip name / local-dir:PATH, or HF CLIPModel folder
    pretrained: str | None = "openai"  # open_clip tag or checkpoint file
    model_config: str | None = None  # open_clip JSON config to register (custom architectures)
    index: str = "flat"  # flat | ivf
    nlist: int | None = None  # IVF cells (default ~4 sqrt(n))
    nprobe: int | None = None  # IVF cells searched per query (default min(nlist, 32))
    index_path: str | None = None  # cache folder for corpus embeddings + index
    top_k: int = 5  # texts kept per record
    batch_size: int = 64  # images per batch
    text_batch_size: int = 256  # corpus texts per embedding call
    device: str = "cpu"  # torch device
    dtype: str = "float32"  # float32 | float16 | bfloat16
    num_workers: int = 4  # image-decoding threads
    skip_bad_records: bool = False  # skip (and report) missing/corrupt/escaping images
    max_batches: int | None = None  # stop after N batches (resumable); for smoke tests


def retrieve_file(config: RetrieveConfig, embedder: ClipEmbedder | None = None) -> tuple[JobReport, int]:
    """Run the whole `tga retrieve` pipeline.

    Args:
        config: the options.
        embedder: a ready embedder (tests, notebooks); built from `config` when None.

    Returns:
        (the job report, how many duplicate corpus captions were dropped).
    """
    if not os.path.isdir(config.image_folder):
        raise ConfigError(f"--image_folder is not a folder: {config.image_folder}")
    records = load_records(config.data)
    texts, duplicates = load_corpus(config.corpus)
    if embedder is None:
        embedder = build_embedder(
            config.backend,
            config.model,
            pretrained=config.pretrained,
            device=config.device,
            dtype=config.dtype,
            model_config=config.model_config,
        )
    index = load_or_build_caption_index(
        texts,
        embedder,
        kind=config.index,
        nlist=config.nlist,
        nprobe=config.nprobe,
        batch_size=config.text_batch_size,
        index_path=config.index_path,
    )
    settings = {k: v for k, v in asdict(config).items() if k in ("top_k", "index", "nlist", "nprobe", "dtype")}
    header = {
        "job": "retrieve",
        **settings,
        "embedder": embedder.description,
        "corpus_sha256": corpus_sha256(texts),
        "data_sha256": file_sha256(config.data),
        "image_folder": os.path.abspath(config.image_folder),
    }
    report = retrieve_for_records(
        records,
        image_folder=config.image_folder,
        embedder=embedder,
        index=index,
        out_path=config.out,
        header=header,
        top_k=config.top_k,
        batch_size=config.batch_size,
        skip_bad_records=config.skip_bad_records,
        max_batches=config.max_batches,
        num_workers=config.num_workers,
    )
    return report, duplicates
