"""tga/train/trainer.py

`TGATrainer`: HF `Trainer` whose loss is next-token CE plus, when TGA is on, the guide term of `tga.align.guide.Guide`
(the caption target, centring, accumulation scaling and metrics live there). The training forward asks the LLM for its
hidden states (never attentions).

[IMPORTANT] Under multi-rank ZeRO-3 every rank must run the same modules in the same order in every step:
parameters are gathered with collectives. The trainer then builds the input embeddings itself (`embed_multimodal`,
as Llava's forward does), so a rank whose batch is text-only still runs the vision tower and projector (on a blank
image, weight 0).

Trainer methods overridden: the public hooks compute_loss, create_optimizer, get_batch_samples (the guide counts the
step's guide samples), training_step (through tga.train.divergence.WatchedSteps: each loss goes to the step-health
check), log and train (restores the guide's checkpointed state before HF resumes), and the private _get_train_sampler
(LLaVA's modality-grouped sampler) and _load_from_checkpoint (HF's raw load of a non-DeepSpeed checkpoint matches none
of the names transformers 5 saves a Llava model under; tga.train.checkpoint.load_checkpoint_weights maps them back). The guide's state is written into each checkpoint folder by
`GuideStateCallback.on_save`, which runs before the completion marker is written (tga.train.resilience).
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import nullcontext

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from tga.align.guide import Guide
from tga.align.guide_config import GuideConfig
from tga.data.sampler import ModalityLengthGroupedSampler
from tga.train.checkpoint import load_checkpoint_weights
from tga.train.divergence import WatchedSteps
from tga.train.throughput import Throughput

__all__ = ["GuideConfig", "GuideStateCallback", "TGATrainer"]


class GuideStateCallback(TrainerCallback):
    """Opens (or builds) the caption-state bank when training starts, and writes the guide's state (the caption
    centre) into each checkpoint folder (rank 0; all ranks hold the same)."""

    def __init__(self, guide: Guide):
        self.guide = guide

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # After the DeepSpeed engine exists: under ZeRO-3 the bank's pass needs its parameter hooks.
        self.guide.prepare_bank(model, args.process_index, args.world_size, resuming=state.global_step > 0)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.guide.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


class TGATrainer(WatchedSteps, Trainer):
    def __init__(self, *args, guide: GuideConfig | None = None, projector_lr: float | None = None,
                 always_run_all_modules: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.always_run_all_modules = always_run_all_modules
        self.throughput = Throughput()
        self.add_callback(self.throughput)
        config = getattr(self.model, "config", None)
        self.watch_steps(vocab_size=getattr(getattr(config, "text_config", config), "vocab_size", None))
        self.guide = None
        if guide is not None:
            self.guide = Guide(guide, self.model, pad_token_id=self.processing_class.pad_token_id,
                               always_run_all_modules=always_run_all_modules)
            self.add_callback(GuideStateCallback(self.guide))

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """HF's train, after restoring the guide's state from the checkpoint it resumes from."""
        if self.guide is not None and resume_from_checkpoint:
            folder = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                      else resume_from_checkpoint)
            if folder:
                self.guide.load(folder)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Model weights of a non-DeepSpeed resume (DeepSpeed loads its own states): see load_checkpoint_weights."""
        load_checkpoint_weights(self.accelerator.unwrap_model(model if model is not None else self.model),
                                resume_from_checkpoint)

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

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.guide is not None:  # the guide weighs each micro-batch by its share of the step's guide samples
            across = self.args.average_tokens_across_devices and self.args.world_size > 1
            self.guide.start_step(batch_samples, self.accelerator.gather if across else None, self.args.world_size)
        return batch_samples, num_items_in_batch

    # ---- loss ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        extras = inputs.pop("guide", None)  # a tga.align.batch.GuideBatch, the guide's part of the batch
        if extras is not None:
            extras = extras.to(self.args.device)  # accelerate's loader has moved it already: then a no-op
        if self.guide is not None:
            inputs["output_hidden_states"] = True
        # the shared caption pass (tga.align.shared_pass) runs inside this forward, layer by layer
        with self.guide.riding(extras) if self.guide is not None else nullcontext():
            if self.always_run_all_modules:
                inputs = self.embed_multimodal(model, inputs)
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if self.guide is not None:
            loss = loss + self.guide(
                self.accelerator.unwrap_model(model), outputs.hidden_states, extras, progress=self.step_ratio(),
                training=model.training,
                divided_by_accumulation=not (self.model_accepts_loss_kwargs and num_items_in_batch is not None),
                diagnostics=self.logs_this_step(),
            )
        return (loss, outputs) if return_outputs else loss

    def step_ratio(self) -> float:
        return self.state.global_step / max(1, self.state.max_steps)

    def logs_this_step(self) -> bool:
        """Whether the optimizer step now running ends in a log (HF's DefaultFlowCallback rule for `steps`)."""
        if self.args.logging_strategy != "steps":
            return True
        step = self.state.global_step + 1
        return (step == 1 and self.args.logging_first_step) or step % max(1, int(self.state.logging_steps or 1)) == 0

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

    # ---- logging ----
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            if self.guide is not None:
                logs.update(self.guide.drain_metrics())
            samples_per_step = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            logs.update(self.throughput.measure(self.state.global_step, self.state.max_steps, samples_per_step,
                                                getattr(self.state, "num_input_tokens_seen", None)))
        super().log(logs, start_time)
