"""tga/model/loading.py

Loading pretrained HF parts with a short report instead of transformers' console output. transformers prints a load
report table for any checkpoint that does not match the model class exactly, a notice per resized embedding matrix
and a progress bar per load; in a demo phase that is dozens of lines around one training bar. Here transformers' own
log is held at errors (and its progress bars off) for the load only, through its logging controls, and the load's
outcome is reported in one line: expected, explained conditions (the text tower of a full CLIP checkpoint, the rows
added for `<image>` and the pad token) at info level, anything else (a weight the checkpoint lacks, an unexpected
one) as a warning, and a weight of another shape as an error naming the flag.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

from transformers.utils import logging as hf_logging

from tga.errors import ConfigError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """No transformers or datasets progress bar inside the block (a load or a cache write is not the phase's
    progress); each library's setting is restored after it."""
    import datasets

    transformers_bars, datasets_bars = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_bars:
            hf_logging.enable_progress_bar()
        if datasets_bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers logs errors only and shows no progress bar inside the block; both are restored after it."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_progress_bars():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def report_load(what: str, flag: str, path: str, info: dict, unused: re.Pattern | None = None,
                unused_reason: str = "") -> None:
    """Report the `output_loading_info` of a `from_pretrained` call in a line or two.

    Args:
        what: the part, for the messages ("vision tower").
        flag: the option that named the checkpoint (`--vision_tower`), for the error.
        path: the checkpoint.
        info: what `from_pretrained(..., output_loading_info=True)` returned beside the model.
        unused: checkpoint keys the part is known not to use (one info line when present).
        unused_reason: what those keys are, for that line.

    Raises:
        ConfigError: a checkpoint weight has another shape than the model's (the checkpoint does not fit the part).
    """
    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched:
        shapes = ", ".join(f"{key} {tuple(ours)} in the checkpoint, {tuple(theirs)} in the model"
                           for key, ours, theirs in mismatched[:4])
        raise ConfigError(f"{flag} `{path}`: {len(mismatched)} weights of another shape than the {what}'s: {shapes}")
    unexpected = sorted(info.get("unexpected_keys", ()))
    expected_unused = [key for key in unexpected if unused is not None and unused.match(key)]
    if expected_unused:
        logger.info("%s: loaded from %s; %s (%d tensors) not used", what, path, unused_reason, len(expected_unused))
    problems = {"missing from the checkpoint (randomly initialised)": sorted(info.get("missing_keys", ())),
                "in the checkpoint but not in the model": [key for key in unexpected if key not in expected_unused]}
    for problem, keys in problems.items():
        if keys:
            logger.warning("%s %s: %d weights %s: %s", what, path, len(keys), problem, _listed(keys))


def load_pretrained(model_class, path: str, *, what: str, flag: str, unused: re.Pattern | None = None,
                    unused_reason: str = "", **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` with transformers quiet and the outcome in `report_load`."""
    with quiet_transformers():  # a shape mismatch comes back in `info` (and fails in `report_load`)
        model, info = model_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    report_load(what, flag, path, info, unused, unused_reason)
    return model


def _rows(llm) -> int:
    weight = llm.get_input_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partitioned weight keeps its shape in ds_shape


def resize_embeddings(llm, num_tokens: int, pad_to_multiple_of: int) -> None:
    """Resize the LM's input and output embeddings to the tokenizer, in one info line instead of transformers' two
    notices (the added rows are drawn from the old embeddings' mean and covariance, transformers' default)."""
    before = _rows(llm)
    with quiet_transformers():
        llm.resize_token_embeddings(num_tokens, pad_to_multiple_of=pad_to_multiple_of)
    after = _rows(llm)
    if after != before:
        logger.info("LLM embeddings resized from %d to %d rows for the tokenizer's %d tokens (<image>, pad; "
                    "new rows drawn from the old rows' mean and covariance)", before, after, num_tokens)
