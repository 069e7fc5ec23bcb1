"""tga/train/save_schedule.py

Time-based checkpoints: `--save_every_minutes M` saves a checkpoint at the end of the first optimizer step that ends
M minutes or more after the last save (or after train start), whatever `save_strategy` says, "no" included.

A step count alone bounds the work a crash loses only when the step time is known; the same recipe runs at very
different speeds on different clusters and precisions. The time-based save bounds the lost time instead; the two
combine (any save, step-based or by a signal, restarts the clock). Rank 0's clock decides and the ranks learn its
decision from one small broadcast per step, because a ZeRO-3 save is collective: every rank must save at the same step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from tga.errors import ConfigError
from tga.ranks import is_main_process

logger = logging.getLogger(__name__)


class SaveSchedule(TrainerCallback):
    """Asks for a checkpoint when `minutes` have passed since the last save or train start.

    Args:
        minutes: the interval (> 0).
        clock: seconds from any fixed origin (tests inject a fake one).
    """

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic):
        if not minutes > 0:
            raise ConfigError(f"--save_every_minutes {minutes}: expected a positive number of minutes")
        self.interval = minutes * 60.0
        self.clock = clock
        self.last: float | None = None  # the clock at the last save, or at train start

    def due(self, args) -> bool:
        """Whether rank 0's interval has passed; every rank must call it at every step (one broadcast)."""
        passed = self.last is not None and self.clock() - self.last >= self.interval
        if not torch.distributed.is_initialized():
            return passed
        flag = torch.tensor([1 if passed else 0], device=args.device)
        torch.distributed.broadcast(flag, src=0)  # rank 0's clock decides
        return bool(flag.item())

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = self.clock()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.due(args) and not control.should_save:
            if is_main_process():
                logger.info("%.1f minutes since the last checkpoint: saving one at step %d",
                            (self.clock() - self.last) / 60.0, state.global_step)
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last = self.clock()
        return control


def save_schedule(minutes: float | None) -> SaveSchedule | None:
    """The time-based save of `--save_every_minutes`, or None when it is not set."""
    return None if minutes is None else SaveSchedule(minutes)
