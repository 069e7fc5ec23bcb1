"""tga/align/guide.py

The TGA guide term of a training step. `Guide` reads its options from a checked `GuideConfig`
(tga.align.guide_config) and owns everything around the formula of
`tga.align.tga_loss`: where the caption target comes from (a no-grad text pass of the training LLM, `live`, or of a
copy taken at stage start, `frozen`; the pass stops after the deepest target layer, `tga.model.text_states`), the
running caption centre, the split of samples with and without retrieved text, the weight and its schedule, the
scaling under gradient accumulation, the metrics, and the state a checkpoint must keep. The trainer calls it once
per micro-batch with the hidden states of its training forward.

Accumulation: the guide loss of a batch is a mean over its guide samples. Each micro-batch's term is weighted by its
share of the guide samples of the whole optimizer step (over all ranks when HF averages tokens across devices, as it
does for the CE), so batch 4 x accumulation 1 and batch 2 x accumulation 2 give the same gradient even when the
micro-batches hold different numbers of guide samples (toxic and caption-less records are left out).

No step reads a device value back to the host: metrics are summed on the device (`DeviceMeans`) and read at logging
steps; the specificity diagnostic is computed only on the micro-batches of a logging step.

Where the caption pass runs (`--tga_caption_pass`, `GuideConfig.caption_source`): read from a bank;
riding the training forward (`shared`: the trainer wraps its forward in `Guide.riding`, and each decoder layer takes
the captions while it is gathered, no extra ZeRO-3 gather); or a separate pass after it (`separate`, and any call
made outside a ridden forward).

[IMPORTANT] Under multi-rank ZeRO-3 every rank must run the same modules in the same order (parameters are gathered
with collectives): with the separate pass a rank without guide samples still runs it (one token, weight 0); the
shared pass runs no module of its own. The autograd graph has the same structure whatever the batch holds.
"""

from __future__ import annotations

import copy
import logging
import os
from contextlib import nullcontext

import torch

from tga.align.bank import open_or_build
from tga.align.batch import GuideBatch
from tga.align.centering import CaptionCenter
from tga.align.guide_config import GuideConfig
from tga.align.pooling import pool_layers
from tga.align.request_guide import request_guide_loss
from tga.align.shared_pass import SharedCaptionPass
from tga.align.tga_loss import guide_loss
from tga.errors import ConfigError
from tga.model.text_states import caption_pass_modules, text_hidden_states
from tga.running_means import DeviceMeans

logger = logging.getLogger(__name__)
GUIDE_STATE_FILE = "tga_guide_state.safetensors"


