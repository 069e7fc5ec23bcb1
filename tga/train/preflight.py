"""tga/train/preflight.py

Checks of the run folder before any training step: it must be writable and have room for a checkpoint. A full
disk or a read-only mount then fails in the first seconds with a `ConfigError` naming `--output_dir`, instead of
after hours at the first save. Errors raised while a checkpoint is written are turned into a `CheckpointError` that
names the path (the previous complete checkpoint is untouched: see tga/train/resilience.py).
"""

from __future__ import annotations

import errno
import os
import shutil

import torch

from tga.errors import ConfigError, TGAError
from tga.ranks import is_main_process

# errno values that mean "the disk or the folder will not take our files", not a bug.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class CheckpointError(TGAError):
    """Writing a checkpoint or model file failed (disk full, quota, read-only or forbidden folder)."""


def check_output_dir(output_dir: str) -> None:
    """Create output_dir if needed and prove that a file can be written, synced and removed there.

    Args:
        output_dir: the run folder (`--output_dir`).
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".tga_write_probe-{os.getpid()}")
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir} is not writable ({error.strerror or error})") from error


def checkpoint_bytes(model: torch.nn.Module, optimizer_states: int = 2) -> int:
    """A lower bound of one checkpoint's size: all weights, plus fp32 optimizer states of the trainable ones.

    Args:
        model: the model to be trained (under ZeRO-3, `ds_numel` holds the full size of a partitioned parameter).
        optimizer_states: fp32 tensors per trainable parameter kept by the optimizer (AdamW: 2).
    """
    total = 0
    for parameter in model.parameters():
        numel = getattr(parameter, "ds_numel", parameter.numel())
        total += numel * parameter.element_size()
        if parameter.requires_grad:
            total += numel * 4 * optimizer_states
    return total


def check_free_space(output_dir: str, needed_bytes: int) -> None:
    """Raise a `ConfigError` when the output folder's file system has less free space than `needed_bytes`."""
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise ConfigError(
            f"--output_dir {output_dir}: {free / 2**30:.2f} GiB free, but one checkpoint needs about "
            f"{needed_bytes / 2**30:.2f} GiB; free space or choose another folder"
        )


def preflight(output_dir: str, model: torch.nn.Module) -> None:
    """Both checks, on the main process (the folder is shared by the ranks of a node)."""
    if is_main_process():
        check_output_dir(output_dir)
        check_free_space(output_dir, checkpoint_bytes(model))


def free_space(folder: str) -> str:
    """The free space of folder's file system, in words."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free"
    except OSError:
        return "free space unknown"


def storage_error(error: Exception, output_dir: str, *, saving: str | None = None) -> CheckpointError | None:
    """A `CheckpointError` naming the path for a failure to write files, or None for other errors.

    Args:
        error: what escaped training.
        output_dir: the run folder.
        saving: the checkpoint folder being written when the error happened (None: not saving). torch.save reports a
            full disk as a bare RuntimeError, so any error while saving counts.
    """
    is_storage = isinstance(error, OSError) and error.errno in STORAGE_ERRNOS
    if not is_storage and saving is None:
        return None
    path = (error.filename if isinstance(error, OSError) else None) or saving or output_dir
    free = free_space(output_dir)
    return CheckpointError(
        f"cannot write {path} ({type(error).__name__}: {error}; {free}); the newest checkpoint with a "
        f"tga_complete.json marker in {output_dir} is intact: free space and rerun with --resume_from_checkpoint auto"
    )
