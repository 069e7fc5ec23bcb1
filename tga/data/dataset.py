"""tga/data/dataset.py

The lazy multimodal dataset: a validated record becomes model inputs only when it is fetched. Images are read
from `image_folder`, padded to a square with the processor's mean colour (`image_aspect_ratio pad`) and normalised;
the conversation is rendered by the stage's template (with the retrieved text in the first user turn when asked)
and tokenized with exact spans. For TGA, the caption is also rendered alone under the same system prompt: the
caption-only text pass whose hidden states are the alignment target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from tga.align.request_guide import request_spans
from tga.data.records import Record
from tga.data.templates import Message, PromptTemplate, Segment
from tga.data.tokenize import EncodingError, encode_segments
from tga.errors import DataError
from tga.image_io import open_image, resolve_image_path

IMAGE_TOKEN_LENGTH_ESTIMATE = 128  # LLaVA's length proxy for an image when grouping by length
# Longer sides are reduced to this before padding: a 10000x10 image would otherwise become a 300 MB square canvas.
# Far above any vision tower's input size, so ordinary images are untouched.
MAX_PAD_SIDE = 2048


def pad_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def leak_guarded(retrieved: str | None, caption: str | None) -> str | None:
    """Retrieved text identical to the caption would hand the target to the model: keep only its first half."""
    if retrieved is None or caption is None or " ".join(retrieved.lower().split()) != " ".join(caption.lower().split()):
        return retrieved
    words = retrieved.split()
    return " ".join(words[: max(1, len(words) // 2)])


@dataclass
class SampleBuilder:
    """Everything needed to turn a record into tensors (shared by training, analysis and evaluation)."""

    tokenizer: PreTrainedTokenizerBase
    template: PromptTemplate
    image_processor: object | None
    image_folder: str | None
    image_token_id: int
    num_image_tokens: int
    max_length: int | None = None
    image_aspect_ratio: str = "pad"  # "pad" | "resize" (processor default: resize + centre crop)
    use_retrieved: bool = False  # put R into the prompt (TGA stage 2 training)
    caption_target: bool = False  # also build the caption-only pass (TGA)
    guide_toxic: bool = False  # records marked toxic enter the guide loss too (default: never)
    caption_context: str = "alone"  # "alone": the caption is the whole user turn; "request": it takes the image's place
    request_guide: bool = False  # also mark the paired request tokens of both passes (--tga_form request)

    def load_image(self, record: Record) -> torch.Tensor:
        label = repr(record.id)
        if self.image_folder is None:
            raise DataError(f"record {label} has an image but no --image_folder was given")
        return self.process_image(open_image(resolve_image_path(self.image_folder, record.image, label), label))

    def process_image(self, image: Image.Image) -> torch.Tensor:
        if self.image_aspect_ratio == "pad":
            if max(image.size) > MAX_PAD_SIDE:
                scale = MAX_PAD_SIDE / max(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.Resampling.BICUBIC)
            mean = getattr(self.image_processor, "image_mean", [0.5, 0.5, 0.5])
            image = pad_to_square(image, tuple(int(channel * 255) for channel in mean))
        # The padding (with the size cap) is done above; a processor saved for `pad` must not decide it again.
        return self.image_processor(images=image, return_tensors="pt", do_pad=False)["pixel_values"][0]

    def encode(self, segments, record_id: str):
        try:
            return encode_segments(
                segments, self.tokenizer, image_token_id=self.image_token_id,
                num_image_tokens=self.num_image_tokens, max_length=self.max_length,
            )
        except EncodingError as error:
            raise DataError(f"record {record_id!r}: {error}") from error

    def build(self, record: Record) -> dict:
        has_image = record.image is not None
        retrieved = leak_guarded(record.retrieved, record.caption) if self.use_retrieved else None
        segments = self.template.render(list(record.messages), has_image=has_image, retrieved=retrieved,
                                        system=record.system)
        encoded = self.encode(segments, record.id)
        if not bool((encoded.labels != -100).any()):
            raise DataError(f"record {record.id!r}: no answer tokens left after truncation to {self.max_length} tokens")
        sample = {
            "id": record.id,
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "image_mask": encoded.mask("image"),
            "retrieved_mask": encoded.mask("retrieved"),
            "pixel_values": self.load_image(record) if has_image else None,
            "truncated": encoded.truncated,
            "guide": self.enters_guide(record),
        }
        if sample["guide"]:
            sample["caption_input_ids"], sample["caption_mask"] = self.caption_pass(record)
        if self.request_guide:
            sample["request_mask"] = torch.zeros_like(encoded.input_ids, dtype=torch.bool)
            if sample["guide"]:
                sample["request_mask"], sample["caption_request_mask"] = request_spans(
                    encoded.input_ids, encoded.labels, sample["image_mask"], sample["caption_input_ids"],
                    sample["caption_mask"])
        return sample

    def enters_guide(self, record: Record) -> bool:
        """Whether the record's sample carries a caption pass (an image with a caption, not toxic unless asked)."""
        return bool(self.caption_target and record.image is not None and record.caption
                    and (self.guide_toxic or not record.toxic))

    def caption_pass(self, record: Record) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and caption mask of the record's caption pass (no image is read: the caption-state bank uses it)."""
        retrieved = leak_guarded(record.retrieved, record.caption) if self.use_retrieved else None
        caption = self.encode(self.caption_segments(record, retrieved), record.id)
        return caption.input_ids, caption.mask("caption")


    def caption_segments(self, record: Record, retrieved: str | None) -> list[Segment]:
        """The caption-only pass: the caption as the whole user turn, or (`request`) the record's first user turn with
        the caption in the image's place, so that the target is the caption as the model reads it in the request."""
        if self.caption_context == "alone":
            return self.template.render([Message("user", record.caption)], system=record.system, as_caption=True,
                                        add_generation_prompt=True)
        request = self.template.render([Message("user", record.messages[0].content)], has_image=True,
                                       retrieved=retrieved, system=record.system, add_generation_prompt=True)
        return [Segment(record.caption, "caption") if segment.role == "image" else segment for segment in request]


class LazySupervisedDataset(Dataset):
    """Map-style dataset over validated records; tensors are built on access (in dataloader workers)."""

    def __init__(self, records: list[Record], builder: SampleBuilder):
        self.records = records
        self.builder = builder

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.builder.build(self.records[index])

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's convention: a word-count length proxy, positive for image records and negative for text-only ones."""
        return [modality_length(record) for record in self.records]


def modality_length(record: Record) -> int:
    """The sampler's length proxy of one record: words (+ an image estimate), negative for text-only records.

    Never 0, whose sign would say neither modality: a text-only record of empty turns still counts one word."""
    words = sum(len(message.content.split()) for message in record.messages)
    return words + IMAGE_TOKEN_LENGTH_ESTIMATE if record.image else -max(words, 1)
