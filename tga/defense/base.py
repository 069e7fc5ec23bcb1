"""tga/defense/base.py

What every inference-time defence shares. A defence asks a *backend*, a function answering a batch of (image, request)
pairs with the tokens each answer cost, as many times as its method needs, and returns one `Reply` per request: the
final answer, its `Cost` (generations, prompt and generated tokens, and the prompt tokens the undefended request would
have cost) and a trace of the intermediate passes. `ChatBackend` asks a `tga.inference.ChatModel`; `AnswerBackend`
asks any `answer(request, image) -> text` function (token counts then unknown), so a defence can wrap another
front-end's answer function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from tga.safety.cost import total

if TYPE_CHECKING:
    from tga.inference import Usage

Images = Sequence[Image.Image | None]


@dataclass(frozen=True)
class Cost:
    """What one request cost: generate calls, prompt tokens (image tokens included) and generated tokens over all of
    them, and the prompt tokens of the request without a defence (None where the backend cannot count tokens)."""

    generations: int
    prompt_tokens: int | None
    new_tokens: int | None
    plain_prompt_tokens: int | None

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


@dataclass(frozen=True)
class Reply:
    """A defended answer: the text the user gets, its cost, and what the defence did (the intermediate passes)."""

    text: str
    cost: Cost
    trace: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """Answers batches of (image or None, request) greedily, with the tokens each answer cost."""

    def generate(self, images: Images, requests: Sequence[str]) -> list[Usage]: ...

    def prompt_tokens(self, images: Images, requests: Sequence[str]) -> list[int | None]: ...


class ChatBackend:
    """A `tga.inference.ChatModel` as a backend (`max_new_tokens` per answer)."""

    def __init__(self, chat: Any, *, max_new_tokens: int = 128) -> None:
        self.chat, self.max_new_tokens = chat, max_new_tokens

    def generate(self, images: Images, requests: Sequence[str]) -> list[Usage]:
        if not requests:
            return []
        return self.chat.generate_usage(list(images), list(requests), max_new_tokens=self.max_new_tokens)

    def prompt_tokens(self, images: Images, requests: Sequence[str]) -> list[int | None]:
        return list(self.chat.prompt_tokens(list(images), list(requests)))


class AnswerBackend:
    """Any `answer(request, image) -> text` function as a backend, one call per request; tokens are not counted."""

    def __init__(self, answer: Callable[[str, Image.Image | None], str]) -> None:
        self.answer = answer

    def generate(self, images: Images, requests: Sequence[str]) -> list[Usage]:
        from tga.inference import Usage

        return [Usage(self.answer(request, image), None, None) for image, request in zip(images, requests)]

    def prompt_tokens(self, images: Images, requests: Sequence[str]) -> list[int | None]:
        return [None] * len(requests)


def cost_of(usages: Sequence[Usage], plain_prompt_tokens: int | None) -> Cost:
    """The cost of one request answered through the given passes."""
    return Cost(len(usages), total([u.prompt_tokens for u in usages]), total([u.new_tokens for u in usages]),
                plain_prompt_tokens)
