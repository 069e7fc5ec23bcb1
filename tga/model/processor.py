"""tga/model/processor.py

The `LlavaProcessor` saved with every model folder: the tokenizer, the image processor and the chat template of the
run, expanding `<image>` to one token per patch the way the data pipeline does, so plain transformers reproduces the
training prompts.
"""

from __future__ import annotations

from transformers import LlavaProcessor

from tga.data.chat_templates import chat_template
from tga.model.vision import SELECT_STRATEGY


def build_processor(model, tokenizer, image_processor) -> LlavaProcessor:
    """The HF processor that expands `<image>` like our data pipeline does (one token per patch, CLS as configured)."""
    strategy = model.config.vision_feature_select_strategy
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=strategy, image_token="<image>",
        num_additional_image_tokens=1 if strategy in SELECT_STRATEGY.values() else 0,
        chat_template=chat_template(getattr(model.config, "tga_template", None) or "llava_llama_2"),
    )
