"""benchmarks/tga_bank.py

What the caption-state bank (tga.align.bank) saves, side by side in one run:
  step time    one stage-1 training step (projector trains, LLM frozen: the target is fixed) on the CPU benchmark model
               of benchmarks/tga_overhead.py (8 layers, hidden 256, 576 image tokens + 300 text tokens per sample,
               40 caption tokens), for plain CE, TGA with the live caption pass, and TGA reading the bank; the three
               interleaved step by step in one process, median of the rounds
  disk size    of a bank per 100,000 captions at the 7B recipe's shape (configs/pretrain/mistral7b_tga.yaml's target
               layers of Mistral-7B's 32 layers, hidden 4096), for each storage dtype, computed from the shape

    .venv/bin/python benchmarks/tga_bank.py [--steps 5] [--batch 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tga_overhead import LAYERS, build, make_batch  # noqa: E402  (the shared benchmark model)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("plain", "tga_live", "tga_bank")


def bank_disk_bytes(captions: int, recipe: str, num_layers: int = 32, hidden: int = 4096) -> tuple[list, dict]:
    """The recipe's target layers and the bytes of `states.npy` for `captions` rows at them, per storage dtype (the
    ids in bank.json come on top)."""
    from tga.align import parse_layer_spec
    from tga.align.bank import STORAGE

    with open(recipe, encoding="utf-8") as handle:
        layers = parse_layer_spec(str(yaml.safe_load(handle)["tga_layers"]), num_layers)
    return layers, {dtype: captions * len(layers) * hidden * kind().itemsize for dtype, kind in STORAGE.items()}


def make_steps(batch_size: int, folder: str):
    from tga.align.bank import open_or_build
    from tga.config import TrainingArguments
    from tga.train.trainer import GuideConfig, TGATrainer

    model, tokenizer = build(folder, "cpu")
    model.model.language_model.requires_grad_(False)  # stage 1: the LLM is frozen, the target fixed
    model.lm_head.requires_grad_(False)
    args = TrainingArguments(output_dir=folder, report_to="none", use_cpu=True)
    trainers = {name: TGATrainer(model=model, args=args, processing_class=tokenizer, guide=GuideConfig(layers=LAYERS))
                for name in ("tga_live", "tga_bank")}
    batch = make_batch(model, batch_size, "cpu")
    guide = batch["guide"]
    guide.guide_ids = [f"r{row}" for row in range(batch_size)]
    rows = [(f"r{row}", guide.caption_input_ids[row], guide.caption_mask[row]) for row in range(batch_size)]
    trainers["tga_bank"].guide.bank = open_or_build(os.path.join(folder, "bank"), model.model.language_model, rows,
                                                   LAYERS, dtype="float16", pad_token_id=tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(variant: str) -> None:
        outputs = model(**inputs, output_hidden_states=variant != "plain")
        loss = outputs.loss
        if variant != "plain":
            loss = loss + trainers[variant].guide.loss(model, outputs.hidden_states, guide)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="interleaved rounds (median reported)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        step = make_steps(args.batch, folder)
        for variant in VARIANTS:
            step(variant)  # warm-up
        times = {variant: [] for variant in VARIANTS}
        for round_index in range(args.steps):
            shift = round_index % len(VARIANTS)
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                started = time.perf_counter()
                step(variant)
                times[variant].append(time.perf_counter() - started)
    medians = {variant: sorted(values)[len(values) // 2] for variant, values in times.items()}
    layers, disk = bank_disk_bytes(100_000, os.path.join(REPO, "configs", "pretrain", "mistral7b_tga.yaml"))
    print(f"stage-1 step, CPU, batch {args.batch}, median of {args.steps} interleaved rounds")
    print(f"{'variant':10s} {'step s':>8s} {'/plain':>7s}")
    for variant in VARIANTS:
        print(f"{variant:10s} {medians[variant]:8.3f} {medians[variant] / medians['plain']:7.3f}")
    print(f"TGA overhead over plain: live {medians['tga_live'] / medians['plain'] - 1:+.1%}, "
          f"bank {medians['tga_bank'] / medians['plain'] - 1:+.1%}")
    print(f"bank size per 100,000 captions, Mistral-7B, layers {layers[0]}-{layers[-1]} ({len(layers)} x 4096): "
          + ", ".join(f"{dtype} {size / 2**30:.2f} GiB" for dtype, size in disk.items()))
    return {"step_s": medians, "disk_bytes_per_100k": disk}


if __name__ == "__main__":
    main()
