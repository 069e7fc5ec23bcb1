"""tga/train/distributed.py

Process setup for DeepSpeed and accelerate, and the ZeRO-3 helpers the rest of the project uses, in one place.

GPU runs need nothing special: `deepspeed scripts/finetune.py ...` sets the rank variables and NCCL is used. On a
machine without CUDA (tests, the demo) DeepSpeed runs on its CPU accelerator with the gloo backend: accelerate must
be told to use DeepSpeed and gloo before TrainingArguments is built, or it sees a world of size 1. A plain
`python scripts/finetune.py` run with a DeepSpeed config gets single-process rank variables (otherwise DeepSpeed
tries to discover an MPI launch).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import time

import torch

from tga.config import flag_value
from tga.options import config_argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_process(argv: list[str]) -> list[str]:
    """Set up the process for the run described by `argv` (a YAML path and flags); returns argv to parse."""
    expanded = config_argv(argv)
    uses_deepspeed = bool(flag_value(expanded, "deepspeed"))  # `--deepspeed ""` turns a YAML's DeepSpeed off
    if not torch.cuda.is_available() and flag_value(expanded, "dataloader_pin_memory") is None:
        # pinned memory only speeds copies to an accelerator; without one torch warns on every data loader
        argv = [*argv, "--dataloader_pin_memory", "false"]
    if uses_deepspeed and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available() or not (uses_deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return argv
    from accelerate import PartialState

    if uses_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        remove_orphaned_comm_buffers()
        atexit.register(release_cpu_comm_buffer, cpu_comm_buffer_path())
    PartialState(backend="gloo")
    return [*argv, "--accelerator_config", '{"use_configured_state": true}']


def cpu_comm_buffer_path() -> str:
    """The shared-memory segment DeepSpeed's CPU all-reduce opens for this rank (its naming, in csrc/cpu/comm/shm.cpp)."""
    env = os.environ
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")


def release_cpu_comm_buffer(path: str) -> None:
    """Unlink this rank's all-reduce segment at exit.

    [IMPORTANT] DeepSpeed's CPU backend never unlinks it: every multi-rank CPU run left 66 MB per rank in /dev/shm,
    which is RAM (a day of test runs held 13 GB). Unlinking at exit is safe: every rank opened the segments it needs
    when the process group started, and the memory is freed once the last process unmaps it.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _segments_in_use(prefix: str) -> set[str]:
    """Paths under /dev/shm starting with `prefix` that a live process has open or mapped.

    Open files are read before mappings: DeepSpeed opens a segment, writes it, maps it and only then closes the file,
    so a process that is between the two reads still shows one of them.
    """
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(prefix):
                        used.add(target)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.startswith(prefix):
                    used.add(path.removesuffix(" (deleted)"))
    return used


def remove_orphaned_comm_buffers(min_age_s: float = 5.0) -> list[str]:
    """Remove this user's DeepSpeed all-reduce segments that no live process has open or mapped; returns them.

    A rank killed with SIGKILL (preemption past its grace time, the OOM killer) never runs its exit cleanup, so its
    66 MB segment stays in /dev/shm, which is RAM. Every starting CPU run calls this. Segments of other runs that are
    alive are in use and kept; so are segments younger than `min_age_s` (one being created at this moment).
    """
    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
    with contextlib.suppress(OSError):
        candidates = [f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if f"/dev/shm/{name}".startswith(prefix)]
        if not candidates:
            return []
        in_use = _segments_in_use(prefix)
        removed = []
        for path in candidates:
            with contextlib.suppress(OSError):
                if path not in in_use and time.time() - os.stat(path).st_mtime >= min_age_s:
                    os.unlink(path)
                    removed.append(path)
        return removed
    return []


def is_zero3_param(parameter: torch.nn.Parameter) -> bool:
    return hasattr(parameter, "ds_id")


@contextlib.contextmanager
def gathered(parameters):
    """Full values of (possibly ZeRO-3 partitioned) parameters inside the block; a no-op without ZeRO-3."""
    parameters = [p for p in parameters if is_zero3_param(p)]
    if not parameters:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield


def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def finish_distributed() -> None:
    """Wait for every rank, then tear the process group down before the interpreter exits.

    Without it a rank that is done exits while rank 0 still writes the model folder, and its backend threads can be
    destroyed mid-wait ("terminate called without an active exception"): the rank aborts and the launcher kills a run
    that finished. The entry-point scripts call this last.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