class Guide:
    """The guide term: `guide(model, hidden_states, extras, ...)` returns lambda * scale * guide loss.

    Args:
        settings: the `--tga_*` options (`tga.align.guide_config`, checked when it was built).
        model: the Llava model being trained (unwrapped); its LLM is the `live` target source.
        pad_token_id: the token of the one-token caption pass of a rank without guide samples.
        always_run_all_modules: multi-rank ZeRO-3 (see the module note).
    """

    def __init__(self, settings: GuideConfig, model, *, pad_token_id: int, always_run_all_modules: bool = False):
        self.settings = settings
        self.layers = list(settings.layers)
        self.pad_token_id = pad_token_id
        self.always_run_all_modules = always_run_all_modules
        hidden_size = model.config.text_config.hidden_size
        self.center = (CaptionCenter(len(self.layers), hidden_size, settings.center_momentum)
                       if settings.center else None)
        self.frozen_language_model = None
        self.bank = None  # opened (or built) at train start: prepare_bank
        self.bank_rows = None  # () -> [(record id, caption ids, caption mask)], set by whoever owns the data
        live = model.model.language_model
        if settings.copies_target(trains_llm=any(p.requires_grad for p in live.parameters())):
            self.frozen_language_model = copy.deepcopy(live).eval().requires_grad_(False)
        self.caption_pass_mode, why = settings.caption_source(live, copied_target=self.frozen_language_model is not None)
        if why:
            logger.warning("TGA caption pass: separate, not shared with the training forward: %s", why)
        self.shared = SharedCaptionPass(live, max(self.layers)) if self.caption_pass_mode == "shared" else None
        self.metrics = DeviceMeans()
        self.caption_token_count: torch.Tensor | int = 0  # tokens through the caption pass, summed on the device
        # The optimizer step now running (start_step): guide samples over its micro-batches (and ranks), ranks
        # counted, micro-batches. None outside training: each call is then its own batch.
        self.step_samples: torch.Tensor | int | None = None
        self.step_ranks = 1
        self.step_micro_batches = 1

    # ---- one optimizer step ----
    def start_step(self, batches: list[dict], gather=None, world_size: int = 1) -> None:
        """Count the guide samples of an optimizer step's micro-batches before the first forward.

        `gather` (e.g. `accelerator.gather`) sums the count over `world_size` ranks: a collective that every rank
        runs each step; the total stays on the device.
        """
        count = sum(batch["guide"].guided for batch in batches if "guide" in batch)
        self.step_micro_batches = max(1, len(batches))
        if gather is None or world_size <= 1:
            self.step_samples, self.step_ranks = count, 1
        else:
            device = next((b["input_ids"].device for b in batches if "input_ids" in b), torch.device("cpu"))
            self.step_samples = gather(torch.tensor([count], device=device)).sum()
            self.step_ranks = world_size

    def weight(self, progress: float) -> float:
        """lambda at training progress r = step / max_steps (`linear`: lambda (1 - r))."""
        return self.settings.weight * (1.0 - progress if self.settings.schedule == "linear" else 1.0)

    def __call__(self, model, hidden_states, extras: GuideBatch, *, progress: float, training: bool = True,
                 divided_by_accumulation: bool = False, diagnostics: bool = True) -> torch.Tensor:
        """The weighted guide term of one micro-batch, to add to its CE loss; records the metrics.

        Args:
            model: the (unwrapped) Llava model.
            hidden_states: the training forward's `hidden_states`.
            extras: the batch's guide part (`tga.align.batch.GuideBatch`, filled by the collator).
            progress: step / max_steps (the `linear` and `released` schedules).
            training: part of the optimizer step announced by `start_step` (False: evaluation, direct calls).
            divided_by_accumulation: the caller divides the whole loss by the number of micro-batches afterwards
                (HF does when the CE is not normalised over the accumulated batch).
            diagnostics: also compute and log the specificity diagnostic (logging steps).
        """
        loss, metrics = self.loss(model, hidden_states, extras, progress=progress, diagnostics=diagnostics)
        weight = self.weight(progress)
        self.metrics.add("tga/weight", weight)
        self.record(metrics)
        micro = extras.guided
        if not training or self.step_samples is None:
            return weight * loss
        share = micro * self.step_ranks / (self.step_samples.clamp(min=1) if torch.is_tensor(self.step_samples)
                                           else max(1, self.step_samples))
        if divided_by_accumulation:
            share = share * self.step_micro_batches
        return weight * share * loss

    def prepare_bank(self, model, rank: int = 0, world_size: int = 1, resuming: bool = False) -> None:
        """Open the caption-state bank of `settings.bank`, building it first (a no-grad pass sharded over ranks) when
        it is missing; a bank built for other layers, another model or other data is refused by name."""
        if self.settings.bank is None or self.bank is not None:
            return
        if self.bank_rows is None:
            raise ConfigError(f"--tga_bank {self.settings.bank}: the trainer was given no records to build it from")
        self.bank = open_or_build(self.settings.bank, model.model.language_model, self.bank_rows(), self.layers,
                                  dtype=self.settings.bank_dtype, pad_token_id=self.pad_token_id, rank=rank,
                                  world_size=world_size, resuming=resuming)

    def riding(self, extras: GuideBatch):
        """Context for the training forward of a micro-batch: the shared caption pass runs inside it."""
        if self.shared is None:
            return nullcontext()
        return self.shared.riding(extras.caption_input_ids, extras.caption_attention_mask)

    # ---- cost (tga.train.cost) ----
    def caption_tokens(self) -> int:
        """Tokens this rank ran through the caption pass so far (reads the device: call at the end)."""
        return int(self.caption_token_count)

    def caption_parameters(self, model) -> int:
        """Parameters the caption pass runs: the target LLM's embeddings and layers up to the deepest target layer
        (the whole LLM when the pass takes the full forward); ZeRO-3 partitions counted whole."""
        language_model = self.frozen_language_model or model.model.language_model
        modules = caption_pass_modules(language_model, max(self.layers))
        return sum(int(getattr(p, "ds_numel", p.numel())) for module in modules for p in module.parameters())

    # ---- the loss ----
    def caption_states(self, model, extras: GuideBatch, hidden_size: int, device) -> torch.Tensor:
        """Pooled caption states [L, G, H] from a no-grad text pass of the target LLM.

        With no guide sample (G = 0) the separate pass still runs on one token when every rank must run the same
        modules.
        """
        if self.bank is not None:  # the target read from the bank: no caption pass
            ids = extras.guide_ids or []
            return self.bank.lookup(ids, device) if ids else torch.zeros(len(self.layers), 0, hidden_size, device=device)
        hidden = self.caption_pass(model, extras, device)
        if hidden is None or extras.caption_mask is None:
            return torch.zeros(len(self.layers), 0, hidden_size, device=device)
        return pool_layers(hidden, self.layers, extras.caption_mask)

    def caption_pass(self, model, extras: GuideBatch, device) -> tuple[torch.Tensor, ...] | None:
        """Hidden states [G, Tc, H] by layer (up to the deepest target layer) of the no-grad caption pass: the states
        the ridden training forward took (shared pass), else a separate pass; None when this micro-batch has no guide
        sample and no rank needs a pass."""
        language_model = self.frozen_language_model or model.model.language_model
        if self.frozen_language_model is not None and next(language_model.parameters()).device != device:
            language_model.to(device)
        ids, attention = extras.caption_input_ids, extras.caption_attention_mask
        if ids is None and self.always_run_all_modules:  # every rank runs the same modules: one token
            ids = torch.full((1, 1), self.pad_token_id, device=device)
            attention = torch.ones_like(ids, dtype=torch.bool)
        hidden = self.shared.take() if self.shared is not None else None  # None: no ridden forward (a direct call)
        if hidden is None and ids is not None:
            with torch.no_grad():  # stops after the deepest target layer: the layers above cannot change its states
                hidden = text_hidden_states(language_model, ids, attention, depth=max(self.layers))
        if not hidden:  # no pass ran (a ridden forward without captions gives an empty tuple)
            return None
        self.caption_token_count = self.caption_token_count + attention.sum()
        return hidden

    def loss(self, model, hidden_states, extras: GuideBatch, *, progress: float = 0.0,
             diagnostics: bool = True) -> tuple[torch.Tensor, dict]:
        """lambda-free guide loss of the micro-batch (a mean over its guide samples) and its detached metrics.

        [Contract] Both subsets (with and without retrieved text) are always built, empty ones give attached zeros:
        ZeRO-3 reduces gradients in the order they become ready, which must be identical on every rank.
        """
        if self.settings.form == "request":  # tga.align.request_guide
            return request_guide_loss(hidden_states, self.caption_pass(model, extras, hidden_states[0].device),
                                      extras, self.layers)
        images = pool_layers(hidden_states, self.layers, extras.image_mask)
        retrieved = pool_layers(hidden_states, self.layers, extras.retrieved_mask)
        captions = self.caption_states(model, extras, images.shape[-1], images.device)
        index = extras.guide_index if extras.guide_index is not None else torch.zeros(0, dtype=torch.long,
                                                                                      device=images.device)
        images, retrieved = images[:, index], retrieved[:, index]
        if self.center is not None:
            if self.center.mean.device != images.device:
                self.center.to(images.device)
            self.center.update(captions)  # a collective under torch.distributed: every rank calls it every step
            mean = self.center().to(images.dtype)[:, None, :]
            images, retrieved, captions = images - mean, retrieved - mean, captions - mean
        with_r, without_r = self.retrieved_split(extras, index)
        kwargs = {"form": self.settings.form, "temperature": self.settings.temperature,
                  "pair_weight": self.settings.pair_weight, "hinge_weight": self.settings.hinge_weight,
                  "step_ratio": progress if self.settings.schedule == "released" else 0.0, "diagnostics": diagnostics}
        total, metrics, count = images.sum() * 0.0, {}, int(index.numel())
        # Samples with and without retrieved text are scored separately (the hinge term needs R) and averaged.
        for rows, has_r in ((with_r, True), (without_r, False)):
            part, part_metrics = guide_loss(images[:, rows], captions[:, rows], retrieved[:, rows] if has_r else None,
                                            **kwargs)
            share = int(rows.numel()) / count if count else 0.0
            total = total + share * part
            if share > 0:
                for key, value in part_metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + share * value.detach().float()
        if count:
            metrics["tga/guide_loss"] = total.detach()
        return total, metrics

    @staticmethod
    def retrieved_split(extras: GuideBatch, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (within the guide samples) with and without retrieved text: the collator's index lists; a
        batch built without them is split from its mask (which reads the device)."""
        if extras.guide_with_retrieved is not None:
            return extras.guide_with_retrieved, extras.guide_without_retrieved
        has_r = extras.retrieved_mask[index].any(dim=1)
        return has_r.nonzero().flatten(), (~has_r).nonzero().flatten()

    # ---- metrics ----
    def record(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.metrics.add(key if key.startswith("tga/") else f"tga/{key}", value)

    def drain_metrics(self) -> dict[str, float]:
        """Means since the last logging step (per-layer values as `tga/KEY/L{layer}`); resets."""
        logs = {}
        for key, value in self.metrics.drain().items():
            if isinstance(value, list):
                logs.update({f"{key}/L{layer}": item for layer, item in zip(self.layers, value) if item == item})
            else:
                logs[key] = value
        return logs

    # ---- checkpoint state ----
    def save(self, folder: str) -> str | None:
        """Write the state a resumed run needs (the caption centre) into a checkpoint folder; returns the path."""
        return self.center.save(os.path.join(folder, GUIDE_STATE_FILE), self.layers) if self.center else None

    def load(self, folder: str) -> None:
        """Restore the state saved by `save` (every rank reads the same file, so every rank holds the same centre)."""
        if self.center is None:
            return
        path = os.path.join(folder, GUIDE_STATE_FILE)
        if not os.path.isfile(path):
            logger.warning("%s has no %s (written before the caption centre was checkpointed): the centre restarts",
                           folder, GUIDE_STATE_FILE)
            return
        self.center.load(path)
