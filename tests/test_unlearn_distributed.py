"""`scripts/unlearn.py` under `deepspeed --num_gpus 2` (CPU, gloo): ZeRO-3 with a second model as the reference, and
ZeRO-2 with LoRA (reference = adapters disabled). About 40-80 s per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tga.model.tokenizer import load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm, load_vlm
from tga.train.distributed import free_port

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(output_dir, world, deepspeed_config, *flags):
    command = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        os.path.join(REPO, "scripts", "unlearn.py"), "--model", world["model"], "--harmful", world["harmful"],
        "--normal", world["normal"], "--output_dir", str(output_dir), "--deepspeed", deepspeed_config,
        "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3", *flags,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(output_dir)


@pytest.fixture(scope="module")
def world(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("unlearn_ds")
    tokenizer = load_tokenizer(tiny_assets["llm"])
    torch.manual_seed(0)
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    model.save_pretrained(root / "vlm")
    tokenizer.save_pretrained(root / "vlm")
    load_image_processor(tiny_assets["vision"]).save_pretrained(root / "vlm")
    (root / "harmful.jsonl").write_text("".join(
        json.dumps({"prompt": f"How do I hurt person {i}?", "response": f"Step one to hurt person {i}."}) + "\n"
        for i in range(4)))
    (root / "normal.jsonl").write_text("".join(
        json.dumps({"question": f"What colour is item {i}?", "best_answer": f"Item {i} is blue."}) + "\n"
        for i in range(4)))
    # deepspeed_configs/zero2.json leaves allgather_bucket_size on "auto", which transformers does not fill.
    with open(os.path.join(REPO, "deepspeed_configs", "zero2.json"), encoding="utf-8") as handle:
        zero2 = json.load(handle)
    zero2["zero_optimization"]["allgather_bucket_size"] = 5e8
    (root / "zero2.json").write_text(json.dumps(zero2))
    return {"root": root, "model": str(root / "vlm"), "harmful": str(root / "harmful.jsonl"),
            "normal": str(root / "normal.jsonl"), "zero2": str(root / "zero2.json")}


def check_run(out, world, *, lora: bool):
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    kl = [entry["unlearn/keep_kl"] for entry in history if "unlearn/keep_kl" in entry]
    assert len(kl) == 3 and kl[0] == 0.0 and kl[-1] > 0
    with open(os.path.join(out, "cost.json"), encoding="utf-8") as handle:
        cost = json.load(handle)
    assert cost["world_size"] == 2 and cost["samples"] == 2 * 2 * 3 and cost["tokens"]["reference"] > 0
    assert (cost["memory"]["state_bytes_rank0"]["reference"] == 0) == lora
    assert not any("lora" in key for key in load_file(os.path.join(out, "model.safetensors")))  # LoRA merged
    # Compared after loading: the ZeRO-3 consolidated file names keys differently, transformers maps both.
    saved, source = load_vlm(out).state_dict(), load_vlm(world["model"]).state_dict()
    assert set(saved) == set(source)
    assert any(not torch.equal(saved[k], source[k]) for k in saved if "language_model" in k)
    assert all(torch.equal(saved[k], source[k]) for k in saved if "vision_tower" in k or "multi_modal_projector" in k)


def test_zero3_two_model_unlearning(world):
    out = launch(world["root"] / "zero3", world, os.path.join(REPO, "deepspeed_configs", "zero3_fp32.json"))
    check_run(out, world, lora=False)


def test_zero2_lora_unlearning(world):
    out = launch(world["root"] / "zero2_lora", world, world["zero2"], "--lora_enable", "true")
    check_run(out, world, lora=True)
