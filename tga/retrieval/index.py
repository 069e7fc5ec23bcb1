"""tga/retrieval/index.py

The faiss index over the corpus' L2-normalised text embeddings (inner product = cosine): exact `flat`
(`IndexFlatIP`) or approximate `ivf` (`IndexIVFFlat`, inner-product metric, trained on the corpus). A
`CaptionIndex` keeps the texts, their embeddings and the index together and can be cached in a folder
(`--index_path`) so a large corpus is embedded once; the cache records which model and corpus produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from tga.errors import ConfigError
from tga.retrieval.embedders import ClipEmbedder, embed_in_batches

INDEX_KINDS = ("flat", "ivf")
_FILES = {"texts": "corpus.json", "embeddings": "embeddings.npy", "index": "index.faiss", "meta": "meta.json"}


def default_nlist(count: int) -> int:
    """IVF cell count: about 4 sqrt(n), with at least 39 training points per cell (faiss' own minimum)."""
    return max(1, min(int(4 * count**0.5), count // 39))


def build_index(
    embeddings: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int | None = None
) -> faiss.Index:
    """Build an inner-product faiss index over L2-normalised float32 embeddings.

    Args:
        embeddings: `[n, dim]` float32 rows.
        kind: "flat" (exact) or "ivf" (inverted lists, trained on `embeddings`).
        nlist: IVF cells (default `default_nlist(n)`); at most n.
        nprobe: IVF cells searched per query (default min(nlist, 32)).

    Returns:
        The filled index.
    """
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    count, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = default_nlist(count) if nlist is None else nlist
        if not 1 <= nlist <= count:
            raise ConfigError(f"--nlist must be between 1 and the corpus size ({count}), got {nlist}")
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise ConfigError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    index.add(vectors)
    if kind == "ivf":
        set_nprobe(index, nprobe)
    return index


def set_nprobe(index: faiss.Index, nprobe: int | None) -> None:
    """Set how many IVF cells a query visits (default min(nlist, 32)); a no-op for flat indexes."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    nprobe = min(ivf.nlist, 32) if nprobe is None else nprobe
    if nprobe < 1:
        raise ConfigError(f"--nprobe must be >= 1, got {nprobe}")
    ivf.nprobe = min(nprobe, ivf.nlist)


def corpus_sha256(texts: list[str]) -> str:
    """Identity of a corpus (its cleaned texts in order)."""
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


@dataclass
class CaptionIndex:
    """Corpus texts, their embeddings and the faiss index over them."""

    texts: list[str]
    embeddings: np.ndarray
    index: faiss.Index
    meta: dict[str, Any]

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (text, cosine) per query row, best first."""
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.texts)))
        return [
            [(self.texts[i], float(s)) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(scores, ids)
        ]

    def save(self, folder: str) -> None:
        """Write texts, embeddings, index and metadata into `folder`."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, _FILES["texts"]), "w", encoding="utf-8") as handle:
            json.dump(self.texts, handle, ensure_ascii=False)
        np.save(os.path.join(folder, _FILES["embeddings"]), self.embeddings)
        faiss.write_index(self.index, os.path.join(folder, _FILES["index"]))
        with open(os.path.join(folder, _FILES["meta"]), "w", encoding="utf-8") as handle:
            json.dump(self.meta, handle, indent=2)

    @classmethod
    def load(cls, folder: str) -> CaptionIndex:
        """Read a folder written by `save`."""
        with open(os.path.join(folder, _FILES["meta"]), encoding="utf-8") as handle:
            meta = json.load(handle)
        with open(os.path.join(folder, _FILES["texts"]), encoding="utf-8") as handle:
            texts = json.load(handle)
        embeddings = np.load(os.path.join(folder, _FILES["embeddings"]), allow_pickle=False)
        return cls(texts, embeddings, faiss.read_index(os.path.join(folder, _FILES["index"])), meta)


def load_or_build_caption_index(
    texts: list[str],
    embedder: ClipEmbedder,
    *,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int | None = None,
    batch_size: int = 256,
    index_path: str | None = None,
) -> CaptionIndex:
    """Embed the corpus and index it, or reuse the cache in `index_path` made by the same model and corpus.

    A cache with the same embeddings but another index kind or `nlist` is re-indexed without re-embedding;
    a cache made by another model or corpus is refused (`ConfigError`), never silently overwritten.

    Args:
        texts: the cleaned corpus (see `load_corpus`).
        embedder: the model that embeds queries too.
        kind, nlist, nprobe: see `build_index`.
        batch_size: texts per embedding call.
        index_path: cache folder (created when missing); None disables caching.

    Returns:
        The `CaptionIndex`.
    """
    source = {"embedder": embedder.description, "corpus_sha256": corpus_sha256(texts), "count": len(texts)}
    wanted = {"kind": kind, "nlist": nlist}
    cached = None
    if index_path and os.path.exists(os.path.join(index_path, _FILES["meta"])):
        cached = CaptionIndex.load(index_path)
        if cached.meta.get("source") != source:
            raise ConfigError(
                f"--index_path {index_path} holds a corpus index made by another model or corpus; "
                "use another folder or delete it"
            )
        if cached.meta.get("index") == wanted:
            set_nprobe(cached.index, nprobe)
            return cached
    embeddings = (
        cached.embeddings
        if cached is not None
        else embed_in_batches(embedder.embed_texts, texts, batch_size, "embed corpus")
    )
    result = CaptionIndex(
        texts, embeddings, build_index(embeddings, kind, nlist, nprobe), {"source": source, "index": wanted}
    )
    if index_path:
        result.save(index_path)
    return result
