"""tga/train/resume_check.py

A resume continues the run that wrote the checkpoint, or says why not.

Every checkpoint carries `tga_run.json`: the resolved configuration that wrote it, the number of ranks and the shape
of every parameter. A resume compares the new run with it, field by field:

- fields that define what is trained (the models, the stage, TGA and its options, the data, the projector, the
  shapes, sequence length, batch composition, seed, precision) are refused by name, old and new value side by side,
  unless `--allow_config_change FIELD,...` names them; another number of ranks is refused under DeepSpeed (a ZeRO
  checkpoint holds one partition per rank), and other parameter shapes are always refused;
- every other field that differs (the learning rate after a fault, logging, saving, workers) is applied and recorded.
  HF restores the optimizer's and scheduler's learning rates from the checkpoint, so a changed `--learning_rate` or
  `--mm_projector_lr` is put back into them when training begins (`LearningRateChange`).

The run folder keeps its first `tga_config.json`; every start and resume appends a line to `tga_run_history.jsonl`
with the step and the changes (and the fields allowed to change), so the record of what ran is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from transformers import TrainerCallback

from tga.errors import ConfigError

logger = logging.getLogger(__name__)

RECORD_FILE = "tga_run.json"
HISTORY_FILE = "tga_run_history.jsonl"
GROUPS = ("ModelArguments", "DataArguments", "TGAArguments", "UnlearnArguments", "TrainingArguments")
# Fields that change what is trained. Everything in ModelArguments, TGAArguments and UnlearnArguments counts, except:
MODEL_MUTABLE = {"attn_implementation"}
DATA_DEFINING = {"data_path", "image_folder", "image_aspect_ratio", "use_retrieved_in_prompt", "skip_bad_records",
                 "safety_data", "safety_ratio"}
TRAINING_DEFINING = {"model_max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
                     "data_seed", "bf16", "fp16", "deepspeed", "group_by_modality_length", "train_sampling_strategy",
                     "optim", "lr_scheduler_type", "label_smoothing_factor", "neftune_noise_alpha"}
# Fields that differ between any two starts and say nothing about what is trained.
IGNORED = {"argv", "resume_from_checkpoint", "allow_config_change", "local_rank", "accelerator_config", "hub_token",
           "dataloader_pin_memory"}


def flatten(resolved: dict) -> dict[str, object]:
    """`tga_config.json`'s groups as one field -> value mapping (field names are the flags, unique over groups)."""
    flat = {key: value for key, value in resolved.items() if key not in GROUPS}
    for group in GROUPS:
        flat.update(resolved.get(group, {}))
    return flat


def defining_fields(resolved: dict) -> set[str]:
    fields = {"stage", "world_size"} | DATA_DEFINING | TRAINING_DEFINING
    fields |= set(resolved.get("ModelArguments", {})) - MODEL_MUTABLE
    return fields | set(resolved.get("TGAArguments", {})) | set(resolved.get("UnlearnArguments", {}))


def parameter_shapes(model) -> dict[str, list[int]]:
    """name -> full shape of every parameter (under ZeRO-3 the partitioned ones' `ds_shape`)."""
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}


def run_record(resolved: dict, world_size: int, model) -> dict:
    """What a checkpoint records about the run that wrote it."""
    return {"config": resolved, "world_size": world_size, "parameters": parameter_shapes(model)}


