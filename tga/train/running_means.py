"""tga/train/running_means.py

Per-step training metrics (TGA cosines, unlearning loss parts) averaged between two logging steps, so a trainer's
`log` reports the mean since the last log rather than the last step's value. NaN values (e.g. the specificity of a
one-sample batch) are left out of the mean.
"""

from __future__ import annotations

from collections import defaultdict


class RunningMeans:
    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, key: str, value: float) -> None:
        if value == value:
            self.sums[key] += value
            self.counts[key] += 1

    def drain(self) -> dict[str, float]:
        """The means since the last drain; resets."""
        means = {key: self.sums[key] / self.counts[key] for key in self.counts}
        self.sums.clear()
        self.counts.clear()
        return means
