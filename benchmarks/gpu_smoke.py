"""benchmarks/gpu_smoke.py

The GPU path, measured on one card: stage 2 (LLM + projector train, vision tower frozen) under DeepSpeed ZeRO-3, in
float32 and bf16, with a random Mistral-shaped LLM of about 1B parameters (hidden 2048, 16 layers, GQA 16/4 heads,
MLP 7168, vocabulary 32000) and a CLIP-L/336-shaped vision tower (24 layers, hidden 1024, patch 14: 576 image
tokens), SDPA attention. For each precision, plain LLaVA (CE only) against TGA (CE + guide, target layers 4-8,
retrieved text in the prompt), each run twice:

    step_s        median seconds per optimizer step (steps after the first two; `throughput/seconds_per_step`)
    peak_gib      peak GPU memory allocated (cost.json `cuda_peak_allocated_bytes_rank0`)
    mfu           FLOPs per step of the cost accounting (cost.json, caption pass included) / step_s / the card's
                  published dense peak for the dtype (float32 without TF32, bf16 tensor cores); None on an unknown card
    same_losses   the two runs logged identical losses at every step

Each run is `scripts/finetune.py` in its own process, on generated data (random images, captions, retrieved text).
`--dry_run` uses tiny shapes on the CPU, float32 only, so the tests exercise the whole path without a GPU.

    .venv/bin/python benchmarks/gpu_smoke.py [--steps 12] [--batch 4] [--out runs/gpu_smoke.json]
    .venv/bin/python benchmarks/gpu_smoke.py --dry_run --steps 2
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Published dense peaks (FLOP/s): float32 on CUDA cores (PyTorch leaves TF32 off for matmuls), bf16 on tensor cores.
PEAK_FLOPS = {"H100 PCIe": {"fp32": 51e12, "bf16": 756e12}, "H100": {"fp32": 67e12, "bf16": 989e12},
              "H200": {"fp32": 67e12, "bf16": 989e12}, "A100": {"fp32": 19.5e12, "bf16": 312e12}}
FULL = {"llm": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 7168, "num_hidden_layers": 16,
                "num_attention_heads": 16, "num_key_value_heads": 4},
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "image_size": 336, "patch_size": 14, "projection_dim": 768},
        "layers": "4-8", "records": 64}
TINY = {"llm": {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2},
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "image_size": 28, "patch_size": 14, "projection_dim": 32},
        "layers": "1-2", "records": 16}


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The card's published peak for `dtype`, matched on its name (the most specific entry first)."""
    for card in sorted(PEAK_FLOPS, key=len, reverse=True):
        if all(part in device_name for part in card.split()):
            return PEAK_FLOPS[card][dtype]
    return None


