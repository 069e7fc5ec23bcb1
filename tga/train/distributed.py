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
import logging
import os
import socket
import sys
import time
from typing import NoReturn

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


def end_process(code: int) -> NoReturn:
    """End a rank of a run with exit status `code`; the entry-point scripts call this last.

    Without a process group this is `sys.exit(code)`. With one, a rank whose run finished (`code` 0) first waits for
    the others, so that it does not leave while rank 0 still writes the model folder, and tears the group down. The
    rank then runs the atexit handlers (wandb, logging, the run lock, the CPU comm buffer), flushes its output and
    leaves without the interpreter's teardown (`os._exit`): ZeRO-3 keeps the model, and through its parameters the
    gloo or NCCL groups and their worker threads, in DeepSpeed's module-level state (`FWD_MODULE_STACK`, a class-level
    cache) until that teardown, and a worker thread that releases work once the GIL is gone aborts the rank
    ("terminate called without an active exception", exit -6) after a run that finished; the launcher then fails
    the whole job. A failed rank skips the wait, which could hang on ranks that are gone.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        sys.exit(code)
    if code == 0:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    atexit._run_exitfuncs()  # what a normal exit runs first; os._exit below runs nothing
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_entry_point(name: str, run, argv: list[str]) -> NoReturn:
    """The body of `scripts/<name>.py`: `run(argv)`, a `TGAError` as one line on stderr with its exit code, then
    `end_process`. Other exceptions keep their traceback."""
    from tga.errors import TGAError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(argv)
        code = 0
    except TGAError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        code = getattr(error, "exit_code", 2)
    end_process(code)
