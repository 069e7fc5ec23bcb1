"""Experiment tracking: an offline W&B run of a tiny TGA stage holds the per-layer cosines, tokens seen, the resolved
tga configuration and the git revision."""

import glob
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wandb_offline_run_records_tga_metrics_and_config(tiny_assets, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    bin_dir = os.path.dirname(sys.executable)
    command = [os.path.join(bin_dir, "tga"), "finetune", os.path.join(REPO, "configs/finetune/tiny_cpu_tga.yaml"),
               "--deepspeed", "", "--report_to", "wandb", "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
               "--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
               "--data_path", tiny_assets["stage2"], "--image_folder", tiny_assets["image_folder"],
               "--pretrain_mm_mlp_adapter", ""]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = subprocess.run([os.path.join(bin_dir, "wandb"), "beta", "leet", "inspect", run_file],
                             capture_output=True, text=True, timeout=120, env=env).stdout
    for key in ("tga/cos_ic/L1", "tga/cos_ic/L3", "tga/specificity/L2", "tga/guide_loss", "num_input_tokens_seen",
                "git_revision", "tga_weight"):
        assert key in records, key
