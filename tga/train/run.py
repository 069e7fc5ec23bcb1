"""tga/train/run.py

One training stage, end to end, as a straight line: parse the config, set up the process, build the tokenizer and
the VLM, load the stage-1 projector, freeze per stage, build data, train, save. `scripts/pretrain.py` and
`scripts/finetune.py` call `run_stage("pretrain" | "finetune", argv)`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict

import torch
from transformers import set_seed

from tga.align.bank import caption_rows
from tga.align.guide_config import GuideConfig
from tga.config import check_sources, parse_config, zero_stage
from tga.data.arrow_records import ArrowSupervisedDataset, open_records
from tga.data.collator import VLMCollator
from tga.data.dataset import SampleBuilder
from tga.data.guard import BadRecordLog, GuardedDataset
from tga.data.safety_mix import MixedRecords
from tga.data.templates import get_template
from tga.errors import ConfigError, TGAError, TrainingStopped
from tga.model.loading import no_progress_bars
from tga.model.lora import add_lora, save_lora_model_folder
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm, is_vlm_checkpoint, llm_depth, load_vlm
from tga.options import config_argv
from tga.ranks import is_main_process
from tga.train.checkpoint import load_projector, save_model_folder, save_projector
from tga.train.cost import CostCallback
from tga.train.distributed import prepare_process
from tga.train.final_save import save_final, take_held_signal
from tga.train.integrity import latest_complete_checkpoint, list_checkpoints
from tga.train.plots import plot_training_curves
from tga.train.preflight import check_output_dir, preflight
from tga.train.resilience import resolve_resume_checkpoint, run_guards
from tga.train.resume_check import LearningRateChange, allowed_changes, append_history, check_resume, run_record
from tga.train.run_lock import claim_output_dir
from tga.train.stages import apply_lora_stage, apply_stage, trainable_components
from tga.train.tracking import ResolvedConfigCallback, git_revision
from tga.train.trainer import TGATrainer

logger = logging.getLogger(__name__)


def model_dtype(training_args) -> torch.dtype:
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def build_model_and_processors(model_args, training_args, aspect_ratio: str = "pad"):
    """Tokenizer, VLM and image processor (padding as `aspect_ratio` says, and saved so), from an LLM + vision tower or
    from a saved VLM folder."""
    source = model_args.model_name_or_path
    tokenizer = load_tokenizer(source, model_max_length=training_args.model_max_length)
    dtype = model_dtype(training_args)
    if is_vlm_checkpoint(source):
        model = load_vlm(source, dtype=dtype, attn_implementation=model_args.attn_implementation)
        image_processor = load_image_processor(source, aspect_ratio)
    else:
        model = build_vlm(
            source, model_args.vision_tower, tokenizer, projector_type=model_args.mm_projector_type,
            select_layer=model_args.mm_vision_select_layer, select_feature=model_args.mm_vision_select_feature,
            template=model_args.version, dtype=dtype, attn_implementation=model_args.attn_implementation,
        )
        image_processor = load_image_processor(model_args.vision_tower, aspect_ratio)
    model.config.tga_template = get_template(model_args.version).name
    model.config.use_cache = False
    return tokenizer, model, image_processor


def build_dataset(data_args, tga_args, model, tokenizer, image_processor, training_args, *, stage: str):
    # Records are converted to Arrow once (local main process first, the other ranks then open its cache) and
    # memory-mapped; the cheap checks of every record (schema, image path inside the folder and present) run here.
    with training_args.main_process_first(desc="converting records to Arrow"), no_progress_bars():
        records = open_records(data_args.data_path, cache_dir=data_args.data_cache_dir,
                               num_proc=data_args.preprocessing_num_workers, image_folder=data_args.image_folder,
                               check_images=True, skip_bad=data_args.skip_bad_records)
    if not records:
        raise ConfigError(f"--data_path {data_args.data_path}: no records")
    if data_args.safety_data:  # VLGuard-style: image safety records mixed in at --safety_ratio
        with training_args.main_process_first(desc="converting safety records to Arrow"):
            safety = open_records(data_args.safety_data, cache_dir=data_args.data_cache_dir,
                                  num_proc=data_args.preprocessing_num_workers, image_folder=data_args.image_folder,
                                  check_images=True, skip_bad=data_args.skip_bad_records)
        records = MixedRecords(records, safety, data_args.safety_ratio, seed=training_args.seed)
    builder = SampleBuilder(
        tokenizer=tokenizer, template=get_template(model.config.tga_template), image_processor=image_processor,
        image_folder=data_args.image_folder, image_token_id=image_token_id(tokenizer),
        num_image_tokens=model.config.image_seq_length, max_length=training_args.model_max_length,
        image_aspect_ratio=data_args.image_aspect_ratio, use_retrieved=data_args.use_retrieved_in_prompt,
        caption_target=tga_args.tga, guide_toxic=tga_args.tga_guide_toxic,
        caption_context=tga_args.tga_caption_context, request_guide=tga_args.tga and tga_args.tga_form == "request",
    )
    log = BadRecordLog(training_args.output_dir, records.rejected)
    return GuardedDataset(ArrowSupervisedDataset(records, builder), log, skip_bad=data_args.skip_bad_records)


def resolved_config(stage: str, argv: list[str], *arg_objects) -> dict:
    """The resolved configuration (+ git revision) of a run, as `tga_config.json` holds it."""
    resolved = {"stage": stage, "argv": argv, "git_revision": git_revision(os.path.dirname(os.path.abspath(__file__)))}
    for arguments in arg_objects:
        resolved[type(arguments).__name__] = arguments.to_dict() if hasattr(arguments, "to_dict") else asdict(arguments)
    return json.loads(json.dumps(resolved, default=str))


def check_stage_options(components: set[str], model_args) -> None:
    """Contradictions between the stage's trainable parts and the LoRA options (the guide's: `GuideConfig.for_run`)."""
    if model_args.lora_enable and "llm" not in components:
        raise ConfigError("--lora_enable is for stage 2 (finetune), where the LLM trains")


def begin_run(training_args, resolved: dict, record: dict) -> tuple[str | None, dict]:
    """The checkpoint to resume from and the configuration changes since it (refused by name where they change
    what is trained); records the start in the run's history and, on a fresh start, writes tga_config.json."""
    output_dir = training_args.output_dir
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir)
    allowed = allowed_changes(training_args.allow_config_change, resolved)
    if resume is None and list_checkpoints(output_dir):
        raise ConfigError(f"--output_dir {output_dir} holds the checkpoints of an earlier run "
                          f"({os.path.basename(list_checkpoints(output_dir)[-1][1])}): continue it with "
                          "--resume_from_checkpoint auto, or start the new run in another folder")
    changes = check_resume(resume, record, allowed, bool(training_args.deepspeed)) if resume else {}
    if is_main_process():
        config_file = os.path.join(output_dir, "tga_config.json")
        if resume is None or not os.path.exists(config_file):  # the first record of a run is never overwritten
            with open(config_file, "w", encoding="utf-8") as handle:
                json.dump(resolved, handle, indent=2)
        step = int(os.path.basename(resume).rpartition("-")[2]) if resume and resume[-1].isdigit() else 0
        append_history(output_dir, "resume" if resume else "start", step, resume, changes, allowed)
    return resume, changes


