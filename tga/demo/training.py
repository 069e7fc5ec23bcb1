"""tga/demo/training.py

Small helpers shared by the demo's two training loops (tiny CLIP, tiny text LLM): a warmup + cosine learning-rate
schedule, a context that seeds torch and turns on deterministic algorithms only for its duration, and a wall clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the optimizer's lr, then cosine decay to 10% of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # Python floats: this is a schedule, no tensors

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and use deterministic algorithms inside the block; the previous setting is restored after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """Yields a function returning the seconds since the block started."""
    start = time.perf_counter()
    yield lambda: time.perf_counter() - start
