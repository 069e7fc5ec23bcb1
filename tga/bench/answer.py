"""tga/bench/answer.py

The one place where a benchmark request becomes a model answer. Every answer of `tga evaluate bench` goes through
`answer_requests(bundle, images, requests)`, so anything that changes how a model answers wraps this function and
nothing else: an inference-time defence (`tga.defense`, `--defense`) rides in the bundle, and its replies carry the
cost of every answer and a trace of what the defence did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class ModelBundle:
    """What answers a request: a `tga.inference.ChatModel` (or anything with its batched `generate`), the
    generation settings and the defence it answers through.

    Attributes:
        chat: the chat model.
        max_new_tokens: answer length limit.
        name: how reports name the model (its folder).
        defense: a defence from `tga.defense.dispatch.build_defense` over `chat`, a callable
            (images, requests) -> replies with `text`, `cost` and `trace`; None answers once with `chat.generate`.
    """

    chat: Any
    max_new_tokens: int = 128
    name: str = "model"
    defense: Any = None

    @property
    def defense_name(self) -> str:
        """How reports name the defence (`none` without one)."""
        return getattr(self.defense, "name", "none")


def answer_requests(bundle: ModelBundle, images: Sequence[Image.Image | None], requests: Sequence[str]) -> list[Any]:
    """Answer each (image, request) pair; batched greedy generation, through the bundle's defence when it has one.
    An image of None asks the text alone.

    Args:
        bundle: the model and its generation settings.
        images: one image (or None) per request.
        requests: the request texts.

    Returns:
        One answer per request, in order: a string, or with a defence its `tga.defense.base.Reply`.
    """
    if len(images) != len(requests):
        raise ValueError(f"{len(images)} images for {len(requests)} requests")
    if bundle.defense is not None:
        answers = bundle.defense(list(images), list(requests))
    else:
        answers = bundle.chat.generate(list(images), list(requests), max_new_tokens=bundle.max_new_tokens)
    if len(answers) != len(requests):
        raise RuntimeError(f"the model returned {len(answers)} answers for {len(requests)} requests")
    return list(answers)