def write_assets(folder: str, shapes: dict) -> dict[str, str]:
    """Random LLM and vision tower folders (the real Mistral tokenizer) and generated records with images."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    from tga.tiny import mistral_tokenizer_file

    torch.manual_seed(0)
    llm, vision, images = (os.path.join(folder, name) for name in ("llm", "vision", "images"))
    for path in (llm, vision, images):
        os.makedirs(path)
    shutil.copy(mistral_tokenizer_file(), os.path.join(llm, "tokenizer.model"))
    MistralForCausalLM(MistralConfig(**shapes["llm"])).save_pretrained(llm)
    CLIPVisionModel(CLIPVisionConfig(**shapes["vision"])).save_pretrained(vision)
    size = shapes["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(vision)
    rng = np.random.default_rng(0)
    colours, things = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle", "star"]
    records = []
    for index in range(shapes["records"]):
        name = f"img_{index:04d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(images, name))
        caption = f"a {colours[index % 4]} {things[(index // 4) % 4]} on a plain background"
        records.append({"id": f"r{index}", "image": name, "image_caption": caption,
                        "retrieved_caption": f"a {colours[(index + 1) % 4]} {things[index % 4]}",
                        "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                                          {"from": "gpt", "value": f"The image shows {caption}. " * 4}]})
    data = os.path.join(folder, "data.json")
    with open(data, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    return {"llm": llm, "vision": vision, "images": images, "data": data}


def run_once(assets: dict, output_dir: str, *, dtype: str, tga: bool, steps: int, batch: int, layers: str) -> dict:
    """One stage-2 run in its own process; its losses, step times, FLOPs and peak memory."""
    config = "zero3_fp32.json" if dtype == "fp32" else "zero3.json"
    command = [sys.executable, os.path.join(REPO, "scripts", "finetune.py"),
               "--model_name_or_path", assets["llm"], "--vision_tower", assets["vision"],
               "--data_path", assets["data"], "--image_folder", assets["images"], "--output_dir", output_dir,
               "--deepspeed", os.path.join(REPO, "deepspeed_configs", config), "--bf16", str(dtype == "bf16").lower(),
               "--version", "llava_llama_2", "--attn_implementation", "sdpa", "--per_device_train_batch_size",
               str(batch), "--max_steps", str(steps), "--logging_steps", "1", "--save_strategy", "no",
               "--learning_rate", "2e-5", "--lr_scheduler_type", "constant", "--report_to", "none", "--seed", "0",
               "--dataloader_num_workers", "0", "--model_max_length", "1024", "--use_retrieved_in_prompt", "true",
               "--tga", str(tga).lower(), "--tga_layers", layers]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    with open(os.path.join(output_dir, "cost.json"), encoding="utf-8") as handle:
        cost = json.load(handle)
    logs = [entry for entry in history if "loss" in entry]
    times = [entry["throughput/seconds_per_step"] for entry in logs][2:] or [cost["wall_time_s"] / cost["steps"]]
    return {"losses": [entry["loss"] for entry in logs], "step_s": statistics.median(times),
            "flops_per_step": cost["flops_estimate"]["total"] / max(1, cost["steps"]),
            "peak_bytes": cost["memory"]["cuda_peak_allocated_bytes_rank0"]}


def measure(assets: dict, folder: str, *, dtypes, steps: int, batch: int, layers: str, device_name: str) -> list:
    rows = []
    for dtype in dtypes:
        for tga in (False, True):
            runs = [run_once(assets, os.path.join(folder, f"{dtype}-{tga}-{repeat}"), dtype=dtype, tga=tga,
                             steps=steps, batch=batch, layers=layers) for repeat in (1, 2)]
            step_s = statistics.median(run["step_s"] for run in runs)
            peak = peak_flops(device_name, dtype)
            rows.append({"dtype": dtype, "method": "tga" if tga else "plain", "step_s": step_s,
                         "peak_gib": None if runs[0]["peak_bytes"] is None else runs[0]["peak_bytes"] / 2**30,
                         "flops_per_step": runs[0]["flops_per_step"],
                         "mfu": None if peak is None else runs[0]["flops_per_step"] / step_s / peak,
                         "same_losses": runs[0]["losses"] == runs[1]["losses"], "losses": runs[0]["losses"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--dry_run", action="store_true", help="tiny shapes on the CPU, float32 only (for tests)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first two are not timed)")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch size")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry_run")
    device_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    shapes = TINY if args.dry_run else FULL
    folder = tempfile.mkdtemp(prefix="tga-gpu-smoke-")
    try:
        assets = write_assets(folder, shapes)
        env_device = {"CUDA_VISIBLE_DEVICES": ""} if args.dry_run else {}
        os.environ.update(env_device)
        rows = measure(assets, folder, dtypes=("fp32",) if args.dry_run else ("fp32", "bf16"), steps=args.steps,
                       batch=args.batch, layers=shapes["layers"], device_name=device_name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = {"device": device_name, "shapes": shapes, "steps": args.steps, "batch": args.batch, "rows": rows}
    print(f"{device_name}: stage 2, ZeRO-3, SDPA, batch {args.batch}, {args.steps} steps")
    print(f"{'dtype':6} {'method':6} {'step s':>8} {'peak GiB':>9} {'TFLOP/step':>11} {'MFU':>6} same losses")
    for row in rows:
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
        print(f"{row['dtype']:6} {row['method']:6} {row['step_s']:8.3f} {peak:>9} "
              f"{row['flops_per_step'] / 1e12:11.3f} {mfu:>6} {row['same_losses']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
