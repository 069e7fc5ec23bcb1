"""tga/train/throughput.py

Throughput and ETA between two logging steps: samples/s, trained (non-padding) tokens/s, seconds per optimizer step
and the estimated seconds left, added to every training log (console, trainer_state.json, wandb/tensorboard) beside
the progress bar's own rate. A `TrainerCallback` so that the clock starts when training (or a resumed run) begins.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from transformers import TrainerCallback


class Throughput(TrainerCallback):
    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.last: tuple[float, int, int | None] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (self.clock(), state.global_step, getattr(state, "num_input_tokens_seen", None))

    def measure(self, step: int, max_steps: int, samples_per_step: int, tokens_seen: int | None) -> dict[str, float]:
        """Rates since the previous call (or the start of training); empty when no step has passed."""
        now = self.clock()
        if self.last is None:
            self.last = (now, step, tokens_seen)
            return {}
        then, last_step, last_tokens = self.last
        seconds, steps = now - then, step - last_step
        if seconds <= 0 or steps <= 0:
            return {}
        self.last = (now, step, tokens_seen)
        rates = {"throughput/samples_per_second": steps * samples_per_step / seconds,
                 "throughput/seconds_per_step": seconds / steps,
                 "throughput/eta_seconds": max(0, max_steps - step) * seconds / steps}
        if tokens_seen is not None and last_tokens is not None:
            rates["throughput/tokens_per_second"] = (tokens_seen - last_tokens) / seconds
        return rates
