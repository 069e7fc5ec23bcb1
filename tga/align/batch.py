"""tga/align/batch.py

What the guide reads from a training batch, typed: the spans of the training sequence (image tokens, retrieved
text), the caption batch of the samples that enter the guide and their places. The collator (tga.data.collator) fills
one `GuideBatch` per batch under the key `guide`; the trainer hands it to `Guide` whole, apart from the model's own
inputs. Plain data (tensors and a list of ids): it depends on nothing else in the project.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(eq=False)  # tensors have no single truth value: compare fields, not batches
class GuideBatch:
    """The guide's part of a batch of B rows (T tokens), G of which enter the guide (non-toxic, with a caption).

    image_mask, retrieved_mask: [B, T] positions of the image tokens and of the retrieved text.
    guide_index: [G] the guided rows of the batch (None: no row is guided).
    caption_input_ids, caption_attention_mask, caption_mask: [G, Tc] the caption-pass prompts, their padding mask and
        the caption's tokens in them.
    guide_with_retrieved, guide_without_retrieved: positions within the G guided rows with and without retrieved text
        (index lists, so that splitting on them never reads a device value back).
    guide_ids: the G record ids (the rows of the caption-state bank).
    request_mask, caption_request_mask: [B, T] and [G, Tc] the paired request tokens of `--tga_form request`.
    """

    image_mask: Tensor
    retrieved_mask: Tensor
    guide_index: Tensor | None = None
    caption_input_ids: Tensor | None = None
    caption_attention_mask: Tensor | None = None
    caption_mask: Tensor | None = None
    guide_with_retrieved: Tensor | None = None
    guide_without_retrieved: Tensor | None = None
    guide_ids: list[str] | None = None
    request_mask: Tensor | None = None
    caption_request_mask: Tensor | None = None

    @property
    def guided(self) -> int:
        """G, the number of guided rows (read from the index's shape, never from the device)."""
        return 0 if self.guide_index is None else int(self.guide_index.numel())

    def to(self, device, non_blocking: bool = False) -> GuideBatch:
        """The same batch with every tensor on `device` (accelerate's device transfer calls this)."""
        moved = {}
        for field in fields(self):
            value = getattr(self, field.name)
            moved[field.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return GuideBatch(**moved)