def write_record(folder: str, record: dict) -> None:
    with open(os.path.join(folder, RECORD_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle, default=str)


def read_record(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, RECORD_FILE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def allowed_changes(value: str | None, resolved: dict) -> set[str]:
    names = {name.strip() for name in (value or "").split(",") if name.strip()}
    unknown = names - set(flatten(resolved)) - {"world_size"}
    if unknown:
        raise ConfigError(f"--allow_config_change: unknown field(s) {sorted(unknown)}")
    return names


def compare(old: dict, new: dict, allowed: set[str], deepspeed: bool) -> tuple[list[str], dict[str, dict]]:
    """(refusals, changes) of resuming the run recorded in `old` with the run `new` (both `run_record`s)."""
    before = {**flatten(old["config"]), "world_size": old["world_size"]}
    after = {**flatten(new["config"]), "world_size": new["world_size"]}
    defining = defining_fields(new["config"])
    refusals, changes = [], {}
    for field in sorted(set(before) | set(after)):
        if field in IGNORED or before.get(field) == after.get(field):
            continue
        changes[field] = {"from": before.get(field), "to": after.get(field)}
        if field == "world_size" and deepspeed:
            refusals.append(f"world_size: the checkpoint was written by {before[field]} rank(s), this run has "
                            f"{after[field]} (a ZeRO checkpoint holds one partition per rank; resume on "
                            f"{before[field]} rank(s))")
        elif field in defining and field not in allowed:
            refusals.append(f"{field}: {before.get(field)!r} in the checkpoint, {after.get(field)!r} now")
    if old["parameters"] != new["parameters"]:
        differing = [name for name in sorted(set(old["parameters"]) | set(new["parameters"]))
                     if old["parameters"].get(name) != new["parameters"].get(name)]
        name = differing[0]
        refusals.append(f"model parameters: {len(differing)} differ in name or shape, e.g. {name}: "
                        f"{old['parameters'].get(name)} in the checkpoint, {new['parameters'].get(name)} now")
    return refusals, changes


def check_resume(checkpoint: str, record: dict, allowed: set[str], deepspeed: bool) -> dict[str, dict]:
    """The changes of resuming `checkpoint` with the run described by `record`; a `ConfigError` naming every field
    that may not change."""
    old = read_record(checkpoint)
    if old is None:
        logger.warning("%s has no %s (written by an older tga or another tool): the configuration it was trained with "
                       "cannot be compared with this run's", checkpoint, RECORD_FILE)
        return {}
    refusals, changes = compare(old, record, allowed, deepspeed)
    if refusals:
        raise ConfigError(f"--resume_from_checkpoint {checkpoint}: this run differs from the one that wrote the "
                          f"checkpoint in what is trained: {'; '.join(refusals)}. Resume with the checkpoint's values, "
                          "start a new run in another --output_dir, or name the fields in --allow_config_change")
    for field, change in changes.items():
        logger.warning("resuming with %s changed: %r -> %r (recorded in %s)", field, change["from"], change["to"],
                       HISTORY_FILE)
    return changes


def append_history(output_dir: str, event: str, step: int, checkpoint: str | None, changes: dict,
                   allowed: set[str]) -> None:
    """One line of the run's history (rank 0)."""
    line = {"event": event, "step": step, "checkpoint": checkpoint, "time": time.time(), "host": socket.gethostname(),
            "pid": os.getpid(), "changes": changes, "allowed": sorted(allowed)}
    with open(os.path.join(output_dir, HISTORY_FILE), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, default=str) + "\n")


class LearningRateChange(TrainerCallback):
    """Puts a changed learning rate into the optimizer and scheduler that HF restored from the checkpoint.

    Each parameter group is scaled by new / old of its own rate (the projector's group by the projector rate's
    ratio), in the group and in the scheduler's base rates, so the schedule continues from the same point.
    """

    def __init__(self, changes: dict[str, dict], learning_rate: float, projector_lr: float | None):
        self.main = self.ratio(changes, "learning_rate", learning_rate)
        old_main = changes.get("learning_rate", {}).get("from", learning_rate)
        old_projector = changes.get("mm_projector_lr", {}).get("from", projector_lr)
        self.old_projector = old_projector if old_projector is not None else old_main
        new_projector = projector_lr if projector_lr is not None else learning_rate
        self.projector = new_projector / self.old_projector if self.old_projector else 1.0

    @staticmethod
    def ratio(changes: dict, field: str, new: float) -> float:
        old = changes.get(field, {}).get("from")
        return new / old if old else 1.0

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None or lr_scheduler is None or (self.main == 1.0 and self.projector == 1.0):
            return control
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # DeepSpeed's wrapper holds HF's scheduler
        base_rates = getattr(scheduler, "base_lrs", None)
        for index, group in enumerate(optimizer.param_groups):
            base = base_rates[index] if base_rates else group.get("initial_lr", group["lr"])
            factor = self.projector if self.old_projector and base == self.old_projector else self.main
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
            if base_rates:
                base_rates[index] = base * factor
        if hasattr(scheduler, "_last_lr"):  # what get_last_lr() (HF's logged rate) reports until the next step
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        logger.info("learning rates scaled by %.4g (projector %.4g) from the checkpoint's", self.main, self.projector)
        return control
