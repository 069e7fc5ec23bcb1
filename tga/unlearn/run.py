"""tga/unlearn/run.py

`tga unlearn` as a straight line: parse options, load the VLM and tokenizer from a saved folder, freeze everything
but the LLM (optionally LoRA on the LLM), load the reference, build the forget / mismatch / keep data, train with
`UnlearnTrainer`, and save a complete VLM folder (LoRA merged) plus `unlearn_summary.json` and `cost.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass

from transformers import set_seed

from tga.data.chat_templates import chat_template
from tga.data.dataset import SampleBuilder
from tga.data.guard import BadRecordLog
from tga.data.templates import get_template
from tga.model.lora import add_lora
from tga.model.processor import build_processor
from tga.model.sources import check_model_source
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import load_vlm
from tga.ranks import is_main_process
from tga.train.checkpoint import save_model_folder
from tga.train.cost import CostCallback, TokenCounter, numel
from tga.train.distributed import prepare_process
from tga.train.final_save import take_held_signal
from tga.train.resume_check import run_record
from tga.train.run import begin_run, model_dtype, resolved_config, train_and_finish
from tga.train.run_lock import claim_output_dir
from tga.train.stages import apply_stage, component_modules
from tga.unlearn.config import UnlearnArguments, parse_unlearn_config
from tga.unlearn.data import load_pairs, load_refusals
from tga.unlearn.dataset import UnlearnCollator, UnlearnDataset
from tga.unlearn.loss import UnlearnWeights
from tga.unlearn.trainer import UnlearnTrainer

logger = logging.getLogger(__name__)
SUMMARY_FILE = "unlearn_summary.json"


def llm_parameter_count(model) -> int:
    return sum(numel(p) for module in component_modules(model)["llm"] for p in module.parameters())


def build_unlearn_dataset(args: UnlearnArguments, model, tokenizer, image_processor, training_args) -> UnlearnDataset:
    builder = SampleBuilder(
        tokenizer=tokenizer, template=get_template(getattr(model.config, "tga_template", None) or "llava_llama_2"),
        image_processor=image_processor, image_folder=args.image_folder, image_token_id=image_token_id(tokenizer),
        num_image_tokens=model.config.image_seq_length, max_length=training_args.model_max_length,
        image_aspect_ratio=args.image_aspect_ratio,
    )
    return UnlearnDataset(
        load_pairs(args.harmful, what="--harmful"), load_pairs(args.normal, what="--normal"), builder,
        refusals=load_refusals(args.refusal) if args.refusal else None, seed=training_args.seed,
    )


def save_unlearned(trainer, model, tokenizer, image_processor, output_dir: str, lora: bool) -> None:
    """A complete VLM folder: the trained weights (LoRA merged into the LLM), tokenizer, processor, chat template."""
    if not lora:
        save_model_folder(trainer, model, tokenizer, image_processor, output_dir)
        return
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    if is_main_process():
        merged.save_pretrained(output_dir)
        tokenizer.chat_template = chat_template(getattr(merged.config, "tga_template", None) or "llava_llama_2")
        tokenizer.save_pretrained(output_dir)
        build_processor(merged, tokenizer, image_processor).save_pretrained(output_dir)


@dataclass
class UnlearnRun:
    """Everything a run needs, built but not trained (tests and the benchmark drive it step by step)."""

    args: UnlearnArguments
    training_args: object
    trainer: UnlearnTrainer
    model: object
    tokenizer: object
    image_processor: object
    dataset: UnlearnDataset
    resolved: dict | None = None  # the resolved configuration (tga_config.json)
    record: dict | None = None  # what each checkpoint records about the run (tga.train.resume_check)
    held_signal: int | None = None  # a signal that arrived during the final save, re-raised once the folder is free


def prepare_unlearning(argv: list[str], held: contextlib.ExitStack | None = None) -> UnlearnRun:
    """Parse options, load model, reference and data, and build the trainer with its cost callback. With `held`, the
    output folder is claimed (tga/train/run_lock.py) until the caller closes it."""
    argv = prepare_process(argv)
    args, training_args = parse_unlearn_config(argv)
    check_model_source("model", args.model)
    if held is not None:
        held.enter_context(claim_output_dir(training_args.output_dir))
    resolved = resolved_config("unlearn", argv, args, training_args)
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(args.model, model_max_length=training_args.model_max_length)
    dtype = model_dtype(training_args)
    model = load_vlm(args.model, dtype=dtype)
    model.config.use_cache = False
    image_processor = load_image_processor(args.model, args.image_aspect_ratio)
    dataset = build_unlearn_dataset(args, model, tokenizer, image_processor, training_args)
    apply_stage(model, {"llm"})
    llm_params = llm_parameter_count(model)
    if args.lora_enable:
        # LoRA on the LLM's linear layers only, as a PeftModel: the reference is the model under disable_adapter().
        model = add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                         targets=args.lora_target_modules)
    # Loaded after TrainingArguments: under ZeRO-3 transformers partitions it while loading.
    reference = load_vlm(args.model, dtype=dtype) if args.reference_kind() == "copy" else None
    counter = TokenCounter()
    trainer = UnlearnTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=UnlearnCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, weights=UnlearnWeights(args.w_fgt, args.w_rdn, args.w_nor),
        reference=reference, forget_ceiling=args.forget_ceiling if args.forget_ceiling > 0 else None, counter=counter,
    )
    method = "unlearn-multimodal" if dataset.multimodal else "unlearn-text"
    # Text-only batches never run the vision tower and projector; under LoRA the frozen LLM base still runs.
    frozen_forward_params = None if dataset.multimodal else (llm_params if args.lora_enable else 0)
    trainer.add_callback(CostCallback(training_args.output_dir, method, counter=counter, reference=trainer.reference,
                                      reference_params=llm_params, frozen_params=frozen_forward_params))
    record = run_record(resolved, training_args.world_size, model)
    return UnlearnRun(args, training_args, trainer, model, tokenizer, image_processor, dataset, resolved, record)


def run_unlearn(argv: list[str]) -> str:
    """Unlearn harmful responses from the LLM of a saved VLM.

    Args:
        argv: an optional YAML path and flags (see tga/unlearn/config.py).

    Returns:
        The output folder: a complete VLM folder plus `unlearn_summary.json` and `cost.json`.
    """
    with contextlib.ExitStack() as held:  # the output folder stays claimed until the model is saved
        run = prepare_unlearning(argv, held)
        output_dir = train_and_save(run)
    take_held_signal(run.held_signal, output_dir)
    return output_dir


def train_and_save(run: UnlearnRun) -> str:
    """Train a prepared run with the training stages' guards (verified resume, checkpoint markers, non-finite steps,
    signals) and save the model folder, `trainer_state.json` and `unlearn_summary.json` atomically; returns the
    output folder."""
    trainer, training_args = run.trainer, run.training_args
    output_dir = training_args.output_dir
    resume, changes = begin_run(training_args, run.resolved, run.record)
    run.held_signal = train_and_finish(trainer, "unlearn", resume, changes, run.record, BadRecordLog(None),
                                       lambda folder: write_unlearned(folder, run))
    logger.info("unlearning finished after %d steps -> %s", trainer.state.global_step, output_dir)
    return output_dir


def write_unlearned(folder: str, run: UnlearnRun) -> None:
    """Every final file of an unlearning run into `folder` (every rank calls this; rank 0 writes)."""
    trainer = run.trainer
    save_unlearned(trainer, run.model, run.tokenizer, run.image_processor, folder, run.args.lora_enable)
    if is_main_process():
        trainer.state.save_to_json(os.path.join(folder, "trainer_state.json"))
        summary = {"method": "unlearn-multimodal" if run.dataset.multimodal else "unlearn-text",
                   "steps": trainer.state.global_step, "stopped_at": trainer.stopped_at,
                   "reference": run.args.reference_kind(), "lora": run.args.lora_enable,
                   "harmful_pairs": len(run.dataset), "log_history": trainer.state.log_history}
        with open(os.path.join(folder, SUMMARY_FILE), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
