"""tga/unlearn/dataset.py

The unlearning dataset and collator. Item i holds three samples, each rendered by the model's conversation template
and tokenized with labels on the response only (`tga.data.dataset.SampleBuilder`):
    forget    harmful prompt i + its harmful response (with its image in multimodal unlearning)
    mismatch  the same prompt (and image) + a random benign response, or a random refusal with `--refusal`
    keep      a normal-data pair (for the KL to the frozen reference)
The random choices depend on (seed, i) only, so a resumed or repeated run sees the same data. The collator pads each
group with the project's collator and prefixes its keys (`forget_`, `mismatch_`, `keep_`).
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from tga.data.collator import VLMCollator
from tga.data.dataset import SampleBuilder
from tga.data.records import Record
from tga.data.templates import IMAGE_PLACEHOLDER, Message
from tga.errors import DataError
from tga.unlearn.data import Pair

GROUPS = ("forget", "mismatch", "keep")
MODEL_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values")


def pair_record(pair: Pair, response: str | None = None) -> Record:
    """A one-turn record for the sample builder (the image, if any, goes first in the user turn)."""
    prompt = f"{IMAGE_PLACEHOLDER}\n{pair.prompt}" if pair.image else pair.prompt
    answer = pair.response if response is None else response
    return Record(pair.id, (Message("user", prompt), Message("assistant", answer)), image=pair.image)


class UnlearnDataset(Dataset):
    """One item per harmful pair: its forget, mismatch and keep samples.

    Args:
        harmful: harmful pairs (all with images, or none: every rank must run the same modules under ZeRO-3).
        normal: normal-data pairs (text); their responses are the random benign responses unless `refusals` is set.
        builder: renders and tokenizes records (the model's template, image processing).
        refusals: refusal responses for the mismatch term (`--refusal`).
        seed: seed of the random mismatch responses and keep pairs.
    """

    def __init__(self, harmful: list[Pair], normal: list[Pair], builder: SampleBuilder, *,
                 refusals: list[str] | None = None, seed: int = 0):
        with_image = {pair.image is not None for pair in harmful}
        if len(with_image) > 1:
            raise DataError("--harmful mixes records with and without images; use one kind per run")
        if any(pair.image for pair in normal):
            raise DataError("--normal records must be text-only")
        self.harmful, self.normal, self.builder, self.seed = harmful, normal, builder, seed
        self.random_responses = list(refusals) if refusals else [pair.response for pair in normal]
        self.multimodal = with_image == {True}

    def __len__(self) -> int:
        return len(self.harmful)

    def __getitem__(self, index: int) -> dict[str, dict]:
        rng = random.Random(self.seed * 1_000_003 + index)
        pair = self.harmful[index]
        return {
            "forget": self.builder.build(pair_record(pair)),
            "mismatch": self.builder.build(pair_record(pair, rng.choice(self.random_responses))),
            "keep": self.builder.build(pair_record(self.normal[rng.randrange(len(self.normal))])),
        }


class UnlearnCollator:
    """Pads each group separately; returns flat keys `<group>_<key>` (the Trainer moves them to the device)."""

    def __init__(self, pad_token_id: int):
        self.collate = VLMCollator(pad_token_id)

    def __call__(self, items: list[dict[str, dict]]) -> dict[str, torch.Tensor]:
        batch = {}
        for group in GROUPS:
            padded = self.collate([item[group] for item in items])
            batch.update({f"{group}_{key}": value for key, value in padded.items() if key in MODEL_KEYS})
        return batch


def group_inputs(batch: dict[str, torch.Tensor], group: str) -> dict[str, torch.Tensor]:
    """The model inputs of one group (`forget`, `mismatch` or `keep`) of a collated batch."""
    prefix = f"{group}_"
    return {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}
