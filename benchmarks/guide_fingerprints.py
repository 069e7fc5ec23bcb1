"""benchmarks/guide_fingerprints.py

Fingerprints of short guided runs, to show that a change to the guide's code changes no number: each configuration
(every kept loss form, caption target and caption pass, and the centre) trains 3 steps of the tiny stage-2 recipe
(`tga data make-tiny`, configs/finetune/tiny_cpu_tga.yaml), in one process and, with `--ranks 2`, on 2 CPU ranks under
ZeRO-3; the fingerprint is the SHA-256 of the saved weights and every logged value of trainer_state.json.

    .venv/bin/python benchmarks/guide_fingerprints.py --out before.json [--ranks 1 2] [--only paper frozen]
    (change the code)
    .venv/bin/python benchmarks/guide_fingerprints.py --out after.json --compare before.json

`--compare` prints each configuration as equal or different (and which values differ) and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# name -> flags on top of configs/finetune/tiny_cpu_tga.yaml (live target, shared pass, paper form)
CONFIGURATIONS = {
    "paper": [],
    "released": ["--tga_form", "released", "--tga_schedule", "released"],
    "contrastive": ["--tga_form", "contrastive"],
    "separate": ["--tga_caption_pass", "separate"],
    "frozen": ["--tga_target", "frozen"],
    "frozen-bank": ["--tga_target", "frozen", "--tga_bank", "{run}/bank"],
    "center": ["--tga_center", "true"],
    "linear": ["--tga_schedule", "linear", "--tga_weight", "2.0"],
    "request": ["--tga_form", "request", "--tga_caption_context", "request"],
}
ZERO3_SKIP = {"frozen"}  # a frozen copy of a partitioned LLM is refused under ZeRO-3 (use the bank)


def run_once(name: str, flags: list[str], ranks: int, assets: str, work: str) -> dict:
    run = os.path.join(work, f"{name}-{ranks}")
    flags = [flag.replace("{run}", run) for flag in flags]
    common = [os.path.join(REPO, "configs/finetune/tiny_cpu_tga.yaml"), "--model_name_or_path", f"{assets}/llm",
              "--vision_tower", f"{assets}/vision", "--image_folder", f"{assets}/data/images",
              "--data_path", f"{assets}/data/stage2.json", "--pretrain_mm_mlp_adapter", "", "--output_dir", run,
              "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", *flags]
    script = os.path.join(REPO, "scripts", "finetune.py")
    if ranks == 1:
        command = [sys.executable, script, *common, "--deepspeed", ""]
    else:
        command = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(29700 + ranks),
                   script, *common, "--deepspeed", os.path.join(REPO, "deepspeed_configs/zero3_fp32.json")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        return {"error": (result.stdout + result.stderr)[-1500:]}
    with open(os.path.join(run, "model.safetensors"), "rb") as handle:
        weights = hashlib.sha256(handle.read()).hexdigest()
    with open(os.path.join(run, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    logged = [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k and "throughput" not in k}
              for entry in history]
    return {"weights_sha256": weights, "log_history": logged}


def compare(current: dict, before: dict) -> bool:
    same = True
    for key in sorted(set(current) | set(before)):
        a, b = current.get(key), before.get(key)
        if a == b:
            print(f"{key:20s} equal")
            continue
        same = False
        if a is None or b is None:
            print(f"{key:20s} only in {'before' if a is None else 'this run'}")
        elif a.get("weights_sha256") != b.get("weights_sha256"):
            print(f"{key:20s} DIFFERENT weights")
        else:
            print(f"{key:20s} DIFFERENT logged values")
    return same


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", required=True, help="JSON of the fingerprints")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1], choices=[1, 2], help="process counts to run")
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGURATIONS), help="a subset of the configurations")
    parser.add_argument("--compare", help="fingerprints JSON of an earlier run to compare with")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        assets = os.path.join(work, "assets")
        subprocess.run([os.path.join(BIN, "tga"), "data", "make-tiny", assets], check=True, capture_output=True)
        results = {}
        for ranks in args.ranks:
            for name in args.only or CONFIGURATIONS:
                if ranks > 1 and name in ZERO3_SKIP:
                    continue
                results[f"{name}/{ranks}"] = run_once(name, CONFIGURATIONS[name], ranks, assets, work)
                print(f"{name}/{ranks}: {results[f'{name}/{ranks}'].get('weights_sha256', 'error')}", flush=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    if args.compare:
        with open(args.compare, encoding="utf-8") as handle:
            return 0 if compare(results, json.load(handle)) else 1
    return 0 if all("error" not in value for value in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
