"""tga/ranks.py

Which rank this is, waiting for the others, and the full values of ZeRO-3 partitioned parameters: what the model,
the guide and the training code all need, below all of them (process setup is tga/train/distributed.py). Each is a
no-op in a single process.
"""

from __future__ import annotations

import contextlib

import torch


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
