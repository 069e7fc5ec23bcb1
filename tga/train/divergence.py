"""tga/train/divergence.py

Non-finite training never passes for a finished run.

HF's Trainer logs a non-finite loss as the mean of earlier ones (`logging_nan_inf_filter`), so a run whose weights
turned into NaN used to log losses of 0, save checkpoints full of NaN, mark them complete and exit 0. `StepHealth`
watches every optimizer step instead:

- a step is *non-finite* when any rank saw a non-finite micro-batch loss, or its gradients were not finite (checked
  before the optimizer step without DeepSpeed; with DeepSpeed the engine skips such a step itself and says so);
- such a step is skipped, not applied (without DeepSpeed the gradients are dropped before the optimizer step; the
  optimizer then leaves the weights and its moments as they were), and counted; past `--max_nonfinite_steps`
  (default 0) the run stops with `TrainingDiverged`, naming the step, the last finite loss and the newest complete
  checkpoint;
- a loss that stays at ln(vocabulary size), the loss of a uniform prediction, for `STUCK_STEPS` steps is warned about
  once (a run that collapsed under too high a learning rate: it trains on but learns nothing).

`nonfinite_parameters` is the check the checkpoint guard and the final save run before anything is marked complete.
The ranks agree on every decision with one small all-reduce per step.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

from tga.errors import TrainingDiverged

logger = logging.getLogger(__name__)

STUCK_STEPS = 20  # consecutive steps at ln(vocabulary) before the warning
STUCK_TOLERANCE = 0.002  # relative distance from ln(vocabulary) that counts as "at" it (a uniform prediction is exact)


def _all_reduce(values: list[float], device) -> list[float]:
    """Sum of `values` over the ranks (one collective; the values themselves in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def nonfinite_parameters(model: torch.nn.Module, device=None) -> list[str]:
    """Names of parameters holding a NaN or infinity, on any rank (every rank must call this under ZeRO-3: the local
    partitions are checked and the count is shared)."""
    bad = []
    for name, parameter in model.named_parameters():
        local = getattr(parameter, "ds_tensor", parameter)  # ZeRO-3: this rank's partition
        if local.numel() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    total = _all_reduce([float(len(bad))], device or next(model.parameters()).device)[0]
    if total and not bad:
        bad = [f"{int(total)} parameter partition(s) on other ranks"]
    return bad


class StepHealth(TrainerCallback):
    """Watches each optimizer step's loss and gradients; skips and counts non-finite steps, stops past the limit.

    Args:
        max_nonfinite_steps: non-finite steps skipped before the run stops (0: stop at the first).
        vocab_size: the LLM's vocabulary size, for the stuck-loss warning (None: no warning).
        newest_checkpoint: returns the newest complete checkpoint folder (or None), named in the stop message.
        step_applied: returns whether DeepSpeed applied the last optimizer step (it skips one with non-finite
            gradients); None without DeepSpeed.
    """

    def __init__(self, max_nonfinite_steps: int = 0, vocab_size: int | None = None, newest_checkpoint=None,
                 step_applied=None):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.step_applied = step_applied
        self.uniform_loss = math.log(int(vocab_size)) if vocab_size else None  # a config int, never a tensor
        self.newest_checkpoint = newest_checkpoint or (lambda: None)
        self.step_loss = 0.0  # the sum of this rank's micro-batch losses of the running step (HF logs its mean over ranks)
        self.step_nonfinite = False
        self.step_skipped = False  # the running step was judged non-finite before the optimizer step
        self.skipped_steps: list[int] = []
        self.last_finite: tuple[int, float] | None = None  # (step, mean loss over ranks)
        self.stuck_since: int | None = None
        self.warned_stuck = False

    # ---- fed by the trainer ----
    def observe_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch loss (as `training_step` returns it, already divided for accumulation)."""
        value = float(loss.detach().float().sum())
        if math.isfinite(value):
            self.step_loss += value
        else:
            self.step_nonfinite = True

    # ---- callbacks ----
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.step_applied is not None:  # DeepSpeed: the engine has already stepped (or skipped) inside backward
            return control
        parameters = [p for p in model.parameters() if p.grad is not None]
        local_bad = self.step_nonfinite or any(not bool(torch.isfinite(p.grad).all()) for p in parameters)
        if _all_reduce([float(local_bad)], args.device)[0]:
            self.step_skipped = True
            for parameter in parameters:  # AdamW and SGD leave a parameter without a gradient untouched
                parameter.grad = None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        applied = self.step_applied() if self.step_applied is not None else True
        bad, loss_sum, ranks = _all_reduce(
            [float(self.step_nonfinite or self.step_skipped or not applied), self.step_loss, 1.0], args.device)
        self.step_loss, self.step_nonfinite, self.step_skipped = 0.0, False, False
        if bad:
            self.skipped_steps.append(state.global_step)
            self.nonfinite_step(state.global_step)
        else:
            self.finite_step(state.global_step, loss_sum / ranks)
        return control

    def nonfinite_step(self, step: int) -> None:
        count = len(self.skipped_steps)
        if count > self.max_nonfinite_steps:
            last = (f"the last finite loss was {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
                    if self.last_finite else "no step had a finite loss")
            newest = self.newest_checkpoint()
            resume = (f"the newest complete checkpoint is {newest}: rerun with --resume_from_checkpoint auto and a "
                      "lower --learning_rate (or --max_nonfinite_steps N to skip such steps)" if newest else
                      "no complete checkpoint exists")
            raise TrainingDiverged(f"training diverged at step {step}: the loss or the gradients are not finite "
                                   f"(non-finite steps: {self.skipped_steps}); {last}; the update was not applied "
                                   f"and nothing was saved after it; {resume}")
        logger.warning("step %d: non-finite loss or gradients; the update was skipped (%d of --max_nonfinite_steps %d)",
                       step, count, self.max_nonfinite_steps)

    def finite_step(self, step: int, loss: float) -> None:
        self.last_finite = (step, loss)
        if self.uniform_loss is None:
            return
        if abs(loss - self.uniform_loss) > STUCK_TOLERANCE * self.uniform_loss:
            self.stuck_since = None
            return
        self.stuck_since = step if self.stuck_since is None else self.stuck_since
        if not self.warned_stuck and step - self.stuck_since + 1 >= STUCK_STEPS:
            self.warned_stuck = True
            logger.warning("the loss has stayed at %.3f = ln(vocabulary size), the loss of a uniform prediction, for "
                           "%d steps (%d-%d): the model has stopped learning (a learning rate far too high?)",
                           self.uniform_loss, step - self.stuck_since + 1, self.stuck_since, step)


class WatchedSteps:
    """Trainer mixin (`class MyTrainer(WatchedSteps, Trainer)`): every micro-batch loss goes to a `StepHealth`
    callback, which the subclass creates with `watch_steps` after `Trainer.__init__`."""

    def watch_steps(self, vocab_size: int | None) -> StepHealth:
        from tga.train.integrity import latest_complete_checkpoint

        self.health = StepHealth(
            getattr(self.args, "max_nonfinite_steps", 0), vocab_size=vocab_size,
            newest_checkpoint=lambda: latest_complete_checkpoint(self.args.output_dir, checksum=False),
            step_applied=self.step_applied if self.is_deepspeed_enabled else None,
        )
        self.add_callback(self.health)
        return self.health

    def training_step(self, model, inputs, num_items_in_batch=None):
        """HF's step; its loss also goes to the step-health check (HF's log hides a non-finite one)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.health.observe_loss(loss)
        return loss

    def step_applied(self) -> bool:
        """Whether DeepSpeed applied the last optimizer step (it skips one whose gradients are not finite)."""
        return bool(self.model_wrapped.was_step_applied()) if hasattr(self.model_wrapped, "was_step_applied") else True
