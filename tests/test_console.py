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


def test_progress_bars_of_loads_and_cache_writes_are_off_inside_the_block_only(capfd):
    import datasets
    from transformers.utils import logging as hf_logging

    from tga.model.loading import no_progress_bars

    with no_progress_bars():
        assert not hf_logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
        records = datasets.Dataset.from_dict({"id": list(range(50))}).map(lambda record: record)
    assert len(records) == 50 and "Map" not in "".join(capfd.readouterr())
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a setting made outside stays as it was
    try:
        with no_progress_bars():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
