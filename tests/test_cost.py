"""Cost accounting: parameter and state-memory counting, and `cost.json` from a TGA training stage."""

from __future__ import annotations

import json
import os

import torch
import yaml

from tga.options import load_config
from tga.train.cost import parameter_counts, state_bytes
from tga.train.run import run_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parameter_counts_and_state_bytes_count_tied_and_shared_storage_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False), torch.nn.Linear(4, 3))
    model[1].weight = model[0].weight  # tied, like input and output embeddings
    model[2].requires_grad_(False)
    assert parameter_counts(model) == (40, 15)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model[1](model[0](torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    parts = state_bytes(model, optimizer, reference=model[2])
    assert parts["parameters"] == (40 + 15) * 4 and parts["gradients"] == 40 * 4
    assert parts["optimizer"] == 2 * 40 * 4 + 4  # exp_avg, exp_avg_sq and the step counter
    assert parts["reference"] == 0  # already counted as the model's own parameters
    assert parts["total"] == sum(value for key, value in parts.items() if key != "total")


def test_a_tga_stage_writes_cost_json(tiny_assets, tmp_path):
    out = tmp_path / "stage2"
    recipe = load_config(os.path.join(REPO, "configs/finetune/tiny_cpu_tga.yaml"))
    for key in ("deepspeed", "pretrain_mm_mlp_adapter"):  # one process, fresh projector
        recipe.pop(key, None)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    run_stage("finetune", [
        str(config), "--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
        "--data_path", tiny_assets["stage2"], "--image_folder", tiny_assets["image_folder"], "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--tga_layers", "1-3",
    ])
    with open(out / "cost.json", encoding="utf-8") as handle:
        cost = json.load(handle)
    assert cost["method"] == "tga-finetune" and cost["steps"] == 2 and cost["samples"] == 4
    trainable, frozen = cost["parameters"]["trainable"], cost["parameters"]["frozen"]
    assert trainable > 0 and frozen > 0 and cost["tokens"]["train"] > 0
    assert cost["flops_estimate"]["total"] == 6 * trainable * cost["tokens"]["train"] + 2 * frozen * cost["tokens"][
        "train"]
    assert cost["memory"]["state_bytes_rank0"]["optimizer"] > 0 and cost["wall_time_s"] > 0
