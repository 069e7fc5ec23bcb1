"""tga/train/trainer.py

`TGATrainer`: HF `Trainer` whose loss is next-token CE plus, when TGA is on, lambda times the guide loss.

The training forward asks the LLM for its hidden states (never attentions); image-token and retrieved-text states
are mean-pooled at the target layers. The caption target C comes from a no-grad text-only pass of the same language
model over the caption under the stage's system prompt (the `live` target of the paper and released code). Toxic
records and records without a caption are not in the guide loss (the collator leaves them out of `guide_index`).

[IMPORTANT] Under ZeRO-3 every rank must run the same modules in every step: parameters are gathered with
collectives. A rank whose batch is text-only still runs the vision tower and projector (on a blank image, weight 0),
and a rank without guide samples still runs the caption pass (on one token, weight 0).

Only public Trainer hooks are overridden: compute_loss, create_optimizer, _get_train_sampler and log.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import Trainer

from tga.align import guide_loss, pool_layers
from tga.data.sampler import ModalityLengthGroupedSampler

BATCH_EXTRAS = ("image_mask", "retrieved_mask", "guide_index", "caption_input_ids", "caption_attention_mask",
                "caption_mask")


@dataclass
class GuideSettings:
    layers: list[int]
    form: str = "paper"
    weight: float = 1.0
    schedule: str = "none"  # none | linear | released
    temperature: float = 0.07


class TGATrainer(Trainer):
    def __init__(self, *args, guide: GuideSettings | None = None, projector_lr: float | None = None,
                 always_run_all_modules: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.guide = guide
        self.projector_lr = projector_lr
        self.always_run_all_modules = always_run_all_modules
        self.metric_sums: dict[str, float] = defaultdict(float)
        self.metric_counts: dict[str, int] = defaultdict(int)

    # ---- data ----
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths, batch_size=self.args.train_batch_size * self.args.gradient_accumulation_steps,
            world_size=self.args.world_size, seed=self.args.seed,
        )

    # ---- optimisation ----
    def create_optimizer(self, model=None):
        """AdamW with the projector on its own learning rate when `--mm_projector_lr` is set (LLaVA)."""
        if self.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups = defaultdict(list)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups[("multi_modal_projector" in name, name in decay)].append(parameter)
        param_groups = [
            {"params": params, "weight_decay": self.args.weight_decay if with_decay else 0.0,
             **({"lr": self.projector_lr} if is_projector else {})}
            for (is_projector, with_decay), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- loss ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extras = {key: inputs.pop(key) for key in BATCH_EXTRAS if key in inputs}
        if self.guide is not None:
            inputs["output_hidden_states"] = True
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.always_run_all_modules and "pixel_values" not in inputs:
            loss = loss + 0.0 * self.blank_image_features(model).sum()
        if self.guide is not None:
            guide, metrics = self.guide_term(model, outputs.hidden_states, extras)
            weight = self.guide.weight * (1.0 - self.step_ratio() if self.guide.schedule == "linear" else 1.0)
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                # CE is already normalised over the whole accumulated batch; the guide loss is a per-batch mean.
                guide = guide / self.current_gradient_accumulation_steps
            loss = loss + weight * guide
            self.record_metrics({**metrics, "tga/weight": weight})
        return (loss, outputs) if return_outputs else loss

    def step_ratio(self) -> float:
        return self.state.global_step / max(1, self.state.max_steps)

    def blank_image_features(self, model) -> torch.Tensor:
        vlm = self.accelerator.unwrap_model(model)
        size = vlm.config.vision_config.image_size
        blank = torch.zeros(1, 3, size, size, device=self.args.device, dtype=vlm.dtype)
        return torch.cat(vlm.model.get_image_features(pixel_values=blank).pooler_output)

    def caption_states(self, model, extras) -> torch.Tensor | None:
        """Pooled caption states [L, G, H] from a no-grad text pass (a 1-token dummy pass when G = 0)."""
        language_model = self.accelerator.unwrap_model(model).model.language_model
        if "caption_input_ids" in extras:
            ids, attention, mask = extras["caption_input_ids"], extras["caption_attention_mask"], extras["caption_mask"]
        elif self.always_run_all_modules:
            ids = torch.full((1, 1), self.processing_class.pad_token_id, device=self.args.device)
            attention, mask = torch.ones_like(ids, dtype=torch.bool), None
        else:
            return None
        with torch.no_grad():
            hidden = language_model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        return None if mask is None else pool_layers(hidden, self.guide.layers, mask)

    def guide_term(self, model, hidden_states, extras) -> tuple[torch.Tensor, dict]:
        captions = self.caption_states(model, extras)
        zero = hidden_states[-1].sum() * 0.0
        if captions is None:
            return zero, {}
        index = extras["guide_index"]
        images = pool_layers(hidden_states, self.guide.layers, extras["image_mask"])[:, index]
        has_retrieved = extras["retrieved_mask"][index].any(dim=1)
        retrieved = pool_layers(hidden_states, self.guide.layers, extras["retrieved_mask"])[:, index]
        kwargs = {"form": self.guide.form, "temperature": self.guide.temperature,
                  "step_ratio": self.step_ratio() if self.guide.schedule == "released" else 0.0}
        # Samples with and without retrieved text are scored separately (the hinge term needs R) and averaged.
        total, metrics, count = zero, {}, int(index.numel())
        for subset in (has_retrieved, ~has_retrieved):
            if not bool(subset.any()):
                continue
            with_r = bool(has_retrieved[subset][0])
            part, part_metrics = guide_loss(
                images[:, subset], captions[:, subset], retrieved[:, subset] if with_r else None, **kwargs
            )
            share = int(subset.sum()) / count
            total = total + share * part
            for key, value in part_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + share * value.detach().float()
        metrics["tga/guide_loss"] = total.detach()
        return total, metrics

    # ---- logging ----
    def record_metrics(self, metrics: dict) -> None:
        for key, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
            if value.ndim == 0:
                self.add_metric(key if key.startswith("tga/") else f"tga/{key}", float(value))
            else:  # per-layer values
                for layer, item in zip(self.guide.layers, value.tolist()):
                    self.add_metric(f"tga/{key}/L{layer}", item)

    def add_metric(self, key: str, value: float) -> None:
        if value == value:  # NaN (e.g. specificity of a 1-sample batch) is not averaged in
            self.metric_sums[key] += value
            self.metric_counts[key] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.metric_counts and "loss" in logs:
            logs.update({key: self.metric_sums[key] / self.metric_counts[key] for key in self.metric_counts})
            self.metric_sums.clear()
            self.metric_counts.clear()
        super().log(logs, start_time)
