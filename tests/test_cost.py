"""Cost accounting: parameter and state-memory counting, and `cost.json` of a TGA stage against the baseline on the
same data (the caption pass's tokens and FLOPs, a frozen target's memory)."""

from __future__ import annotations

import json
import os

import torch
import yaml

from tga.data.dataset import SampleBuilder
from tga.data.records import load_records
from tga.data.templates import get_template
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm
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


def run_tiny_stage(tiny_assets, tmp_path, name, data, *flags):
    out = tmp_path / name
    recipe = load_config(os.path.join(REPO, "configs/finetune/tiny_cpu_tga.yaml"))
    for key in ("deepspeed", "pretrain_mm_mlp_adapter"):  # one process, fresh projector
        recipe.pop(key, None)
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(recipe))
    run_stage("finetune", [
        str(config), "--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
        "--data_path", str(data), "--image_folder", tiny_assets["image_folder"], "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--tga_layers", "1-2", *flags,
    ])
    with open(out / "cost.json", encoding="utf-8") as handle:
        return json.load(handle)


def test_tga_cost_counts_the_caption_pass_and_the_frozen_target(tiny_assets, tmp_path):
    records = load_records(tiny_assets["stage2"])[:6]  # one epoch of 3 steps sees every record once
    with open(tiny_assets["stage2"], encoding="utf-8") as handle:
        data = tmp_path / "data.json"
        data.write_text(json.dumps(json.load(handle)[:6]))
    baseline = run_tiny_stage(tiny_assets, tmp_path, "plain", data, "--tga", "false")
    tga = run_tiny_stage(tiny_assets, tmp_path, "tga", data, "--tga", "true", "--tga_target", "frozen")

    # What the caption pass costs, from the data and the model, not from cost.py: the caption tokens of the records
    # that enter the guide, through the LLM's embeddings and its first two layers (deepest target layer 2).
    tokenizer = load_tokenizer(tiny_assets["llm"])
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    builder = SampleBuilder(tokenizer=tokenizer, template=get_template("llava_llama_2"),
                            image_processor=load_image_processor(tiny_assets["vision"]),
                            image_folder=tiny_assets["image_folder"], image_token_id=image_token_id(tokenizer),
                            num_image_tokens=model.config.image_seq_length, max_length=512, use_retrieved=True,
                            caption_target=True)
    samples = [builder.build(r) for r in records]
    caption_tokens = sum(s["caption_input_ids"].numel() for s in samples if s.get("guide"))
    llm = model.model.language_model
    caption_params = sum(p.numel() for m in (llm.embed_tokens, *llm.layers[:2]) for p in m.parameters())
    assert caption_tokens > 0 and tga["tokens"]["reference"] == caption_tokens
    assert baseline["tokens"]["reference"] == 0 and tga["tokens"]["train"] == baseline["tokens"]["train"]
    extra = tga["flops_estimate"]["total"] - baseline["flops_estimate"]["total"]
    assert extra == 2 * caption_params * caption_tokens
    # The frozen target is a float32 copy of the whole decoder stack, held beside the trained model.
    llm_bytes = 4 * sum(p.numel() for p in llm.parameters())
    assert tga["memory"]["state_bytes_rank0"]["reference"] == llm_bytes
    assert baseline["memory"]["state_bytes_rank0"]["reference"] == 0
    assert tga["memory"]["state_bytes_rank0"]["total"] - baseline["memory"]["state_bytes_rank0"]["total"] >= llm_bytes
    assert tga["steps"] == 3 and tga["samples"] == 6
