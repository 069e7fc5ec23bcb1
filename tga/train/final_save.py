"""tga/train/final_save.py

The end of a stage, protected like the periodic checkpoints: the final files (model folder or projector, tokenizer,
processor, trainer_state.json) are written into `OUTPUT_DIR/.tga-final.tmp`, hashed and marked complete there, and
only then moved into the output folder, the marker last. A kill or a full disk in the middle leaves no final folder
that looks complete: the marker is missing, a failed write removes the staging folder and is a `CheckpointError`
naming the folder and the free space. Weights that are not finite are never written (`TrainingDiverged`).

Signals that arrive during the save (SIGTERM, SIGUSR1 from a scheduler, Ctrl-C) are held by the run's
`GracefulStop` until the save is done; the stage then re-raises them (tga/train/run.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal

from tga.errors import TrainingDiverged
from tga.ranks import barrier, is_main_process
from tga.train.divergence import nonfinite_parameters
from tga.train.integrity import COMPLETE_MARKER, mark_complete
from tga.train.preflight import CheckpointError, free_space

STAGING = ".tga-final.tmp"

logger = logging.getLogger(__name__)


def publish(staging: str, output_dir: str) -> None:
    """Move every staged entry into output_dir (renames within one file system), the completion marker last."""
    for name in sorted(os.listdir(staging), key=lambda entry: entry == COMPLETE_MARKER):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def save_final(write, output_dir: str, step: int, model, device=None, newest_checkpoint: str | None = None) -> None:
    """Write a stage's final files atomically. Every rank calls this (the ZeRO-3 gathers of `write` are collective).

    Args:
        write: `write(folder)` writes every final file into `folder` (called on every rank).
        output_dir: the run folder.
        step: the global step the files hold (recorded in the marker).
        model: the trained model, checked for non-finite weights first.
        newest_checkpoint: the newest complete checkpoint (named in the error of a failed save).
    """
    bad = nonfinite_parameters(model, device)
    if bad:
        raise TrainingDiverged(f"the trained weights are not finite ({', '.join(bad[:3])}); the final model is not "
                               f"written to {output_dir}")
    staging = os.path.join(output_dir, STAGING)
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        with contextlib.suppress(FileNotFoundError):  # an earlier final folder stops counting as complete now
            os.remove(os.path.join(output_dir, COMPLETE_MARKER))
    barrier()
    try:
        write(staging)
        barrier()
        mark_complete(staging, step, sharded=True, write=is_main_process())
        barrier()
        if is_main_process():
            publish(staging, output_dir)
    except Exception as error:
        if is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        resume = (f"the newest complete checkpoint is {newest_checkpoint}: free space and rerun with "
                  "--resume_from_checkpoint auto" if newest_checkpoint else
                  "no checkpoint was saved during the run, so its training is lost: free space and rerun (save with "
                  "--save_steps or --save_every_minutes to keep a resume point)")
        raise CheckpointError(f"cannot write the final model to {output_dir} ({type(error).__name__}: {error}; "
                              f"{free_space(output_dir)}); the partial files were removed; {resume}") from error
    barrier()


def take_held_signal(held: int | None, output_dir: str) -> None:
    """Let a signal that waited for the final save take effect now (call after the output folder is released)."""
    if held is not None:
        logger.warning("signal %d arrived during the final save, which was completed first (%s)", held, output_dir)
        signal.raise_signal(held)
