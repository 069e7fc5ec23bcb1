"""tga/data/tokenize.py

Turns role-tagged segments (from a template) into model inputs: token ids, labels and per-token roles.

The whole prompt string is tokenized at once, exactly as at inference time, and every token is assigned to the
segment that contains its first non-space character (character offsets from the fast tokenizer). Labels keep the
tokens of `assistant` segments and are IGNORE_INDEX elsewhere; the HF model shifts labels itself (labels[i] is the
token at position i). Each `<image>` token is then expanded to `num_image_tokens` copies, one per image patch, so the
image positions are `input_ids == image_token_id` and never depend on hard-coded offsets.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from tga.data.templates import TARGET_ROLES, Segment

IGNORE_INDEX = -100
ROLES = ("frame", "system", "user", "image", "retrieved", "caption", "assistant")
ROLE_ID = {name: index for index, name in enumerate(ROLES)}


class EncodingError(ValueError):
    """A sample cannot be encoded (the dataset re-raises it as a DataError naming the record)."""


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, IGNORE_INDEX outside assistant tokens
    roles: torch.Tensor  # [T] uint8, index into ROLES
    truncated: bool = False

    def mask(self, role: str) -> torch.Tensor:
        return self.roles == ROLE_ID[role]


def token_roles(segments: list[Segment], offsets: list[tuple[int, int]], text: str) -> list[int]:
    """The role id of each token, from the segment holding its first non-space character."""
    starts, position = [], 0
    for segment in segments:
        starts.append(position)
        position += len(segment.text)
    roles = []
    for begin, end in offsets:
        if begin == end:  # tokens the tokenizer added itself (BOS)
            roles.append(ROLE_ID["frame"])
            continue
        piece = text[begin:end]
        stripped = piece.lstrip()
        anchor = begin + (len(piece) - len(stripped)) if stripped else begin
        roles.append(ROLE_ID[segments[bisect.bisect_right(starts, anchor) - 1].role])
    return roles


def encode_segments(
    segments: list[Segment],
    tokenizer: PreTrainedTokenizerBase,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int | None = None,
) -> Encoded:
    """Tokenize a rendered prompt, expand image placeholders and truncate (text only, never inside an image)."""
    text = "".join(segment.text for segment in segments)
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, roles = list(encoding["input_ids"]), token_roles(segments, encoding["offset_mapping"], text)
    n_image_segments = sum(segment.role == "image" for segment in segments)
    image_positions = [i for i, token in enumerate(ids) if token == image_token_id]
    if len(image_positions) != n_image_segments or any(roles[i] != ROLE_ID["image"] for i in image_positions):
        raise EncodingError(
            f"expected {n_image_segments} image placeholder token(s) (id {image_token_id}), found {len(image_positions)}"
            " (the text itself may contain '<image>', or the tokenizer lacks the <image> special token)"
        )
    expanded_ids, expanded_roles = [], []
    for token, role in zip(ids, roles):
        repeat = num_image_tokens if token == image_token_id else 1
        expanded_ids += [token] * repeat
        expanded_roles += [role] * repeat
    target = {ROLE_ID[name] for name in TARGET_ROLES}
    labels = [token if role in target else IGNORE_INDEX for token, role in zip(expanded_ids, expanded_roles)]
    truncated = False
    if max_length is not None and len(expanded_ids) > max_length:
        if ROLE_ID["image"] in expanded_roles[max_length:]:
            raise EncodingError(f"the image tokens do not fit in model_max_length={max_length}; raise it or shorten the text")
        expanded_ids, expanded_roles, labels = expanded_ids[:max_length], expanded_roles[:max_length], labels[:max_length]
        truncated = True
    return Encoded(
        input_ids=torch.tensor(expanded_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        roles=torch.tensor(expanded_roles, dtype=torch.uint8),
        truncated=truncated,
    )
