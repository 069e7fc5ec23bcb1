"""tga/bench/answer.py

The one place where a benchmark request becomes a model answer. Every answer of `tga evaluate bench` goes through
`answer_requests(bundle, images, requests)`, so anything that changes how a model answers (a defence that rewrites
the request, screens the image or checks the answer) wraps this function and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class ModelBundle:
    """What answers a request: a `tga.inference.ChatModel` (or anything with its batched `generate`) and the
    generation settings.

    Attributes:
        chat: the chat model.
        max_new_tokens: answer length limit.
        name: how reports name the model (its folder).
    """

    chat: Any
    max_new_tokens: int = 128
    name: str = "model"


def answer_requests(bundle: ModelBundle, images: Sequence[Image.Image | None], requests: Sequence[str]) -> list[str]:
    """Answer each (image, request) pair; batched greedy generation. An image of None asks the text alone.

    Args:
        bundle: the model and its generation settings.
        images: one image (or None) per request.
        requests: the request texts.

    Returns:
        One answer per request, in order.
    """
    if len(images) != len(requests):
        raise ValueError(f"{len(images)} images for {len(requests)} requests")
    answers = bundle.chat.generate(list(images), list(requests), max_new_tokens=bundle.max_new_tokens)
    if len(answers) != len(requests):
        raise RuntimeError(f"the model returned {len(answers)} answers for {len(requests)} requests")
    return list(answers)
