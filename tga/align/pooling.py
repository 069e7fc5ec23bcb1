"""tga/align/pooling.py

Masked mean pooling of LLM hidden states into one vector per sample and layer. The TGA guide loss
compares the mean hidden state of a sample's image tokens (or retrieved-text tokens) with the mean
hidden state of its caption tokens; the positions come from boolean masks built by the collator, so
no token offsets are ever hard-coded. Pooling selects the masked tokens first and only then casts them
to float32, so half-precision training never materialises a float32 copy of a whole [B, T, H] tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tga.errors import ConfigError


def _check_mask(hidden: Tensor, mask: Tensor) -> Tensor:
    """Return `mask` as bool after checking that it is [B, T] and matches `hidden` [B, T, H]."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be [batch, tokens, hidden], got shape {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape)} (expected [B, T])"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(hidden: Tensor, mask: Tensor, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Mean of `hidden` over the positions where `mask` is True, per sample.

    Padding and every unmasked position are excluded whatever side they are on. A row whose mask is
    empty pools to a zero vector, and its gradient is exactly zero (never NaN).

    Args:
        hidden: Hidden states [B, T, H], any floating dtype.
        mask: Positions to average [B, T]; bool (integer masks are read as `!= 0`).
        dtype: Accumulation and output dtype; float32 by default. The cast happens after the masked
            tokens are selected, so only [N_selected, H] values are converted. None keeps `hidden.dtype`.

    Returns:
        Pooled states [B, H] in `dtype`.
    """
    mask = _check_mask(hidden, mask)
    batch, _, size = hidden.shape
    out_dtype = hidden.dtype if dtype is None else dtype
    rows, cols = mask.nonzero(as_tuple=True)
    selected = hidden[rows, cols].to(out_dtype)  # [N, H]: only the masked tokens are cast
    sums = torch.zeros(batch, size, dtype=out_dtype, device=hidden.device).index_add(0, rows, selected)
    # clamp(min=1): an empty row divides a zero sum by one, which keeps its value and gradient at zero.
    counts = mask.sum(dim=1).clamp(min=1).to(out_dtype)
    return sums / counts.unsqueeze(-1)


def pool_layers(
    hidden_states: Sequence[Tensor],
    layers: Sequence[int],
    mask: Tensor,
    dtype: torch.dtype | None = torch.float32,
) -> Tensor:
    """Masked means of several layers of an HF `hidden_states` tuple, stacked.

    Args:
        hidden_states: The model's `output.hidden_states`: index 0 is the embedding output, index j
            the output of decoder layer j; each [B, T, H]. It may be shorter than the full depth (a pass
            stopped after the deepest target layer) as long as every index in `layers` exists.
        layers: Hidden-state indices to pool (see `tga.align.layers.parse_layer_spec`).
        mask: Positions to average [B, T] (image, retrieved-text or caption tokens).
        dtype: Accumulation and output dtype (float32 by default, also for bf16/fp16 states).

    Returns:
        Pooled states [L, B, H] with L = len(layers), in the order of `layers`.

    Raises:
        ConfigError: `layers` is empty or names an index the hidden states do not have.
    """
    if len(layers) == 0:
        raise ConfigError("--tga_layers: no target layers to pool (the guide loss needs at least one layer)")
    available = len(hidden_states)
    for index in layers:
        if not 0 <= index < available:
            raise ConfigError(
                f"--tga_layers: layer {index} is out of range; the model returned hidden states 0..{available - 1} "
                "(0 = embeddings, j = output of decoder layer j)"
            )
    return torch.stack([masked_mean(hidden_states[index], mask, dtype=dtype) for index in layers])
