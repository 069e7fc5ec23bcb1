"""tga/train/resilience.py

Surviving kills during a long run: complete-checkpoint markers, rotation that never removes the last complete
checkpoint, choosing the checkpoint to resume from, and a clean save-and-stop on SIGTERM.

HF Trainer writes `checkpoint-N/` in place (weights, DeepSpeed states, RNG states, trainer_state.json), so a kill
while saving leaves a folder that looks like a checkpoint but is not one. `CheckpointGuard.on_save` runs after every
rank has finished writing, then writes `checkpoint-N/tga_complete.json` (under a temporary name, renamed), listing
each file and its size. Only folders with a valid marker are resumed from; incomplete folders are set aside as
`incomplete-checkpoint-N` at resume time so that HF never mistakes them for checkpoints. The guard owns
`save_total_limit`: the Trainer's own rotation runs before the marker exists, so the guard takes the limit over and
deletes old checkpoints only once the new one is marked complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from tga.errors import ConfigError, TGAError, TrainingDiverged
from tga.ranks import barrier, is_main_process
from tga.train.divergence import nonfinite_parameters
from tga.train.integrity import (
    COMPLETE_MARKER,
    is_complete,
    list_checkpoints,
    mark_complete,
    read_marker,
    verify,
)
from tga.train.launcher_watch import LauncherWatch
from tga.train.preflight import storage_error
from tga.train.resume_check import write_record
from tga.train.save_schedule import SaveSchedule, save_schedule

logger = logging.getLogger(__name__)

def set_aside(path: str, reason: str, prefix: str) -> str:
    """Rename a checkpoint folder that must not be resumed from to `{prefix}-checkpoint-N` (kept for inspection,
    invisible to HF's checkpoint discovery); returns the new path."""
    target = os.path.join(os.path.dirname(path), f"{prefix}-{os.path.basename(path)}")
    if os.path.exists(target):
        target = f"{target}-{int(time.time())}"
    os.replace(path, target)
    logger.warning("checkpoint %s is not resumed from: %s; moved to %s", path, reason, target)
    return target


def choose_auto_checkpoint(output_dir: str) -> str | None:
    """The newest intact checkpoint of output_dir; newer ones that fail verification and older ones without a valid
    marker are set aside (rank 0). Every rank must call this: the checksums are shared out over the ranks."""
    chosen = None
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify(path, sharded=True, checksum=chosen is None)
        if problem is None and chosen is None:
            chosen = path
        elif problem is not None and is_main_process():
            corrupt = read_marker(path) is not None and "checksum" in problem
            set_aside(path, problem, "corrupt" if corrupt else "incomplete")
    return chosen


def resolve_resume_checkpoint(value: str | bool | None, output_dir: str) -> str | bool | None:
    """What to pass to `Trainer.train(resume_from_checkpoint=...)`.

    Args:
        value: the `--resume_from_checkpoint` option: None, a folder, or "auto" (newest intact one, if any).
        output_dir: the run folder holding `checkpoint-N` folders.

    Returns:
        The checkpoint folder to resume from, or None to start from scratch; other values pass through.

    Raises:
        ConfigError: an explicit folder that is missing or fails its marker's checks.
    """
    if value == "auto":
        latest = choose_auto_checkpoint(output_dir)
        barrier()  # no rank starts reading checkpoints while rank 0 renames
        if latest is not None:
            logger.info("resuming from the newest complete checkpoint %s", latest)
        return latest
    if not isinstance(value, str) or not value:
        return value
    if not os.path.isdir(value):
        raise ConfigError(f"--resume_from_checkpoint {value}: not a folder")
    if read_marker(value) is None:
        logger.warning("--resume_from_checkpoint %s has no %s (written by another tool, or killed while saving): its "
                       "files cannot be verified", value, COMPLETE_MARKER)
        return value
    problem = verify(value, sharded=True)
    if problem is not None:
        raise ConfigError(f"--resume_from_checkpoint {value}: {problem}; resume from an older checkpoint or use "
                          "--resume_from_checkpoint auto (the newest intact one)")
    return value


def rotate_complete(output_dir: str, keep: int, protected: set[str]) -> list[str]:
    """Delete the oldest complete checkpoints beyond `keep`; the newest complete one is always kept."""
    complete = [path for _, path in list_checkpoints(output_dir) if is_complete(path, checksum=False)]
    protected = {os.path.abspath(path) for path in protected} | ({os.path.abspath(complete[-1])} if complete else set())
    removed = []
    for path in complete:
        if len(complete) - len(removed) <= max(keep, 1):
            break
        if os.path.abspath(path) not in protected:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class CheckpointGuard(TrainerCallback):
    """Marks each saved checkpoint complete, then applies `save_total_limit` to complete checkpoints only.

    Before marking, it writes the run's record into the folder (`tga.train.resume_check`) and checks that every
    weight is finite: a checkpoint of a diverged model is never marked complete (`TrainingDiverged`).

    Args:
        keep: how many complete checkpoints to keep (None or <= 0: all). Set the Trainer's own
            `save_total_limit` to None so that it does not delete anything before the marker exists.
        record: the run's record (`resume_check.run_record`), written into each checkpoint.
    """

    def __init__(self, keep: int | None, record: dict | None = None):
        self.keep = keep
        self.record = record
        self.saving: str | None = None  # the checkpoint folder being written, between step end and on_save

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.saving = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return control

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        barrier()  # every rank has written its shards and RNG state
        bad = nonfinite_parameters(model, args.device) if model is not None else []
        if bad:
            raise TrainingDiverged(f"the weights are not finite at step {state.global_step} ({', '.join(bad[:3])}); "
                                   f"{folder} is not marked complete and will not be resumed from")
        if is_main_process() and self.record is not None and os.path.isdir(folder):
            write_record(folder, self.record)
        barrier()  # the record is on disk before any rank lists the folder's files
        if os.path.isdir(folder):
            mark_complete(folder, state.global_step, sharded=True, write=is_main_process())
        if is_main_process() and self.keep is not None and self.keep > 0:
            protected = {state.best_model_checkpoint} if state.best_model_checkpoint else set()
            rotate_complete(args.output_dir, self.keep, protected)
        barrier()
        self.saving = None
        return control


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGUSR1 (or the given signals), save a checkpoint at the end of the current step and stop.

    The handler only sets this object's flag; at each step end the ranks agree (max over ranks) so that all of them
    save and stop at the same step, which the collective save needs. The previous handlers come back with `release`.

    Args:
        signals: the signals to catch. SIGTERM is what SLURM and Kubernetes send before a kill; SIGUSR1 is the
            preemption signal of the SLURM scripts, which `tga.train.slurm` keeps away from the DeepSpeed launcher
            (it SIGKILLs its ranks 30 s after passing SIGTERM on, too soon for a large save).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = signals
        self.requested = False  # set by the handler
        self.stopped = False  # training stopped because of a signal
        self.received: int | None = None  # the signal number
        self.started = False  # on_train_begin ran: the checkpoint to resume from is loaded
        self.previous: dict[int, object] = {}

    def handle(self, signum, frame) -> None:
        if self.requested:  # the SLURM wrapper repeats the signal until the ranks exit
            return
        self.received = signum
        self.request(f"signal {signum} received")

    def request(self, reason: str) -> None:
        """Ask for the stop a signal gives (also from another thread: `tga.train.launcher_watch`)."""
        if not self.requested:
            self.requested = True
            logger.warning("%s: saving a checkpoint at the end of this step, then stopping", reason)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = True
        for number in self.signals:
            self.previous[number] = signal.signal(number, self.handle)
        return control

    def agreed(self, args) -> bool:
        if not torch.distributed.is_initialized():
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed(args):
            self.stopped = True
            control.should_save = True  # even with save_strategy "no": the run must be resumable
            control.should_training_stop = True
        return control

    def release(self) -> int | None:
        """Give the signals back to their previous handlers (after the final save); returns a signal that arrived
        after the last step and was held until now, or None. The handlers stay installed past train end so that a
        signal during the final save waits for it (tga/train/final_save.py)."""
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()
        return self.received if self.requested and not self.stopped else None


class BadRecordsReport(TrainerCallback):
    """Writes `bad_records.json` at the end of training (also after a SIGTERM stop), once every rank is done.

    Args:
        log: the run's `tga.data.guard.BadRecordLog`.
    """

    def __init__(self, log):
        self.log = log

    def on_train_end(self, args, state, control, **kwargs):
        barrier()
        if is_main_process():
            report = self.log.collect()
            path = self.log.write()
            if report["num_skipped"] or report["num_truncated"]:
                logger.warning("%d bad record(s) skipped, %d sample(s) truncated to model_max_length: see %s",
                               report["num_skipped"], report["num_truncated"], path)
        return control


@dataclass
class RunGuards:
    """The reliability callbacks of one training run (see `run_guards`)."""

    checkpoint: CheckpointGuard
    stop: GracefulStop
    report: BadRecordsReport
    launcher: LauncherWatch | None = None
    schedule: SaveSchedule | None = None

    @property
    def callbacks(self) -> list[TrainerCallback]:
        # The stop and schedule callbacks first: the checkpoint guard must see the saves they request.
        ordered = [self.stop, self.schedule, self.checkpoint, self.report, self.launcher]
        return [callback for callback in ordered if callback is not None]

    def failure(self, error: Exception, output_dir: str) -> TGAError | None:
        """A clear error for an exception that escaped training while a checkpoint was written, or None."""
        return storage_error(error, output_dir, saving=self.checkpoint.saving)


def run_guards(training_args, log, record: dict | None = None) -> RunGuards:
    """The callbacks of a training run. The checkpoint guard takes `save_total_limit` over from the Trainer (see the
    module docstring).

    Args:
        training_args: the run's TrainingArguments (its `save_total_limit` is set to None).
        log: the dataset's `BadRecordLog`.
        record: the run's record (`tga.train.resume_check.run_record`), written into every checkpoint.
    """
    stop = GracefulStop()
    guards = RunGuards(CheckpointGuard(training_args.save_total_limit, record), stop, BadRecordsReport(log),
                       launcher=LauncherWatch(stop.request),  # a `deepspeed` command killed alone stops the ranks
                       schedule=save_schedule(getattr(training_args, "save_every_minutes", None)))  # not in HF's args
    training_args.save_total_limit = None
    return guards
