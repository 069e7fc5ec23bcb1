"""tga/inference.py

`ChatModel`: a trained VLM folder with its tokenizer, image processor and conversation template, for generation and
hidden-state analysis. Prompts are built by the same template and tokenizer code as training (tga.data), so the model
sees at inference exactly the token layout it was trained on: one user turn, the image first, optional retrieved text
before it, and the assistant prefix at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from tga.data.dataset import SampleBuilder
from tga.data.templates import IMAGE_PLACEHOLDER, Message, get_template
from tga.data.tokenize import ROLE_ID, Encoded
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import folder_aspect_ratio, load_image_processor
from tga.model.vlm import load_vlm


@dataclass(frozen=True)
class Usage:
    """One generated answer and its cost in tokens."""

    text: str
    prompt_tokens: int | None  # prompt length, image tokens included (None: not counted)
    new_tokens: int | None  # generated tokens, the end-of-sequence token included


@dataclass
class HiddenStates:
    states: tuple[torch.Tensor, ...]  # (L+1) x [B, T, H]; index 0 = embeddings
    image_mask: torch.Tensor  # [B, T] bool
    text_mask: torch.Tensor  # [B, T] bool: the user text (question or caption)
    last_index: torch.Tensor  # [B] position of each prompt's last token


class ChatModel:
    def __init__(self, model, tokenizer, image_processor, template_name: str, image_aspect_ratio: str = "pad"):
        self.model, self.tokenizer, self.template_name = model.eval(), tokenizer, template_name
        self.builder = SampleBuilder(
            tokenizer=tokenizer, template=get_template(template_name), image_processor=image_processor,
            image_folder=None, image_token_id=image_token_id(tokenizer), num_image_tokens=model.config.image_seq_length,
            image_aspect_ratio=image_aspect_ratio,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def segments(self, question: str, *, with_image: bool, retrieved: str | None = None):
        content = f"{IMAGE_PLACEHOLDER}\n{question}" if with_image else question
        return self.builder.template.render([Message("user", content)], has_image=with_image, retrieved=retrieved,
                                            add_generation_prompt=True)

    def format_prompt(self, question: str, *, with_image: bool, retrieved: str | None = None) -> str:
        return "".join(s.text for s in self.segments(question, with_image=with_image, retrieved=retrieved))

    def encode(self, images, questions, retrieved=None) -> tuple[list[Encoded], torch.Tensor | None]:
        retrieved = retrieved or [None] * len(questions)
        encoded = [self.builder.encode(self.segments(q, with_image=i is not None, retrieved=r), record_id=f"prompt {n}")
                   for n, (i, q, r) in enumerate(zip(images, questions, retrieved))]
        pixels = [self.builder.process_image(image.convert("RGB")) for image in images if image is not None]
        return encoded, (torch.stack(pixels).to(self.device, self.model.dtype) if pixels else None)

    def padded(self, encoded: list[Encoded], *, left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(e.input_ids.numel() for e in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        roles = torch.full((len(encoded), width), ROLE_ID["frame"], dtype=torch.uint8)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            span = slice(width - e.input_ids.numel(), width) if left else slice(0, e.input_ids.numel())
            ids[row, span], roles[row, span], attention[row, span] = e.input_ids, e.roles, 1
        return ids.to(self.device), attention.to(self.device), roles

    @torch.no_grad()
    def generate(self, images: list[Image.Image | None], questions: list[str], *, max_new_tokens: int = 64,
                 retrieved: list[str | None] | None = None, streamer=None) -> list[str]:
        """Greedy answers, one per (image, question); batched with left padding."""
        return [usage.text for usage in self.generate_usage(images, questions, max_new_tokens=max_new_tokens,
                                                             retrieved=retrieved, streamer=streamer)]

    @torch.no_grad()
    def generate_usage(self, images: list[Image.Image | None], questions: list[str], *, max_new_tokens: int = 64,
                       retrieved: list[str | None] | None = None, streamer=None) -> list[Usage]:
        """`generate`, with the tokens each answer cost: its prompt (image tokens included) and the generated tokens up
        to and including the end-of-sequence token."""
        encoded, pixel_values = self.encode(images, questions, retrieved)
        ids, attention, _ = self.padded(encoded, left=True)
        # a text-only batch must not pass pixel_values=None: transformers 5 would still run the vision encoder on it
        vision = {} if pixel_values is None else {"pixel_values": pixel_values}
        output = self.model.generate(
            input_ids=ids, attention_mask=attention, **vision, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            streamer=streamer,
        )
        new = output[:, ids.shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        ended = new == self.tokenizer.eos_token_id
        # generated length: up to the first end-of-sequence token (what follows it is padding), else all of it
        lengths = [int(row.nonzero()[0, 0]) + 1 if bool(row.any()) else new.shape[1] for row in ended]
        return [Usage(text.strip(), e.input_ids.numel(), n) for text, e, n in zip(texts, encoded, lengths)]

    def prompt_tokens(self, images: list[Image.Image | None], questions: list[str]) -> list[int]:
        """The prompt length of each (image, question), image tokens included, without running the model."""
        return [self.builder.encode(self.segments(q, with_image=i is not None), record_id=f"prompt {n}").input_ids.numel()
                for n, (i, q) in enumerate(zip(images, questions))]

    @torch.no_grad()
    def hidden_states(self, images: list[Image.Image | None], texts: list[str]) -> HiddenStates:
        """Per-layer hidden states of one-turn prompts (right padded), with image / user-text masks."""
        encoded, pixel_values = self.encode(images, texts)
        ids, attention, roles = self.padded(encoded, left=False)
        states = self.model(input_ids=ids, attention_mask=attention, pixel_values=pixel_values,
                            output_hidden_states=True).hidden_states
        text_mask = (roles == ROLE_ID["user"]) | (roles == ROLE_ID["caption"])
        return HiddenStates(states=states, image_mask=(roles == ROLE_ID["image"]).to(self.device),
                            text_mask=text_mask.to(self.device), last_index=attention.sum(dim=1) - 1)


def load_chat_model(model_dir: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                    template: str | None = None) -> ChatModel:
    """A saved VLM folder (from `tga finetune`, or stage 1 with `--save_full_model`) ready for chat and analysis.

    `template` overrides the conversation template the folder was trained with: a stage-1 model trained with `plain`
    is asked in the LLM's chat format to see what the LLM does with projected images before instruction tuning.
    """
    model = load_vlm(model_dir, dtype=dtype or torch.float32).to(device)
    tokenizer = load_tokenizer(model_dir)
    template = template or getattr(model.config, "tga_template", None) or "llava_llama_2"
    aspect_ratio = folder_aspect_ratio(model_dir)  # images are shaped as in the folder's training
    return ChatModel(model, tokenizer, load_image_processor(model_dir, aspect_ratio), template, aspect_ratio)
