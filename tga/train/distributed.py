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

import torch

from tga.config import flag_value
from tga.options import config_argv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_process(argv: list[str]) -> list[str]:
    """Set up the process for the run described by `argv` (a YAML path and flags); returns argv to parse."""
    uses_deepspeed = bool(flag_value(config_argv(argv), "deepspeed"))  # `--deepspeed ""` turns a YAML's DeepSpeed off
    if uses_deepspeed and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available() or not (uses_deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return argv
    from accelerate import PartialState

    if uses_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
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
