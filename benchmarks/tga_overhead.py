"""benchmarks/tga_overhead.py

Step time and peak memory of one stage-2 training step (forward + backward + AdamW) for the same model and batch:
  plain     next-token CE only (the LLaVA baseline)
  tga       CE + our guide loss: one forward with hidden states, a no-grad caption pass of the base LM, pooling
  released  CE + the released code's approach: a second full forward of the batch with output_attentions and all
            hidden states (eager attention), plus the caption pass; its guide loss made differentiable here

Step times are measured with the three variants interleaved step by step in one process (load drift on a shared
machine hits all of them equally); peak memory with each variant alone in its own process. Ratios are printed
against `plain`. Model: an 8-layer, 256-wide Mistral-architecture LLM with 576 image tokens (336 px, patch 14)
and 300 text tokens per sample. Targets (docs/architecture.md): tga/plain <= 1.10 time and <= 1.05 peak memory.

    .venv/bin/python benchmarks/tga_overhead.py [--steps 5] [--batch 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ("plain", "tga", "released")
LAYERS = [3, 4, 5, 6]


def build(tmp: str, device: str):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    from tga.model.tokenizer import load_tokenizer
    from tga.model.vlm import build_vlm
    from tga.tiny import mistral_tokenizer_file

    torch.manual_seed(0)
    llm_dir, vision_dir = os.path.join(tmp, "llm"), os.path.join(tmp, "vision")
    os.makedirs(llm_dir)
    import shutil

    shutil.copy(mistral_tokenizer_file(), os.path.join(llm_dir, "tokenizer.model"))
    MistralForCausalLM(MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=4)).save_pretrained(llm_dir)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=336, patch_size=14)).save_pretrained(vision_dir)
    CLIPImageProcessor().save_pretrained(vision_dir)
    tokenizer = load_tokenizer(llm_dir)
    model = build_vlm(llm_dir, vision_dir, tokenizer).to(device)
    model.model.vision_tower.requires_grad_(False)
    return model, tokenizer


def make_batch(model, batch_size: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    image_id, n_image = model.config.image_token_id, model.config.image_seq_length
    text = torch.randint(100, 30000, (batch_size, 300), generator=generator)
    ids = torch.cat([text[:, :20], torch.full((batch_size, n_image), image_id), text[:, 20:]], dim=1)
    labels = ids.clone()
    labels[:, : 20 + n_image + 100] = -100
    image_mask = ids == image_id
    retrieved_mask = torch.zeros_like(image_mask)
    retrieved_mask[:, 5:15] = True
    caption = torch.randint(100, 30000, (batch_size, 40), generator=generator)
    from tga.align.batch import GuideBatch

    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(batch_size, 3, 336, 336, generator=generator),
             "guide": GuideBatch(image_mask=image_mask, retrieved_mask=retrieved_mask,
                                 guide_index=torch.arange(batch_size), caption_input_ids=caption,
                                 caption_attention_mask=torch.ones_like(caption),
                                 caption_mask=torch.ones_like(caption, dtype=torch.bool))}
    return {k: v.to(device) for k, v in batch.items()}


def make_steps(steps_device: str, batch_size: int):
    """The model, and one training-step function per variant (same model, batch and optimizer)."""
    from tga.align import guide_loss, pool_layers
    from tga.config import TrainingArguments
    from tga.train.trainer import GuideConfig, TGATrainer

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build(tmp, steps_device)
        args = TrainingArguments(output_dir=tmp, report_to="none", use_cpu=steps_device == "cpu")
        trainer = TGATrainer(model=model, args=args, processing_class=tokenizer, guide=GuideConfig(layers=LAYERS))
    batch = make_batch(model, batch_size, steps_device)
    model_inputs = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "pixel_values")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(variant: str) -> None:
        outputs = model(**model_inputs, output_hidden_states=variant == "tga")
        loss = outputs.loss
        if variant == "tga":
            loss = loss + trainer.guide.loss(model, outputs.hidden_states, batch["guide"])[0]
        elif variant == "released":
            model.set_attn_implementation("eager")
            second = model(**{k: v for k, v in model_inputs.items() if k != "labels"}, output_attentions=True,
                           output_hidden_states=True)
            model.set_attn_implementation("sdpa")
            with torch.no_grad():
                caption = model.model.language_model(input_ids=batch["guide"].caption_input_ids, output_hidden_states=True)
            images = pool_layers(second.hidden_states, LAYERS, batch["guide"].image_mask)
            retrieved = pool_layers(second.hidden_states, LAYERS, batch["guide"].retrieved_mask)
            captions = pool_layers(caption.hidden_states, LAYERS, batch["guide"].caption_mask)
            loss = loss + guide_loss(images, captions, retrieved, form="released")[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, variant: str, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step(variant)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def run_times(steps: int, batch_size: int, device: str) -> dict:
    """Step times with the variants interleaved in one process (order rotating every round), so load drift on a shared
    machine hits all of them equally."""
    step = make_steps(device, batch_size)
    for variant in VARIANTS:
        step(variant)  # warm-up (allocations, optimizer state)
    times = {variant: [] for variant in VARIANTS}
    for round_index in range(steps):
        # The order rotates every round, so no variant always follows the memory-heavy released step.
        shift = round_index % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            times[variant].append(timed(step, variant, device))
    return {variant: sorted(values)[len(values) // 2] for variant, values in times.items()}


def run_memory(variant: str, batch_size: int, device: str) -> float:
    """Peak memory (MB) of one variant alone in its process: CUDA allocator peak, or peak RSS on CPU."""
    step = make_steps(device, batch_size)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(variant)
    return (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=(*VARIANTS, "times"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant == "times":
        print(json.dumps(run_times(args.steps, args.batch, args.device)))
        return
    if args.variant:
        print(json.dumps({"peak_mb": run_memory(args.variant, args.batch, args.device)}))
        return

    def child(variant: str) -> dict:
        output = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                                 "--batch", str(args.batch), "--device", args.device],
                                capture_output=True, text=True, check=True).stdout
        return json.loads(output.strip().splitlines()[-1])

    times = child("times")
    peaks = {variant: child(variant)["peak_mb"] for variant in VARIANTS}
    print(f"device={args.device} batch={args.batch} tokens/sample={300 + 576} layers=8 hidden=256; step time: median "
          f"of {args.steps} interleaved rounds; peak memory: each variant alone in its own process")
    print(f"{'variant':10s} {'step s':>8s} {'peak MB':>9s} {'time/plain':>11s} {'peak/plain':>11s}")
    for variant in VARIANTS:
        print(f"{variant:10s} {times[variant]:8.3f} {peaks[variant]:9.0f} {times[variant] / times['plain']:11.3f} "
              f"{peaks[variant] / peaks['plain']:11.3f}")


if __name__ == "__main__":
    main()
