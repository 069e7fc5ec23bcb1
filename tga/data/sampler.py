"""tga/data/sampler.py

The modality-length grouped sampler (LLaVA's `--group_by_modality_length`): batches hold only image records or
only text-only records, and inside each megabatch (one batch per rank) samples are sorted by length so that padding
is small and every rank gets batches of similar length. Deterministic for a seed and an epoch.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


def grouped_indices(lengths: list[int], batch_size: int, world_size: int, generator: torch.Generator) -> list[int]:
    megabatch = batch_size * world_size
    groups = [[i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n < 0]]
    full, leftovers = [], []
    for group in groups:
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        chunks = [order[start : start + megabatch] for start in range(0, len(order), megabatch)]
        if chunks and len(chunks[-1]) < megabatch:
            leftovers += chunks.pop()
        full += [sorted(chunk, key=lambda i: abs(lengths[i]), reverse=True) for chunk in chunks]
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    # Partial megabatches of both modalities go last, so every full batch stays single-modality.
    return [index for chunk in shuffled for index in chunk] + leftovers


class ModalityLengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: list[int], batch_size: int, world_size: int = 1, seed: int = 0):
        if any(length == 0 for length in lengths):
            raise ValueError("modality lengths must be non-zero (positive: image records, negative: text-only)")
        self.lengths, self.batch_size, self.world_size, self.seed = lengths, batch_size, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
