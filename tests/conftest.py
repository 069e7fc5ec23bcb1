"""Shared test fixtures: offline environment, the real Mistral-7B tokenizer, tiny model configs."""

from __future__ import annotations

import os
import shutil
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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
