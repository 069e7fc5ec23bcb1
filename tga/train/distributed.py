"""tga/train/distributed.py

Process setup for DeepSpeed and accelerate, and the ZeRO-3 helpers the rest of the project uses, in one place.

GPU runs need nothing special: `deepspeed scripts/finetune.py ...` sets the rank variables and NCCL is used. On a
machine without CUDA (tests, the demo) DeepSpeed runs on its CPU accelerator with the gloo backend: accelerate must
be told to use DeepSpeed and gloo before TrainingArguments is built, or it sees a world of size 1. A plain
`python scripts/finetune.py` run with a DeepSpeed config gets single-process rank variables (otherwise DeepSpeed
tries to discover an MPI launch).
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch

from tga.config import flag_value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_process(argv: list[str]) -> list[str]:
    """Set up the process for the run described by `argv` (YAML already expanded); returns argv to parse."""
    uses_deepspeed = bool(flag_value(argv, "deepspeed"))  # `--deepspeed ""` turns a YAML's DeepSpeed off
    if uses_deepspeed and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available() or not (uses_deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return argv
    from accelerate import PartialState

    if uses_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return [*argv, "--accelerator_config", '{"use_configured_state": true}']


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
