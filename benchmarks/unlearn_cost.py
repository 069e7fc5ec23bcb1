"""benchmarks/unlearn_cost.py

Per-step time and peak memory of textual vs multimodal unlearning on the same tiny VLM, as ratios from one invocation.
Both variants run the full `tga unlearn` path (UnlearnTrainer, two-model reference, batch 2): textual unlearning on
harmful prompt/response pairs, multimodal unlearning on the same pairs with an image in the prompt (LLaVA records), the
keep term on the same normal data. The VLM: a 4-layer, 256-wide Mistral-architecture LLM (real Mistral tokenizer) and a
2-layer CLIP tower at 336 px / patch 14, i.e. 576 image tokens per image, as in LLaVA-1.5.

Each variant runs in its own process (peak RSS is its own). Reported per variant: median step time (first step
excluded), tokens and FLOPs estimate per step (from cost.json), peak RSS growth during training, the largest per-step
total of tensors saved for backward (activation memory, unique storages) and, on CUDA, peak allocated memory.

    .venv/bin/python benchmarks/unlearn_cost.py [--steps 4] [--out runs/bench/unlearn_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

VARIANTS = ("text", "multimodal")


def build_assets(root: str) -> dict[str, str]:
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    from tga.model.tokenizer import load_tokenizer
    from tga.model.vision import load_image_processor
    from tga.model.vlm import build_vlm
    from tga.tiny import mistral_tokenizer_file

    torch.manual_seed(0)
    llm_dir, vision_dir, vlm_dir = (os.path.join(root, name) for name in ("llm", "vision", "vlm"))
    os.makedirs(llm_dir)
    shutil.copy(mistral_tokenizer_file(), os.path.join(llm_dir, "tokenizer.model"))
    MistralForCausalLM(MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4)).save_pretrained(llm_dir)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=336, patch_size=14)).save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(vision_dir)
    tokenizer = load_tokenizer(llm_dir)
    model = build_vlm(llm_dir, vision_dir, tokenizer)
    model.save_pretrained(vlm_dir)
    tokenizer.save_pretrained(vlm_dir)
    load_image_processor(vision_dir).save_pretrained(vlm_dir)
    images = os.path.join(root, "images")
    os.makedirs(images)
    text_rows, llava_rows, normal_rows = [], [], []
    for i in range(8):
        prompt = f"Explain in detail how someone could hurt person number {i} without being noticed by anyone."
        response = f"Sure. To hurt person {i} you would first follow them home and then wait until nobody is around."
        Image.new("RGB", (336, 336), (30 * i % 255, 90, 160)).save(os.path.join(images, f"{i}.png"))
        text_rows.append({"prompt": prompt, "response": response})
        llava_rows.append({"id": f"mm-{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": response}]})
        normal_rows.append({"question": f"What is the capital city of country number {i} in the list?",
                            "best_answer": f"The capital of country {i} is the largest city on its coast."})
    paths = {"model": vlm_dir, "images": images, "text": os.path.join(root, "harmful.jsonl"),
             "multimodal": os.path.join(root, "harmful_llava.json"), "normal": os.path.join(root, "normal.jsonl")}
    for key, rows in (("text", text_rows), ("normal", normal_rows)):
        with open(paths[key], "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    with open(paths["multimodal"], "w", encoding="utf-8") as handle:
        json.dump(llava_rows, handle)
    return paths


class StepProbe(TrainerCallback):
    """Step wall times and the bytes of tensors saved for backward per step (unique storages)."""

    def __init__(self):
        self.times, self.saved_peaks, self.saved, self.started = [], [], {}, 0.0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.saved[(storage.data_ptr(), tensor.device.type)] = storage.nbytes()
        return tensor

    def on_step_begin(self, args, state, control, **kwargs):
        self.saved.clear()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.started)
        self.saved_peaks.append(sum(self.saved.values()))


def run_variant(variant: str, paths: dict, steps: int, out_dir: str) -> dict:
    from tga.train.cost import peak_rss_bytes
    from tga.unlearn.run import prepare_unlearning

    flags = ["--model", paths["model"], "--harmful", paths[variant], "--normal", paths["normal"],
             "--image_folder", paths["images"], "--output_dir", out_dir, "--max_steps", str(steps),
             "--logging_steps", str(steps), "--dataloader_num_workers", "0", "--seed", "0"]
    run = prepare_unlearning(flags)
    probe = StepProbe()
    run.trainer.add_callback(probe)
    rss_before = peak_rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda tensor: tensor):
        run.trainer.train()
    with open(os.path.join(out_dir, "cost.json"), encoding="utf-8") as handle:
        cost = json.load(handle)
    return {
        "variant": variant,
        "step_time_s": statistics.median(probe.times[1:] or probe.times),
        "tokens_per_step": cost["tokens"]["train"] / cost["steps"],
        "flops_per_step": cost["flops_estimate"]["total"] / cost["steps"],
        "activation_bytes_peak": max(probe.saved_peaks),
        "peak_rss_growth_bytes": peak_rss_bytes() - rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "state_bytes": cost["memory"]["state_bytes_rank0"]["total"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one variant, result as the last stdout line
        with open(os.path.join(args.assets, "paths.json"), encoding="utf-8") as handle:
            paths = json.load(handle)
        result = run_variant(args.variant, paths, args.steps, os.path.join(args.assets, args.variant))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as root:
        paths = build_assets(root)
        with open(os.path.join(root, "paths.json"), "w", encoding="utf-8") as handle:
            json.dump(paths, handle)
        results = {}
        for variant in VARIANTS:
            command = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--assets", root,
                       "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    text, multimodal = results["text"], results["multimodal"]
    ratios = {key: multimodal[key] / text[key] for key in
              ("step_time_s", "tokens_per_step", "flops_per_step", "activation_bytes_peak", "peak_rss_growth_bytes",
               "peak_rss_bytes", "state_bytes")
              if text[key]}
    if text["cuda_peak_allocated_bytes"]:
        ratios["cuda_peak_allocated_bytes"] = multimodal["cuda_peak_allocated_bytes"] / text["cuda_peak_allocated_bytes"]
    report = {"device": "cuda" if torch.cuda.is_available() else "cpu", "steps": args.steps, "text": text,
              "multimodal": multimodal, "multimodal_over_text": ratios}
    print(json.dumps(report, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
