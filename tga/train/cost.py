"""tga/train/cost.py

Compute accounting for every training command (TGA stages, textual and multimodal unlearning): a `TrainerCallback`
that writes `OUTPUT_DIR/cost.json` at the end of training with wall time, optimizer steps, samples, tokens, an
estimate of the FLOPs and the memory the run held.

FLOPs estimate (the usual transformer rule of thumb, documented in docs/unlearning.md):
    6 * P_trained * T_train      forward + backward through the trained parameters
  + 2 * P_frozen  * T_train      forward through the frozen parameters of the trained model
  + 2 * P_ref     * T_ref        forward-only passes (frozen reference model of unlearning, TGA caption pass)
with P counted over parameters (ZeRO-3 partitions counted whole) and T over non-padding tokens. For TGA, P_ref is the
part of the target LLM the caption pass runs (embeddings and the layers up to the deepest target layer) and T_ref the
caption tokens of all ranks; a frozen target's copy is counted in `state_bytes.reference`. It ignores the
activation gradients that backward still computes through frozen layers below trained ones (~2 P T) and counts the
vision tower per LLM token rather than per patch, so it compares methods on one model, not across architectures.

Memory: `state_bytes` (parameters + gradients + optimizer states + reference model, unique storages, this rank, taken
after each optimizer step and before the gradients are zeroed, the largest kept) is exact and deterministic, so it compares variants (LoRA vs two models) on any device; peak RSS and, on CUDA, the
peak allocated bytes are recorded beside it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from tga.ranks import is_main_process

COST_FILE = "cost.json"


@dataclass
class TokenCounter:
    """Tokens counted by a trainer that does not use HF's `num_input_tokens_seen` (local to this rank)."""

    train_tokens: int = 0  # tokens through the trained model (forward + backward)
    reference_tokens: int = 0  # tokens through forward-only passes of a frozen model
    samples: int = 0
    extra: dict = field(default_factory=dict)


def numel(parameter: torch.Tensor) -> int:
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of a model; ZeRO-3 partitioned parameters are counted whole."""
    trainable = frozen = 0
    seen = set()
    for parameter in model.parameters():
        if id(parameter) in seen:  # tied weights
            continue
        seen.add(id(parameter))
        if parameter.requires_grad:
            trainable += numel(parameter)
        else:
            frozen += numel(parameter)
    return trainable, frozen


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device.type)
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def state_bytes(model: torch.nn.Module, optimizer=None, reference: torch.nn.Module | None = None) -> dict[str, int]:
    """Bytes held on this rank by parameters, gradients, optimizer states and a reference model (unique storages).

    Args:
        model: the trained model (unwrapped).
        optimizer: its optimizer, if built (DeepSpeed's wrapper exposes the torch optimizer's `state`).
        reference: a separate frozen reference model, if any.

    Returns:
        Bytes per part and their `total`.
    """
    seen: set = set()
    parts = {"parameters": _storage_bytes(model.parameters(), seen),
             "gradients": _storage_bytes((p.grad for p in model.parameters()), seen)}
    optimizer_tensors = []
    if optimizer is not None:
        for state in getattr(optimizer, "state", {}).values():
            optimizer_tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
    parts["optimizer"] = _storage_bytes(optimizer_tensors, seen)
    parts["reference"] = _storage_bytes(reference.parameters(), seen) if reference is not None else 0
    parts["total"] = sum(parts.values())
    return parts


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _all_reduce_sum(values: list[int]) -> list[int]:
    if not torch.distributed.is_initialized():
        return values
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return [int(value) for value in tensor.tolist()]


class CostCallback(TrainerCallback):
    """Writes `cost.json` into the output folder when training ends.

    Args:
        output_dir: the run folder.
        method: a label for the report ("tga-pretrain", "unlearn-text", ...).
        counter: the trainer's own token counter; None means HF's `state.num_input_tokens_seen` (the caller sets
            `include_num_input_tokens_seen`), counted as train tokens.
        reference: a separate frozen reference model (its forward passes are counted with `counter.reference_tokens`).
        reference_params: parameters of a forward-only pass that is not a separate model (the adapter-disabled base
            under LoRA); defaults to the reference model's size.
        frozen_params: frozen parameters that the training forward actually runs (text-only batches skip the vision
            tower); defaults to all frozen parameters of the model.
        reference_tokens: with `counter` None, a function giving this rank's tokens through the forward-only pass
            (TGA's caption pass: `Guide.caption_tokens`), read once when training ends.
    """

    def __init__(self, output_dir: str, method: str, *, counter: TokenCounter | None = None,
                 reference: torch.nn.Module | None = None, reference_params: int | None = None,
                 frozen_params: int | None = None, reference_tokens=None):
        self.output_dir, self.method, self.counter = output_dir, method, counter
        self.reference, self.reference_params, self.frozen_params = reference, reference_params, frozen_params
        self.reference_tokens = reference_tokens
        self.started = None
        self.peak_state: dict | None = None
        self.report: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Gradients and optimizer states both exist here (after the step, before zero_grad): the state peak.
        current = state_bytes(model, optimizer, self.reference)
        if self.peak_state is None or current["total"] > self.peak_state["total"]:
            self.peak_state = current

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        wall = time.perf_counter() - (self.started or time.perf_counter())
        trainable, frozen = parameter_counts(model)
        if self.counter is not None:
            train_tokens, reference_tokens, samples = _all_reduce_sum(
                [self.counter.train_tokens, self.counter.reference_tokens, self.counter.samples])
        else:
            train_tokens = int(state.num_input_tokens_seen)
            local = int(self.reference_tokens()) if self.reference_tokens is not None else 0
            reference_tokens = _all_reduce_sum([local])[0]
            samples = state.global_step * args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        reference_params = self.reference_params
        if reference_params is None:
            reference_params = sum(numel(p) for p in self.reference.parameters()) if self.reference is not None else 0
        frozen_run = frozen if self.frozen_params is None else self.frozen_params
        flops = {"trained": 6 * trainable * train_tokens, "frozen_forward": 2 * frozen_run * train_tokens,
                 "reference_forward": 2 * reference_params * reference_tokens}
        flops["total"] = sum(flops.values())
        self.report = {
            "method": self.method,
            "wall_time_s": wall,
            "steps": state.global_step,
            "samples": samples,
            "tokens": {"train": train_tokens, "reference": reference_tokens},
            "parameters": {"trainable": trainable, "frozen": frozen, "frozen_forward": frozen_run,
                           "reference": reference_params},
            "flops_estimate": flops,
            "flops_formula": "6*P_trained*T_train + 2*P_frozen*T_train + 2*P_ref*T_ref",
            "hf_total_flos": float(state.total_flos),
            "world_size": args.world_size,
            "memory": {"state_bytes_rank0": self.peak_state or state_bytes(model, optimizer, self.reference),
                       "peak_rss_bytes_rank0": peak_rss_bytes(),
                       "cuda_peak_allocated_bytes_rank0": torch.cuda.max_memory_allocated()
                       if torch.cuda.is_available() else None},
            **({"extra": self.counter.extra} if self.counter is not None and self.counter.extra else {}),
        }
        if is_main_process():
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, COST_FILE), "w", encoding="utf-8") as handle:
                json.dump(self.report, handle, indent=2)
