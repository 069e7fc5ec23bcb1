"""The tiny LLaVA of the `tiny_assets` fixture with a sample builder for its data, as several tests build them, and the
one-weight regression model the Trainer-callback tests train."""

from __future__ import annotations

import torch

from tga.data.dataset import SampleBuilder
from tga.data.templates import get_template
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm


def tiny_model_and_builder(tiny_assets: dict, *, template: str = "llava_llama_2", seed: int = 0, **options):
    """(tokenizer, model, builder): the tiny VLM built with `seed`, and a `SampleBuilder` over the tiny images with
    `options` (use_retrieved, caption_target, ...)."""
    tokenizer = load_tokenizer(tiny_assets["llm"])
    torch.manual_seed(seed)
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    builder = SampleBuilder(tokenizer=tokenizer, template=get_template(template),
                            image_processor=load_image_processor(tiny_assets["vision"]),
                            image_folder=tiny_assets["image_folder"], image_token_id=image_token_id(tokenizer),
                            num_image_tokens=model.config.image_seq_length, **options)
    return tokenizer, model, builder


class Regression(torch.nn.Module):
    """y = w x + b with an MSE loss: a model the HF Trainer trains in milliseconds."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}
