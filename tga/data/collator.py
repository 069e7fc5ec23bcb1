"""tga/data/collator.py

Pads a list of samples into a batch: input_ids / labels / attention_mask / pixel_values for the model, and under
`guide` a `tga.align.batch.GuideBatch`, the guide's part: `image_mask` and `retrieved_mask` over the training
sequence, and a caption batch (`caption_input_ids`, `caption_attention_mask`, `caption_mask`) holding the
caption-only text of the samples that enter the guide loss, whose positions in the main batch are `guide_index`, split
by `guide_with_retrieved` / `guide_without_retrieved` (positions within the caption batch), and `guide_ids`, their
record ids (the rows of the caption-state bank). The request-token guide adds `request_mask` (every row) and
`caption_request_mask` (the caption batch): its paired tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tga.align.batch import GuideBatch
from tga.data.tokenize import IGNORE_INDEX


def pad(sequences: list[torch.Tensor], value, dtype=None) -> torch.Tensor:
    """Right-pad 1-D tensors to one length (training never needs left padding)."""
    width = max(sequence.numel() for sequence in sequences)
    out = torch.full((len(sequences), width), value, dtype=dtype or sequences[0].dtype)
    for row, sequence in enumerate(sequences):
        out[row, : sequence.numel()] = sequence
    return out


@dataclass
class VLMCollator:
    pad_token_id: int

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor | GuideBatch]:
        input_ids = pad([s["input_ids"] for s in samples], self.pad_token_id)
        batch = {
            "input_ids": input_ids,
            "labels": pad([s["labels"] for s in samples], IGNORE_INDEX),
            "attention_mask": pad([torch.ones_like(s["input_ids"], dtype=torch.bool) for s in samples], False),
        }
        images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        if images:
            # Images are stacked in sample order: HF Llava scatters them into the image-token positions in that order.
            batch["pixel_values"] = torch.stack(images)
        batch["guide"] = self.guide_batch(samples)
        return batch

    def guide_batch(self, samples: list[dict]) -> GuideBatch:
        """The guide's part of the batch: the training sequence's spans and the caption batch of the guided rows."""
        guide = GuideBatch(image_mask=pad([s["image_mask"] for s in samples], False),
                           retrieved_mask=pad([s["retrieved_mask"] for s in samples], False))
        if "request_mask" in samples[0]:  # --tga_form request: paired request tokens (tga.align.request_guide)
            guide.request_mask = pad([s["request_mask"] for s in samples], False)
        guided = [row for row, sample in enumerate(samples) if sample.get("guide")]
        if not guided:
            return guide
        guide.guide_index = torch.tensor(guided, dtype=torch.long)
        guide.caption_input_ids = pad([samples[row]["caption_input_ids"] for row in guided], self.pad_token_id)
        guide.caption_attention_mask = pad(
            [torch.ones_like(samples[row]["caption_input_ids"], dtype=torch.bool) for row in guided], False)
        guide.caption_mask = pad([samples[row]["caption_mask"] for row in guided], False)
        if "caption_request_mask" in samples[guided[0]]:
            guide.caption_request_mask = pad([samples[row]["caption_request_mask"] for row in guided], False)
        # Which guide samples have retrieved text, as index lists: the trainer splits on them without reading
        # a device tensor back (a boolean mask on the accelerator would make every step wait for it).
        retrieved = [bool(samples[row]["retrieved_mask"].any()) for row in guided]
        guide.guide_ids = [samples[row]["id"] for row in guided]  # rows of the caption-state bank
        guide.guide_with_retrieved = torch.tensor([i for i, r in enumerate(retrieved) if r], dtype=torch.long)
        guide.guide_without_retrieved = torch.tensor([i for i, r in enumerate(retrieved) if not r], dtype=torch.long)
        return guide
