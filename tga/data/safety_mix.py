"""tga/data/safety_mix.py

Safety data mixed into stage 2, the way VLGuard does it (Zong et al., "Safety Fine-Tuning at (Almost) No Cost: A
Baseline for Vision Large Language Models", ICML 2024): records of images with refusals (and, as VLGuard has them,
safe images with helpful answers) are added to the instruction data. `--safety_ratio R` sets the share of safety
records among all records of an epoch: the safety set is repeated or subsampled (a seeded draw) to
round(R * N / (1 - R)) records for N instruction records, so any sampler that visits every index once per epoch
(the default random sampler, the modality-length grouped one) shows exactly that share; without a ratio every safety
record appears once. Safety records behave like any other record (a refusal on a toxic image should carry
`"toxic": true`, which keeps it out of TGA's guide loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tga.data.records import Record
from tga.errors import ConfigError


def safety_count(main: int, safety: int, ratio: float | None) -> int:
    """How many safety records an epoch holds beside `main` instruction records."""
    if ratio is None:
        return safety
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"--safety_ratio must lie strictly between 0 and 1, got {ratio}")
    return max(1, round(ratio * main / (1.0 - ratio)))


def safety_indices(available: int, count: int, seed: int) -> list[int]:
    """`count` indices into the safety set: whole passes over it, then a seeded draw without repeats for the rest."""
    passes, rest = divmod(count, available)
    drawn = np.random.default_rng([seed, 7]).permutation(available)[:rest]
    return [i for _ in range(passes) for i in range(available)] + sorted(int(i) for i in drawn)


class MixedRecords(Sequence[Record]):
    """The instruction records followed by the chosen safety records (each a `Record`).

    Args:
        main: the `--data_path` records (`ArrowRecords` or a list).
        safety: the `--safety_data` records.
        ratio: the share of safety records per epoch (None: every safety record once).
        seed: seeds the draw when the safety set is subsampled.
    """

    def __init__(self, main: Sequence[Record], safety: Sequence[Record], ratio: float | None, *, seed: int = 0):
        if not safety:
            raise ConfigError("--safety_data: no records")
        self.main, self.safety = main, safety
        self.chosen = safety_indices(len(safety), safety_count(len(main), len(safety), ratio), seed)
        self.rejected = list(getattr(main, "rejected", [])) + list(getattr(safety, "rejected", []))

    def __len__(self) -> int:
        return len(self.main) + len(self.chosen)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if index < len(self.main):
            return self.main[index]
        return self.safety[self.chosen[index - len(self.main)]]

    def is_safety(self, index: int) -> bool:
        return index >= len(self.main)

    @property
    def modality_lengths(self) -> list[int]:
        safety = self.safety.modality_lengths if hasattr(self.safety, "modality_lengths") else None
        if safety is None:
            from tga.data.dataset import modality_length

            safety = [modality_length(record) for record in self.safety]
        main = self.main.modality_lengths if hasattr(self.main, "modality_lengths") else None
        if main is None:
            from tga.data.dataset import modality_length

            main = [modality_length(record) for record in self.main]
        return list(main) + [safety[i] for i in self.chosen]