def run_stage(stage: str, argv: list[str]) -> str:
    """Train one stage; returns the output folder."""
    argv = prepare_process(argv)
    model_args, data_args, tga_args, training_args = parse_config(argv)
    check_sources(model_args, tga_args)
    argv = config_argv(argv)  # recorded in tga_config.json as the flags that ran, not a path to a file that may change
    components = trainable_components(stage, tune_mm_mlp_adapter=model_args.tune_mm_mlp_adapter,
                                      freeze_backbone=model_args.freeze_backbone,
                                      freeze_mm_mlp_adapter=model_args.freeze_mm_mlp_adapter)
    check_stage_options(components, model_args)
    guide = GuideConfig.for_run(tga_args, num_layers=llm_depth(model_args.model_name_or_path),
                                trains_llm="llm" in components,
                                zero3=zero_stage(training_args) == 3) if tga_args.tga else None
    with claim_output_dir(training_args.output_dir):  # one run at a time per folder, until the stage ends
        held = train_stage(stage, argv, components, model_args, data_args, tga_args, training_args, guide)
    take_held_signal(held, training_args.output_dir)
    return training_args.output_dir


def train_stage(stage, argv, components, model_args, data_args, tga_args, training_args, guide_config) -> int | None:
    """Build, train and save one stage in its output folder; returns a signal held during the final save, or None."""
    output_dir = training_args.output_dir
    if is_main_process():
        check_output_dir(output_dir)  # a read-only or missing mount fails now, not at the first save
    resolved = resolved_config(stage, argv, model_args, data_args, tga_args, training_args)
    started = time.time()
    set_seed(training_args.seed)  # the resized embedding rows and the projector init are random
    tokenizer, model, image_processor = build_model_and_processors(model_args, training_args,
                                                                   data_args.image_aspect_ratio)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    apply_stage(model, components)
    if model_args.lora_enable:  # adapters on the LLM's linear layers, injected in place: the model stays a Llava
        model = add_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                         targets=model_args.lora_target, bias=model_args.lora_bias, wrap=False)
        apply_lora_stage(model, components)
    dataset = build_dataset(data_args, tga_args, model, tokenizer, image_processor, training_args, stage=stage)
    preflight(output_dir, model)
    record = run_record(resolved, training_args.world_size, model)
    resume, changes = begin_run(training_args, resolved, record)
    zero3_multi_rank = training_args.world_size > 1 and bool(training_args.deepspeed)
    trainer = TGATrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=VLMCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, guide=guide_config, projector_lr=training_args.mm_projector_lr,
        always_run_all_modules=zero3_multi_rank, callbacks=[ResolvedConfigCallback(resolved)],
    )
    if training_args.include_num_input_tokens_seen == "no":
        training_args.include_num_input_tokens_seen = "non_padding"  # the token count of cost.json
    if trainer.guide is not None and tga_args.tga_bank:  # built from the records at train start if missing
        trainer.guide.bank_rows = lambda: caption_rows(dataset.dataset.records, dataset.dataset.builder)
    guide = trainer.guide  # its caption pass is a forward-only pass; a frozen target is a second copy of the LLM
    trainer.add_callback(CostCallback(
        output_dir, f"{'tga' if tga_args.tga else 'llava'}-{stage}",
        reference=guide.frozen_language_model if guide else None,
        reference_params=guide.caption_parameters(model) if guide else None,
        reference_tokens=guide.caption_tokens if guide else None,
    ))
    held = train_and_finish(
        trainer, stage, resume, changes, record, dataset.log,
        lambda folder: write_final(folder, stage, components, trainer, model, tokenizer, image_processor, model_args,
                                   training_args))
    if is_main_process():
        plot_training_curves(trainer.state.log_history, output_dir)
    logger.info("stage %s finished in %.1f s -> %s", stage, time.time() - started, output_dir)
    return held


