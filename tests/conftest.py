"""Shared test fixtures: offline environment, the real Mistral-7B tokenizer, tiny model configs."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Record caches of the Arrow path go to a temporary folder, not the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="tga-tests-datasets-"))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (and counted as skipped) where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _launch_stage(script, config, output_dir, assets, *flags):
    """`deepspeed --num_gpus 2` on CPU (gloo) of scripts/<script> with the tiny assets, ZeRO-3 unless a later
    `--deepspeed` flag says otherwise; fails the test with the run's output tail."""
    from tga.train.distributed import free_port

    port = free_port()
    command = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
        os.path.join(REPO, "scripts", script), os.path.join(REPO, config),
        "--model_name_or_path", assets["llm"], "--vision_tower", assets["vision"], "--image_folder", assets["image_folder"],
        "--output_dir", output_dir, "--deepspeed", os.path.join(REPO, "deepspeed_configs/zero3_fp32.json"),
        "--logging_steps", "1", *flags,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the ranks' shared-memory all-reduce buffers are gone (tga.train.distributed.release_cpu_comm_buffer)
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    return output_dir


@pytest.fixture(scope="session")
def launch_stage():
    """A training stage on 2 CPU ranks under DeepSpeed: launch_stage(script, config, output_dir, assets, *flags)."""
    return _launch_stage


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory):
    """A folder holding the real Mistral-7B (v0.1/v0.2) sentencepiece model shipped by mistral-common."""
    import mistral_common

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    folder = tmp_path_factory.mktemp("mistral_tokenizer")
    shutil.copy(src, folder / "tokenizer.model")
    return str(folder)


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_tokenizer_dir):
    """The real Mistral-7B tokenizer prepared the way training prepares it (`<image>` and pad added)."""
    from tga.model.tokenizer import load_tokenizer

    return load_tokenizer(mistral_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tiny random LLM (real Mistral tokenizer), CLIP vision tower and generated LLaVA data (see tga/tiny.py)."""
    from tga.tiny import make_tiny_assets

    return make_tiny_assets(str(tmp_path_factory.mktemp("tiny_assets")), seed=0, num_images=24)
