"""tga/train/trainer.py

`TGATrainer`: HF `Trainer` whose loss is next-token CE plus, when TGA is on, lambda times the guide loss.

The training forward asks the LLM for its hidden states (never attentions); image-token and retrieved-text states
are mean-pooled at the target layers. The caption target C comes from a no-grad text-only pass of the same language
model over the caption under the stage's system prompt (the `live` target of the paper and released code), or of a
frozen copy of the language model taken when training starts (`frozen`: the target cannot drift or collapse with the
model being trained); the pass stops after the deepest target layer (`tga.model.text_states`). With centring, a
running mean of caption states (`CaptionCenter`) is subtracted from the image, caption and retrieved states before the
cosines, so the loss rewards content rather than the direction all caption states share. Toxic records and records
without a caption are not in the guide loss (the collator leaves them out of `guide_index`).

[IMPORTANT] Under multi-rank ZeRO-3 every rank must run the same modules in the same order in every step:
parameters are gathered with collectives. The trainer then builds the input embeddings itself (as Llava's forward
does), so a rank whose batch is text-only still runs the vision tower and projector (on a blank image, weight 0), and
a rank without guide samples still runs the caption pass (on one token, weight 0).

Only public Trainer hooks are overridden: compute_loss, create_optimizer, _get_train_sampler and log.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import Trainer

from tga.align import guide_loss, pool_layers
from tga.align.centering import CaptionCenter
from tga.data.sampler import ModalityLengthGroupedSampler
from tga.model.text_states import text_hidden_states
from tga.train.running_means import RunningMeans
from tga.train.throughput import Throughput

BATCH_EXTRAS = ("image_mask", "retrieved_mask", "guide_index", "caption_input_ids", "caption_attention_mask",
                "caption_mask")


@dataclass
class GuideSettings:
    layers: list[int]
    form: str = "paper"
    weight: float = 1.0
    schedule: str = "none"  # none | linear | released
    temperature: float = 0.07
    target: str = "live"  # live | frozen
    center: bool = False


class TGATrainer(Trainer):
    def __init__(self, *args, guide: GuideSettings | None = None, projector_lr: float | None = None,
                 always_run_all_modules: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.guide = guide
        self.projector_lr = projector_lr
        self.always_run_all_modules = always_run_all_modules
        self.running = RunningMeans()
        self.throughput = Throughput()
        self.add_callback(self.throughput)
        self.center: CaptionCenter | None = None
        self.frozen_language_model = None
        if guide is not None and guide.target == "frozen":
            live = self.model.model.language_model
            if any(p.requires_grad for p in live.parameters()):  # a frozen LLM (stage 1) is its own frozen target
                self.frozen_language_model = copy.deepcopy(live).eval().requires_grad_(False)

    # ---- data ----
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        lengths = dataset.modality_lengths
        if len(lengths) != len(dataset):  # a length per record, or batches would index records that are not there
            raise ValueError(f"{len(lengths)} modality lengths for {len(dataset)} records")
        return ModalityLengthGroupedSampler(
            lengths, batch_size=self.args.train_batch_size * self.args.gradient_accumulation_steps,
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
        if self.always_run_all_modules:
            inputs = self.embed_multimodal(model, inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
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

    def embed_multimodal(self, model, inputs: dict) -> dict:
        """Llava's input embedding (token embeddings, then vision + projector, scattered into the image positions),
        done here so that a text-only batch runs the same modules in the same order, on a blank image with weight 0."""
        vlm = self.accelerator.unwrap_model(model).model
        input_ids = inputs.pop("input_ids")
        pixel_values = inputs.pop("pixel_values", None)
        embeds = vlm.get_input_embeddings()(input_ids)
        if pixel_values is None:
            size = vlm.config.vision_config.image_size
            pixel_values = torch.zeros(1, 3, size, size, device=embeds.device, dtype=embeds.dtype)
            features = torch.cat(vlm.get_image_features(pixel_values=pixel_values).pooler_output)
            embeds = embeds + 0.0 * features.sum()
        else:
            features = torch.cat(vlm.get_image_features(pixel_values=pixel_values).pooler_output).to(embeds.dtype)
            mask = vlm.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
            embeds = embeds.masked_scatter(mask, features)
        return {**inputs, "inputs_embeds": embeds}

    def caption_states(self, model, extras, hidden_size: int) -> torch.Tensor:
        """Pooled caption states [L, G, H] from a no-grad text pass of the training LLM (the `live` target).

        With no guide sample (G = 0) the pass still runs on one token when every rank must run the same modules.
        """
        language_model = self.frozen_language_model or self.accelerator.unwrap_model(model).model.language_model
        if self.frozen_language_model is not None and next(language_model.parameters()).device != self.args.device:
            language_model.to(self.args.device)
        if "caption_input_ids" in extras:
            ids, attention, mask = extras["caption_input_ids"], extras["caption_attention_mask"], extras["caption_mask"]
        else:
            ids = torch.full((1, 1), self.processing_class.pad_token_id, device=self.args.device)
            attention, mask = torch.ones_like(ids, dtype=torch.bool), None
        if mask is not None or self.always_run_all_modules:
            with torch.no_grad():  # stops after the deepest target layer: the layers above cannot change its states
                hidden = text_hidden_states(language_model, ids, attention, depth=max(self.guide.layers))
        if mask is None:
            return torch.zeros(len(self.guide.layers), 0, hidden_size, device=self.args.device)
        return pool_layers(hidden, self.guide.layers, mask)

    def guide_term(self, model, hidden_states, extras) -> tuple[torch.Tensor, dict]:
        """lambda-free guide loss of the batch and its metrics.

        [Contract] The autograd graph has the same structure whatever the batch holds (both subsets below are always
        built, empty ones give attached zeros): ZeRO-3 reduces gradients in the order they become ready, which must
        be identical on every rank.
        """
        images = pool_layers(hidden_states, self.guide.layers, extras["image_mask"])
        retrieved = pool_layers(hidden_states, self.guide.layers, extras["retrieved_mask"])
        captions = self.caption_states(model, extras, images.shape[-1])
        index = extras.get("guide_index", torch.zeros(0, dtype=torch.long, device=images.device))
        images, retrieved = images[:, index], retrieved[:, index]
        if self.guide.center:
            if self.center is None:
                self.center = CaptionCenter(len(self.guide.layers), images.shape[-1]).to(images.device)
            self.center.update(captions)  # a collective under torch.distributed: every rank calls it every step
            mean = self.center().to(images.dtype)[:, None, :]
            images, retrieved, captions = images - mean, retrieved - mean, captions - mean
        has_retrieved = extras["retrieved_mask"][index].any(dim=1)
        kwargs = {"form": self.guide.form, "temperature": self.guide.temperature,
                  "step_ratio": self.step_ratio() if self.guide.schedule == "released" else 0.0}
        total, metrics, count = images.sum() * 0.0, {}, int(index.numel())
        # Samples with and without retrieved text are scored separately (the hinge term needs R) and averaged.
        for subset, with_r in ((has_retrieved, True), (~has_retrieved, False)):
            part, part_metrics = guide_loss(
                images[:, subset], captions[:, subset], retrieved[:, subset] if with_r else None, **kwargs
            )
            share = int(subset.sum()) / count if count else 0.0
            total = total + share * part
            if share > 0:
                for key, value in part_metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + share * value.detach().float()
        if count:
            metrics["tga/guide_loss"] = total.detach()
        return total, metrics

    # ---- logging ----
    def record_metrics(self, metrics: dict) -> None:
        for key, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
            if value.ndim == 0:
                self.running.add(key if key.startswith("tga/") else f"tga/{key}", float(value))
            else:  # per-layer values
                for layer, item in zip(self.guide.layers, value.tolist()):
                    self.running.add(f"tga/{key}/L{layer}", item)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.running.drain())
            samples_per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            logs.update(self.throughput.measure(self.state.global_step, self.state.max_steps, samples_per_step,
                                                getattr(self.state, "num_input_tokens_seen", None)))
        super().log(logs, start_time)