def train_and_finish(trainer, name: str, resume: str | None, changes: dict, record: dict, log, write) -> int | None:
    """Train with the run's guards (checkpoint markers, signal stop, saves on a clock, launcher watch) and write the
    final files atomically with `write(folder)`; returns a signal held during the final save, or None (the caller
    re-raises it once the output folder is released: `final_save.take_held_signal`)."""
    args = trainer.args
    if changes:
        trainer.add_callback(LearningRateChange(changes, args.learning_rate, getattr(args, "mm_projector_lr", None)))
    guards = run_guards(args, log, record)
    for callback in guards.callbacks:
        trainer.add_callback(callback)
    try:
        train(trainer, guards, resume, name)
        save_final(write, args.output_dir, trainer.state.global_step, trainer.model, args.device,
                   newest_checkpoint=latest_complete_checkpoint(args.output_dir, checksum=False))
    finally:
        held = guards.stop.release()
    return held


def train(trainer, guards, resume: str | None, stage: str) -> None:
    """`trainer.train`, with a failed checkpoint write, an unloadable checkpoint and a signal stop named."""
    output_dir = trainer.args.output_dir
    try:
        trainer.train(resume_from_checkpoint=resume)
    except TGAError:
        raise
    except Exception as error:  # a failed checkpoint write becomes an error naming the path; others pass through
        failure = guards.failure(error, output_dir)
        if failure is None and resume and not guards.stop.started:  # failed while loading the checkpoint
            failure = ConfigError(f"--resume_from_checkpoint {resume}: cannot be loaded ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}); resume from another checkpoint")
        if failure is None:
            raise
        raise failure from error
    if guards.stop.stopped:  # SIGTERM: a complete checkpoint is saved; a rerun with --resume_from_checkpoint auto continues
        raise TrainingStopped(f"stage {stage} stopped by a signal at step {trainer.state.global_step}; a complete "
                              f"checkpoint is in {output_dir}: rerun with --resume_from_checkpoint auto to continue")


def write_final(folder, stage, components, trainer, model, tokenizer, image_processor, model_args, training_args):
    """Every final file of a stage into `folder` (every rank calls this; rank 0 writes)."""
    projector_only = stage == "pretrain" and "llm" not in components
    with no_progress_bars():  # the training bar is the stage's progress line; writing shards is not
        if projector_only:
            save_projector(model, folder)
        if model_args.lora_enable:  # merged full folder + lora_adapter/
            save_lora_model_folder(trainer, model, tokenizer, image_processor, folder,
                                   base_model=model_args.model_name_or_path)
        elif not projector_only or training_args.save_full_model:
            save_model_folder(trainer, model, tokenizer, image_processor, folder)
        elif is_main_process():
            model.config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    if is_main_process():  # the log history (losses, TGA metrics), as Trainer.save_state writes it
        trainer.state.save_to_json(os.path.join(folder, "trainer_state.json"))
