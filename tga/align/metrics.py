"""tga/align/metrics.py

Cosine helpers shared by the guide loss, and the alignment-specificity diagnostic. Specificity asks
whether an image's pooled state is closer to its own caption than to the other captions of the batch:
a guide loss can be satisfied by collapsing every image and caption state onto one shared direction,
which drives cos(I, C) to about 1 while specificity stays near 0. Users must see that failure, so the
trainer logs specificity per layer next to the cosines. All functions work on pooled per-layer states
[L, B, H] and compute in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Norm floor of the cosine: a zero vector gets cosine 0 with every vector instead of NaN.
_EPS = 1e-6


def apply_center(states: Tensor, center: Tensor | None) -> Tensor:
    """Subtract a per-layer centre from pooled states.

    Args:
        states: Pooled states [L, B, H].
        center: Per-layer centre [L, H], or None for no centring.

    Returns:
        float32 states [L, B, H], `states - center` broadcast over the batch.
    """
    states = states.float()
    if center is None:
        return states
    return states - center.to(device=states.device, dtype=torch.float32).unsqueeze(1)


def _normalize(states: Tensor) -> Tensor:
    return states / torch.linalg.vector_norm(states, dim=-1, keepdim=True).clamp_min(_EPS)


def paired_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine between matching vectors: [..., H] x [..., H] -> [...] (float32)."""
    return (_normalize(a.float()) * _normalize(b.float())).sum(dim=-1)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """All-pairs cosine per layer: [L, B, H] x [L, B', H] -> [L, B, B'] with entry cos(a_i, b_j) (float32)."""
    return _normalize(a.float()) @ _normalize(b.float()).transpose(1, 2)


def specificity(image_states: Tensor, caption_states: Tensor, center: Tensor | None = None) -> Tensor:
    """Per-layer alignment specificity: own-caption cosine minus mean other-caption cosine.

    For layer l: mean over b of [cos(I_b, C_b) - mean over b' != b of cos(I_b, C_b')]. Near 0 with
    cos(I, C) near 1 means the states collapsed onto a shared direction; near 1 means each image is
    aligned with its own caption and not with the others.

    Args:
        image_states: Pooled image states [L, B, H].
        caption_states: Pooled caption states [L, B, H] (row b is the caption of image b).
        center: Optional per-layer centre [L, H] subtracted from both before the cosines.

    Returns:
        Specificity [L] (float32). With a batch of fewer than 2 samples there are no other captions to
        compare with, and every entry is NaN; callers skip NaN values when they log.
    """
    if image_states.shape != caption_states.shape or image_states.dim() != 3:
        raise ValueError(
            f"specificity needs image and caption states of equal shape [L, B, H], got "
            f"{tuple(image_states.shape)} and {tuple(caption_states.shape)}"
        )
    num_layers, batch, _ = image_states.shape
    if batch < 2:
        return torch.full((num_layers,), float("nan"), device=image_states.device)
    cos = cosine_matrix(apply_center(image_states, center), apply_center(caption_states, center))  # [L, B, B]
    own = torch.diagonal(cos, dim1=1, dim2=2)  # [L, B]
    others = (cos.sum(dim=2) - own) / (batch - 1)  # [L, B]: mean over b' != b
    return (own - others).mean(dim=1)
