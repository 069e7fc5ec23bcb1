"""What a training command prints besides its progress and numbers: conditions that are expected on the machine it
runs on stay quiet (see also tests/test_model.py for the one-line load reports)."""

from __future__ import annotations

import pytest
import torch

from tga.config import flag_value
from tga.train.distributed import prepare_process


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinned memory is kept where an accelerator uses it")
def test_without_an_accelerator_data_loaders_do_not_pin_memory_unless_asked():
    """torch warns on every data loader that pins memory with no accelerator to copy to."""
    assert flag_value(prepare_process(["--output_dir", "out"]), "dataloader_pin_memory") == "false"
    assert prepare_process(["--output_dir", "out", "--dataloader_pin_memory", "true"]) == [
        "--output_dir", "out", "--dataloader_pin_memory", "true"]
