"""tga/running_means.py

Per-step training metrics (TGA cosines, unlearning loss parts) averaged between two logging steps, so a trainer's
`log` reports the mean since the last log rather than the last step's value. NaN values (e.g. the specificity of a
one-sample batch) are left out of the mean. `DeviceMeans` does the same for tensors without reading them before the
logging step.
"""

from __future__ import annotations

from collections import defaultdict

import torch


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


class DeviceMeans:
    """`RunningMeans` for tensors that stay on their device: `add` folds a value into a device-side sum and count
    (NaN entries left out) without reading it, so a training step never waits for the accelerator; `drain` reads
    every sum in one transfer, at a logging step. A value may be a scalar or a vector (one entry per target layer),
    or a Python number."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, key: str, value) -> None:
        value = torch.as_tensor(value).detach().float()
        present = ~torch.isnan(value)
        value = torch.where(present, value, torch.zeros_like(value))
        if key in self.sums:
            self.sums[key] = self.sums[key] + value
            self.counts[key] = self.counts[key] + present
        else:
            self.sums[key], self.counts[key] = value, present.float()

    def drain(self) -> dict[str, float | list[float]]:
        """The means since the last drain (a list per vector key; entries never seen are left out); resets."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        sizes = [self.sums[key].numel() for key in keys]
        device = self.sums[keys[0]].device
        packed = torch.cat([torch.cat([self.sums[k].flatten().to(device), self.counts[k].flatten().to(device)])
                            for k in keys]).tolist()  # the one read of the logging step
        means, offset = {}, 0
        for key, size in zip(keys, sizes):
            sums, counts = packed[offset:offset + size], packed[offset + size:offset + 2 * size]
            offset += 2 * size
            values = [s / c if c else float("nan") for s, c in zip(sums, counts)]
            if self.sums[key].dim() == 0:
                if counts[0]:
                    means[key] = values[0]
            else:
                means[key] = values
        self.sums.clear()
        self.counts.clear()
        return means
