"""tga/safety/similarity.py

The paper's Section 3 measurement: per layer, how close are the LLM's hidden states of image tokens to the
hidden states of the same content given as text (the image's caption fed through the same model)? For
each sample, I^j and C^j are mean-pooled states of the image tokens and of the caption tokens at layer j;
the report gives the mean cos(I^j, C^j) per layer, optionally per scene, and the *specificity*
cos(I, own caption) - mean cos(I, other captions), which separates real content alignment from a shared
direction that makes every caption look close (cos near 1 with specificity near 0). Several checkpoints
(before/after TGA) are compared on one plot.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tga.errors import DataError
from tga.safety.io import write_json


def cosine_matrix(image_states: torch.Tensor, caption_states: torch.Tensor) -> torch.Tensor:
    """Cosine of every image to every caption, per layer. [L+1,N,H] x [L+1,N,H] -> [L+1,N,N] (rows = images)."""
    images = F.normalize(image_states.float(), dim=-1)
    captions = F.normalize(caption_states.float(), dim=-1)
    return images @ captions.transpose(1, 2)


def _summary(matrix: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
    # matrix [L+1, N, N]; rows: the samples (image rows) this summary covers.
    n = matrix.shape[1]
    own = torch.diagonal(matrix, dim1=1, dim2=2)[:, rows]  # [L+1, n_rows]
    summary: dict[str, Any] = {"n": int(rows.numel()), "cosine": own.mean(dim=1).tolist()}
    if n > 1:
        others = (matrix[:, rows].sum(dim=2) - own) / (n - 1)
        summary["other_caption_cosine"] = others.mean(dim=1).tolist()
        summary["specificity"] = (own - others).mean(dim=1).tolist()
    else:
        summary["other_caption_cosine"] = None
        summary["specificity"] = None
    return summary


def similarity_report(
    image_states: torch.Tensor, caption_states: torch.Tensor, scenes: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-layer image-versus-caption similarity of one checkpoint.

    Args:
        image_states: [L+1, N, H] mean image-token states per layer (index 0 = embeddings).
        caption_states: [L+1, N, H] mean caption-token states of the matching captions.
        scenes: optional scene label per sample, for per-scene summaries.

    Returns:
        {"num_layers", "n", "cosine": [L+1], "other_caption_cosine": [L+1] | None, "specificity": [L+1] | None,
        "per_scene": {scene: same fields}} ; lists are indexed by hidden-state layer.
    """
    if image_states.shape != caption_states.shape or image_states.dim() != 3:
        raise DataError(
            f"image and caption states must both be [L+1, N, H]; got {tuple(image_states.shape)} "
            f"and {tuple(caption_states.shape)}"
        )
    if image_states.shape[1] == 0:
        raise DataError("similarity analysis needs at least one image-caption pair")
    matrix = cosine_matrix(image_states, caption_states)
    report = {"num_layers": image_states.shape[0] - 1, **_summary(matrix, torch.arange(image_states.shape[1]))}
    if scenes is not None:
        if len(scenes) != image_states.shape[1]:
            raise DataError(f"{len(scenes)} scene labels for {image_states.shape[1]} samples")
        report["per_scene"] = {
            scene: _summary(matrix, torch.tensor([i for i, s in enumerate(scenes) if s == scene]))
            for scene in sorted(set(scenes))
        }
    return report


def save_similarity(reports: Mapping[str, dict[str, Any]], out_dir: str) -> tuple[str, str]:
    """Write `similarity.json` (all checkpoints) and `similarity.png` (one line per checkpoint).

    Args:
        reports: checkpoint label -> `similarity_report` output.
        out_dir: output folder (created).

    Returns:
        The JSON and PNG paths.
    """
    from tga.safety.plots import plot_similarity

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "similarity.json")
    png_path = os.path.join(out_dir, "similarity.png")
    write_json(json_path, {"checkpoints": dict(reports)})
    plot_similarity(reports, png_path)
    return json_path, png_path
