"""tga/unlearn/trainer.py

`UnlearnTrainer`: an HF `Trainer` whose loss is the unlearning loss of `tga.unlearn.loss` on batches from
`UnlearnCollator` (forget / mismatch / keep groups), so DeepSpeed, LoRA, logging and checkpointing come from the
Trainer. The keep term's reference logits come from a frozen reference: a separate model (a second copy loaded from
the same folder), or, with LoRA, the training model itself with its adapters disabled (no second copy in memory).

Stopping rule (Yao et al.): training stops once the forget NLL (the NLL of the harmful responses, i.e. -L_forget)
passes `forget_ceiling`. Under several ranks the NLL is averaged over ranks first, so all ranks stop at the same step.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import Trainer

from tga.running_means import RunningMeans
from tga.train.cost import TokenCounter
from tga.train.divergence import WatchedSteps
from tga.unlearn.dataset import group_inputs
from tga.unlearn.loss import UnlearnWeights, response_kl, response_nll, unlearn_loss

logger = logging.getLogger(__name__)


def deepspeed_reference(reference: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Wrap a frozen reference model for ZeRO-3 (inference-only engine, parameters partitioned like the trained
    model's; TRL's recipe); under other stages return it unchanged."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        return reference
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    hidden = reference.config.text_config.hidden_size
    zero = config["zero_optimization"]
    for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_param_persistence_threshold", 10 * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))):
        if zero.get(key) == "auto":
            zero[key] = value
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()
    return engine


class UnlearnTrainer(WatchedSteps, Trainer):
    """Trainer for `L = w_fgt * L_forget + w_rdn * L_mismatch + w_nor * L_keep`.

    Args:
        weights: the three loss weights.
        reference: a separate frozen reference model, or None to use the LoRA-wrapped training model with its
            adapters disabled.
        forget_ceiling: stop once the forget NLL exceeds this value (None: never).
        counter: token counter for cost accounting (filled here).
    """

    def __init__(self, *args, weights: UnlearnWeights, reference: torch.nn.Module | None = None,
                 forget_ceiling: float | None = 100.0, counter: TokenCounter | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # The loss is a per-batch mean: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.weights, self.forget_ceiling = weights, forget_ceiling
        self.counter = counter if counter is not None else TokenCounter()
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
            self.reference = deepspeed_reference(reference, self.accelerator)
            if self.reference is reference:  # not partitioned by ZeRO-3: a plain module on this rank's device
                reference.to(self.args.device)
        self.stopped_at: dict | None = None
        self.running = RunningMeans()
        self.watch_steps(vocab_size=None)  # non-finite steps stop the run; its loss is not a plain CE (no ln V check)

    def reference_logits(self, model, inputs: dict) -> torch.Tensor:
        """Logits of the frozen reference on the keep group (no grad)."""
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(**inputs).logits
            wrapped = self.accelerator.unwrap_model(model)
            if not hasattr(wrapped, "disable_adapter"):
                raise RuntimeError("no reference model and the training model has no LoRA adapters to disable")
            with wrapped.disable_adapter():
                return wrapped(**inputs).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts = {}
        for group in ("forget", "mismatch"):
            batch = group_inputs(inputs, group)
            labels = batch.pop("labels")
            parts[group] = response_nll(model(**batch).logits, labels)
            self.counter.train_tokens += int(batch["attention_mask"].sum())
        keep = group_inputs(inputs, "keep")
        labels = keep.pop("labels")
        logits = model(**keep).logits
        parts["keep"] = response_kl(logits, self.reference_logits(model, keep), labels)
        tokens = int(keep["attention_mask"].sum())
        self.counter.train_tokens += tokens
        self.counter.reference_tokens += tokens
        self.counter.samples += int(labels.shape[0])
        loss = unlearn_loss(parts["forget"], parts["mismatch"], parts["keep"], self.weights)
        metrics = {f"unlearn/{name}": float(value.detach()) for name, value in
                   (("forget_nll", parts["forget"]), ("mismatch_nll", parts["mismatch"]), ("keep_kl", parts["keep"]))}
        for key, value in metrics.items():
            self.running.add(key, value)
        self.check_ceiling(parts["forget"].detach())
        return (loss, {"logits": logits}) if return_outputs else loss

    def check_ceiling(self, forget_nll: torch.Tensor) -> None:
        if self.forget_ceiling is None or not model_is_training(self):
            return
        value = forget_nll.float().reshape(1).clone().to(self.args.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(value)
            value = value / torch.distributed.get_world_size()
        if float(value) > self.forget_ceiling and self.stopped_at is None:
            self.stopped_at = {"step": self.state.global_step + 1, "forget_nll": float(value),
                               "ceiling": self.forget_ceiling}
            logger.info("forget NLL %.2f passed the ceiling %.2f: stopping", float(value), self.forget_ceiling)
            self.control.should_training_stop = True

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.running.drain())
        super().log(logs, start_time)


def model_is_training(trainer: Trainer) -> bool:
    return trainer.model is not None and trainer.model.training
