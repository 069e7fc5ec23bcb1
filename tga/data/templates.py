"""tga/data/templates.py

Conversation templates (`plain`, `llava_llama_2`, `mistral_instruct`, `vicuna_v1`, `chatml`) as one small class each.

A template renders a conversation into a list of `Segment`s: pieces of text tagged with a role. The prompt text
is the concatenation of the segments, and the tokenizer (see `tga.data.tokenize`) maps every token back to the
segment its characters come from, so label masks and the image / retrieved-text / caption spans are exact for the
very token sequence the model sees at inference time, for any tokenizer. No template ever counts tokens itself.

Roles:
    frame      template scaffolding ("[INST] ", " [/INST]", separators): never a training target
    system     the system prompt
    user       user text
    image      the "<image>" placeholder (expanded to one image token per patch after tokenization)
    retrieved  retrieved related text R (TGA), placed in the first user turn as "Retrieved Text: {R}. "
    caption    the caption C, when a template renders the caption-only text pass (TGA target)
    assistant  an answer: the only role whose tokens carry labels
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from tga.errors import ConfigError

IMAGE_PLACEHOLDER = "<image>"
TARGET_ROLES = frozenset({"assistant"})


@dataclass(frozen=True)
class Segment:
    text: str
    role: str


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str


def split_image_placeholder(content: str, retrieved: str | None = None) -> list[Segment]:
    """First-user-turn content: optional retrieved text, then the image, then the question (LLaVA puts the image first).

    Like LLaVA, `<image>` is moved to the front of the turn and followed by a newline, wherever the record had it.
    """
    question = content.replace(IMAGE_PLACEHOLDER, "").strip()
    segments = []
    if retrieved:
        segments += [Segment("Retrieved Text: ", "frame"), Segment(retrieved, "retrieved"), Segment(". ", "frame")]
    segments.append(Segment(IMAGE_PLACEHOLDER, "image"))
    if question:
        segments.append(Segment("\n" + question, "user"))
    return segments


def user_segments(content: str, *, has_image: bool, retrieved: str | None, as_caption: bool) -> list[Segment]:
    if as_caption:
        return [Segment(content, "caption")]
    if has_image:
        return split_image_placeholder(content, retrieved)
    if retrieved:
        return [Segment("Retrieved Text: ", "frame"), Segment(retrieved, "retrieved"), Segment(". ", "frame"),
                Segment(content, "user")]
    return [Segment(content, "user")]


class PromptTemplate(ABC):
    """Renders messages into role-tagged segments. Subclasses define the chat format only."""

    name: str = ""
    default_system: str = ""

    def render(
        self,
        messages: list[Message],
        *,
        has_image: bool = False,
        retrieved: str | None = None,
        system: str | None = None,
        add_generation_prompt: bool = False,
        as_caption: bool = False,
    ) -> list[Segment]:
        """Render a conversation that alternates user/assistant turns, starting with the user.

        Args:
            messages: the turns; the first user turn holds the image placeholder when `has_image`.
            has_image: whether the first user turn carries the image.
            retrieved: retrieved text R to place in the first user turn (TGA), or None.
            system: system prompt; None means the template's default.
            add_generation_prompt: end with the assistant prefix so that generation continues with the answer.
            as_caption: render the (single) user turn's content with role `caption` (TGA's caption-only pass).
        """
        for index, message in enumerate(messages):
            expected = "user" if index % 2 == 0 else "assistant"
            if message.role != expected:
                raise ConfigError(f"turn {index} of a conversation must be from the {expected}, got {message.role!r}")
        system = self.default_system if system is None else system
        segments: list[Segment] = []
        for index in range(0, len(messages), 2):
            first = index == 0
            content = user_segments(
                messages[index].content, has_image=has_image and first, retrieved=retrieved if first else None,
                as_caption=as_caption,
            )
            answer = messages[index + 1].content if index + 1 < len(messages) else None
            segments += self.turn(content, answer, system=system if first else "", first=first)
        if add_generation_prompt and len(messages) % 2 == 1:
            return segments
        if add_generation_prompt:
            raise ConfigError("add_generation_prompt needs a conversation that ends with a user turn")
        return segments

    @abstractmethod
    def turn(self, user: list[Segment], answer: str | None, *, system: str, first: bool) -> list[Segment]:
        """One user turn (and its answer, when given) in this chat format; `answer=None` ends at the assistant prefix."""


class PlainTemplate(PromptTemplate):
    """Stage-1 captioning format: `<image>` followed by the caption and a newline; loss on the caption only."""

    name = "plain"

    def turn(self, user, answer, *, system, first):
        # As in LLaVA's pretraining, the question of an image record is dropped: the image (plus retrieved text) stays.
        has_image = any(s.role == "image" for s in user)
        kept = [s for s in user if s.role != "user"] if has_image else user
        return kept + ([Segment(answer.strip() + "\n", "assistant")] if answer is not None else [])


class LlavaLlama2Template(PromptTemplate):
    """LLaVA's `llava_llama_2` format (the TGA paper's stage-2 template)."""

    name = "llava_llama_2"
    default_system = (
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language."
    )

    def turn(self, user, answer, *, system, first):
        head = [Segment("" if first else "<s>", "frame"), Segment("[INST] ", "frame")]
        if first and system:
            head += [Segment("<<SYS>>\n", "frame"), Segment(system, "system"), Segment("\n<</SYS>>\n\n", "frame")]
        out = head + user + [Segment(" [/INST]", "frame")]
        if answer is not None:
            out.append(Segment(" " + answer.strip() + " </s>", "assistant"))
        return out


class MistralInstructTemplate(PromptTemplate):
    """Mistral-7B-Instruct's `[INST] ... [/INST]` format; a system prompt, if any, opens the first user turn."""

    name = "mistral_instruct"

    def turn(self, user, answer, *, system, first):
        head = [Segment("[INST] ", "frame")]
        if first and system:
            head += [Segment(system, "system"), Segment("\n\n", "frame")]
        out = head + user + [Segment(" [/INST]", "frame")]
        if answer is not None:
            out.append(Segment(" " + answer.strip() + "</s>", "assistant"))
        return out


