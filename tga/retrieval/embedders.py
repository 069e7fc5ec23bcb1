"""tga/retrieval/embedders.py

The `ClipEmbedder` protocol that retrieval needs from a CLIP-like model (L2-normalised float32 image and
text embeddings, and a description used to tie cached embeddings to the model) and the factory that builds
one from a backend name: `open_clip` (any open_clip model) or `hf_clip` (a transformers `CLIPModel` folder).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from tga.errors import ConfigError

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


def build_embedder(
    backend: str,
    model: str,
    *,
    pretrained: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    model_config: str | None = None,
) -> ClipEmbedder:
    """Build an embedder.

    Args:
        backend: "open_clip" or "hf_clip".
        model: open_clip model name (or `local-dir:PATH`), or the folder of an HF `CLIPModel`.
        pretrained: open_clip pretrained tag (e.g. "openai") or checkpoint file; unused by hf_clip.
        device: torch device string.
        dtype: "float32", "float16" or "bfloat16" (weights and inputs).
        model_config: open_clip only: a JSON model config file to register before building `model`.

    Returns:
        A `ClipEmbedder`.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if backend == "open_clip":
        from tga.retrieval.open_clip_embedder import OpenClipEmbedder

        return OpenClipEmbedder.load(model, pretrained, device=device, dtype=dtype, model_config=model_config)
    if backend == "hf_clip":
        from tga.retrieval.hf_clip_embedder import HFClipEmbedder

        if model_config is not None:
            raise ConfigError("--model_config applies to --backend open_clip only")
        return HFClipEmbedder.load(model, device=device, dtype=dtype)
    raise ConfigError(f"--backend must be one of open_clip, hf_clip, got {backend!r}")


def embed_in_batches(embed, items: list, batch_size: int, desc: str) -> np.ndarray:
    """Run `embed` over `items` in batches with a progress bar and stack the float32 rows."""
    from tqdm import tqdm

    chunks = [embed(items[start : start + batch_size]) for start in tqdm(range(0, len(items), batch_size), desc=desc)]
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
