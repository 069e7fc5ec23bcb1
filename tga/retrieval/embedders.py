"""tga/retrieval/embedders.py

The `ClipEmbedder` protocol that retrieval needs from a CLIP-like model (L2-normalised float32 image and
text embeddings, and a description used to tie cached embeddings to the model), the weight dtypes and batched
embedding. `tga.retrieval.backends` builds one from a backend name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@runtime_checkable
class ClipEmbedder(Protocol):
    """A model that embeds images and texts into one space, rows L2-normalised (cosine = inner product)."""

    description: dict[str, str]  # identifies the model; stored with cached corpus embeddings

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed RGB images; returns float32 `[len(images), dim]`."""
        ...

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts; returns float32 `[len(texts), dim]`."""
        ...


def embed_in_batches(embed, items: list, batch_size: int, desc: str) -> np.ndarray:
    """Run `embed` over `items` in batches with a progress bar and stack the float32 rows."""
    from tqdm import tqdm

    chunks = [embed(items[start : start + batch_size]) for start in tqdm(range(0, len(items), batch_size), desc=desc)]
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