class VicunaV1Template(PromptTemplate):
    """LLaVA-1.5's `v1` (Vicuna) format."""

    name = "vicuna_v1"
    default_system = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions."
    )

    def turn(self, user, answer, *, system, first):
        head = [Segment(system, "system"), Segment(" ", "frame")] if first and system else []
        out = head + [Segment("USER: ", "frame")] + user + [Segment(" ASSISTANT:", "frame")]
        if answer is not None:
            out.append(Segment(" " + answer.strip() + "</s>", "assistant"))
        return out


class ChatMLTemplate(PromptTemplate):
    """ChatML (`<|im_start|>role ... <|im_end|>`), for Qwen-style LLMs."""

    name = "chatml"
    default_system = "You are a helpful assistant."

    def turn(self, user, answer, *, system, first):
        head = []
        if first and system:
            head = [Segment("<|im_start|>system\n", "frame"), Segment(system, "system"), Segment("<|im_end|>\n", "frame")]
        out = head + [Segment("<|im_start|>user\n", "frame")] + user
        out.append(Segment("<|im_end|>\n<|im_start|>assistant\n", "frame"))
        if answer is not None:
            out += [Segment(answer.strip() + "<|im_end|>", "assistant"), Segment("\n", "frame")]
        return out


TEMPLATES: dict[str, type[PromptTemplate]] = {
    cls.name: cls
    for cls in (PlainTemplate, LlavaLlama2Template, MistralInstructTemplate, VicunaV1Template, ChatMLTemplate)
}
# LLaVA's `--version` names for the same formats.
ALIASES = {"v1": "vicuna_v1", "llava_v1": "vicuna_v1", "mistral": "mistral_instruct", "llama_2": "llava_llama_2"}


def get_template(name: str) -> PromptTemplate:
    """The template registered under `name` (or a LLaVA `--version` alias)."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ConfigError(f"--version/template `{name}` is not supported; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[key]()
