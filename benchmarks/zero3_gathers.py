"""benchmarks/zero3_gathers.py

What TGA's caption pass costs in ZeRO-3 parameter all-gathers: stage 2 on 2 CPU ranks (gloo), plain LLaVA
(`--tga false`) against TGA with a live target whose caption pass runs separately after the training forward
(`--tga_caption_pass separate`) or rides it (`shared`, tga.align.shared_pass), on the tiny recipe's model and on a
wider one, side by side in one run.

Bytes come from DeepSpeed's own communication logger (`comms_logger` in the DeepSpeed config, every op profiled):
the summed message size of every `all_gather*` op on rank 0, which under ZeRO-3 is the parameter gathers (the
gradients move by reduce-scatter). Per optimizer step = (total after 12 steps - total after 6 steps) / 6, which
removes the gathers of start-up and of the final save. The step time is the median of the Trainer's logged
`throughput/seconds_per_step` over steps 3 .. 12 of the 12-step run (every step logged; the first steps, which
build DeepSpeed's trace, are left out). Two ZeRO-3 regimes:

  no-reuse   nothing kept live between uses (`stage3_param_persistence_threshold`, `stage3_max_live_parameters`,
             `stage3_max_reuse_distance`, `stage3_prefetch_bucket_size` all 0): the regime of a 7B model, whose
             band of target layers (about 4e9 elements up to layer 18) is far wider than the shipped reuse
             distance (1e9), so every layer the caption pass runs is gathered again
  shipped    deepspeed_configs/zero3_fp32.json as it is: a small model fits inside the reuse distance and the
             caption pass reuses the layers the training forward gathered

    .venv/bin/python benchmarks/zero3_gathers.py [--models tiny wide] [--regimes no-reuse shipped] [--out FILE]

Prints one table (bytes per step, each TGA pass / plain, step-time ratios); `--out` writes it as JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"tiny": {"num_layers": 4, "hidden_size": 64}, "wide": {"num_layers": 8, "hidden_size": 256}}
NO_REUSE = {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
STEPS = (6, 12)
METHODS = {"plain": ["--tga", "false"], "separate": ["--tga", "true", "--tga_caption_pass", "separate"],
           "shared": ["--tga", "true", "--tga_caption_pass", "shared"]}


def deepspeed_config(folder: str, regime: str) -> str:
    with open(os.path.join(REPO, "deepspeed_configs", "zero3_fp32.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    if regime == "no-reuse":
        config["zero_optimization"].update(NO_REUSE)
    config["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}
    path = os.path.join(folder, f"zero3_{regime}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=1)
    return path


def make_assets(folder: str, model: str) -> dict[str, str]:
    from tga.tiny import save_tiny_llm, save_tiny_vision, write_tiny_dataset

    paths = {"llm": save_tiny_llm(os.path.join(folder, "llm"), seed=0, **MODELS[model]),
             "vision": save_tiny_vision(os.path.join(folder, "vision"), seed=0)}
    paths.update(write_tiny_dataset(os.path.join(folder, "data"), seed=0, num_images=96))
    return paths


def run_stage(assets: dict, ds_config: str, flags: list[str], steps: int, out_dir: str) -> dict:
    """One stage-2 run of `steps` optimizer steps under the DeepSpeed launcher; rank 0's gather bytes and runtime."""
    from tga.train.distributed import free_port

    result_file = os.path.join(out_dir, "gathers.json")
    command = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
        str(free_port()), os.path.abspath(__file__), "--worker", result_file,
        os.path.join(REPO, "configs", "finetune", "tiny_cpu_tga.yaml"),
        "--model_name_or_path", assets["llm"], "--vision_tower", assets["vision"], "--pretrain_mm_mlp_adapter", "",
        "--data_path", assets["stage2"], "--image_folder", assets["image_folder"], "--output_dir", out_dir,
        "--deepspeed", ds_config, "--max_steps", str(steps), "--num_train_epochs", "100", *flags,
        "--logging_steps", "1", "--group_by_modality_length", "false",
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    if completed.returncode != 0:
        sys.exit(f"run failed ({' '.join(command)}):\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    with open(result_file, encoding="utf-8") as handle:
        return json.load(handle)


def worker(result_file: str, argv: list[str]) -> None:
    """Inside the launcher: train, then rank 0 writes its all-gather bytes and the Trainer's runtime."""
    import deepspeed.comm as dist

    from tga.ranks import is_main_process
    from tga.train.run import run_stage as train

    output_dir = train("finetune", argv)
    if not is_main_process():
        return
    gathered = sum(size * record[0] for name, sizes in dist.comms_logger.comms_dict.items() if "all_gather" in name
                   for size, record in sizes.items())
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        seconds = [entry["throughput/seconds_per_step"] for entry in json.load(handle)["log_history"]
                   if entry.get("step", 0) > 2 and "throughput/seconds_per_step" in entry]
    with open(result_file, "w", encoding="utf-8") as handle:
        json.dump({"all_gather_bytes": gathered, "seconds_per_step": statistics.median(seconds) if seconds else None},
                  handle)


def measure(model: str, regime: str, folder: str) -> dict:
    assets = make_assets(os.path.join(folder, model), model)
    ds_config = deepspeed_config(folder, regime)
    row = {"model": model, "regime": regime}
    for method, flags in METHODS.items():
        runs = {steps: run_stage(assets, ds_config, flags, steps, os.path.join(folder, f"{model}-{regime}-{method}-{steps}"))
                for steps in STEPS}
        span = STEPS[1] - STEPS[0]
        row[f"{method}_mb_per_step"] = (runs[STEPS[1]]["all_gather_bytes"] - runs[STEPS[0]]["all_gather_bytes"]) / span / 1e6
        row[f"{method}_s_per_step"] = runs[STEPS[1]]["seconds_per_step"]
    for method in ("separate", "shared"):
        row[f"{method}_bytes_ratio"] = row[f"{method}_mb_per_step"] / row["plain_mb_per_step"]
        row[f"{method}_time_ratio"] = row[f"{method}_s_per_step"] / row["plain_s_per_step"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "wide"],
                        help="LLM shapes: tiny = the tiny recipe's (4 blocks, width 64), wide = 8 blocks, width 256")
    parser.add_argument("--regimes", nargs="+", choices=["no-reuse", "shipped"], default=["no-reuse", "shipped"],
                        help="ZeRO-3 parameter-reuse settings (see the module docstring)")
    parser.add_argument("--out", help="also write the table as JSON to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, rest)  # the training flags, and the launcher's --local_rank
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tga-zero3-gathers-") as folder:
        for model in args.models:
            for regime in args.regimes:
                rows.append(measure(model, regime, folder))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| model | ZeRO-3 regime | plain MB/step | separate MB/step | shared MB/step | separate/plain bytes | "
          "shared/plain bytes | plain s/step | separate/plain time | shared/plain time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['regime']} | {row['plain_mb_per_step']:.2f} | {row['separate_mb_per_step']:.2f} | "
              f"{row['shared_mb_per_step']:.2f} | {row['separate_bytes_ratio']:.4f} | {row['shared_bytes_ratio']:.4f} | "
              f"{row['plain_s_per_step']:.3f} | {row['separate_time_ratio']:.2f} | {row['shared_time_ratio']:.2f} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
