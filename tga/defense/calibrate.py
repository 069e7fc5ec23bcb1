"""tga/defense/calibrate.py

CMRM's calibration (`tga calibrate cmrm`): for every image of a calibration set with its caption, the model reads the
request once with the image and once with the caption in the image's place (text only); the output of every decoder
layer at the last prompt token is recorded with forward hooks (the very tensors the inference hooks of
`tga.defense.cmrm` later move), and the shift of layer l is the mean over the set of (image-conditioned -
text-only). Records are `{image, caption, question?}` or LLaVA records carrying `image_caption`; images are resolved
like everywhere else (inside the image folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tga.defense.cmrm import Calibration, decoder_layers
from tga.errors import DataError
from tga.image_io import resolve_image_path
from tga.records_io import load_records, record_label
from tga.safety.evaluate import load_batch_images

DEFAULT_QUESTION = "Describe the image."


@dataclass(frozen=True)
class CalibrationItem:
    image: str
    caption: str
    question: str


def load_calibration_items(data: str, image_folder: str | None = None, *, question: str = DEFAULT_QUESTION,
                           max_samples: int | None = None) -> list[CalibrationItem]:
    """Images with captions (`caption` or LLaVA's `image_caption`) and the request asked about them.

    Raises:
        DataError: a record lacks an image or a caption (named by id or index), or there is none.
    """
    folder = image_folder or os.path.dirname(os.path.abspath(data))
    items = []
    for index, record in enumerate(load_records(data)):
        label = record_label(record, index)
        caption = record.get("caption", record.get("image_caption"))
        image = record.get("image")
        if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{data}: record {label} needs `image` and `caption` (or `image_caption`)")
        asked = record.get("question") if isinstance(record.get("question"), str) else question
        items.append(CalibrationItem(resolve_image_path(folder, image, label), caption.strip(), asked))
        if max_samples is not None and len(items) == max_samples:
            break
    if not items:
        raise DataError(f"{data}: no calibration records")
    return items


@torch.no_grad()
def last_token_layer_outputs(chat, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
    """Every decoder layer's output at the last prompt token, [num_layers, batch, hidden] in float32."""
    encoded, pixel_values = chat.encode(list(images), list(texts))
    ids, attention, _ = chat.padded(encoded, left=True)  # left padding: the last prompt token is the last position
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)  # what generate uses, so the states are the same
    captured: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(module, args, output):
            captured[index] = (output[0] if isinstance(output, tuple) else output)[:, -1].float().cpu()

        return hook

    layers = decoder_layers(chat.model)
    handles = [layer.register_forward_hook(hook_for(index)) for index, layer in enumerate(layers)]
    try:
        vision = {} if pixel_values is None else {"pixel_values": pixel_values}
        chat.model(input_ids=ids, attention_mask=attention, position_ids=position_ids, **vision)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[index] for index in range(len(layers))])


def calibrate_cmrm(chat, items: Sequence[CalibrationItem], *, batch_size: int = 8) -> Calibration:
    """The mean shift (image-conditioned - text-only) of every decoder layer's output at the last prompt token."""
    total = None
    for start in tqdm(range(0, len(items), batch_size), desc="CMRM calibration", unit="batch"):
        batch = items[start : start + batch_size]
        images = load_batch_images([item.image for item in batch])
        with_image = last_token_layer_outputs(chat, images, [item.question for item in batch])
        text_only = last_token_layer_outputs(chat, [None] * len(batch),
                                             [f"{item.caption}\n{item.question}" for item in batch])
        difference = (with_image - text_only).double().sum(dim=1)
        total = difference if total is None else total + difference
    meta = {"samples": str(len(items)), "position": "last prompt token", "template": chat.template_name}
    return Calibration((total / len(items)).float(), meta)
