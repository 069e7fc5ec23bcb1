"""tga/model/vision.py

Vision towers and their image processors. The default is an HF CLIP vision model (`openai/clip-vit-large-patch14-336`
in the paper recipe), loaded from either a full `CLIPModel` checkpoint or a `CLIPVisionModel` one. The tower is
frozen by the training stages; its features are taken from layer `mm_vision_select_layer` (-2) with the CLS token
dropped (`patch`) or kept (`cls_patch`).

Loading the tower from a full CLIPModel checkpoint (the paper recipe's and the demo's) leaves the text tower and the
two projections unused, which transformers reports as two dozen "UNEXPECTED" keys; that expected case is one info
line here (`tga.model.loading`), while a weight the checkpoint lacks is still a warning and one of another shape an
error.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, PreTrainedModel

from tga.errors import ConfigError
from tga.model.loading import load_pretrained

SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # LLaVA flag value -> HF Llava strategy
# the weights of a full CLIPModel checkpoint that its vision tower does not use
CLIP_TEXT_SIDE = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")


def vision_config_of(name_or_path: str) -> CLIPVisionConfig:
    config = AutoConfig.from_pretrained(name_or_path)
    if getattr(config, "model_type", None) == "clip":
        return config.vision_config
    if getattr(config, "model_type", None) == "clip_vision_model":
        return config
    raise ConfigError(
        f"--vision_tower `{name_or_path}` is a `{config.model_type}` model; a CLIP (or CLIP vision) checkpoint is needed"
    )


def load_vision_tower(name_or_path: str, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The pretrained CLIP vision tower (from a CLIPModel or CLIPVisionModel checkpoint), reported in a line
    (`tga.model.loading`)."""
    vision_config_of(name_or_path)  # clear error for a non-CLIP checkpoint before loading weights
    return load_pretrained(CLIPVisionModel, name_or_path, what="vision tower", flag="--vision_tower", dtype=dtype,
                           unused=CLIP_TEXT_SIDE, unused_reason="the full CLIP checkpoint's text tower and projections")


def load_image_processor(name_or_path: str) -> CLIPImageProcessor:
    return CLIPImageProcessor.from_pretrained(name_or_path)


def num_patches(vision_config: CLIPVisionConfig, select_feature: str = "patch") -> int:
    """Image tokens per image: one per patch, plus the CLS token when it is kept."""
    if select_feature not in SELECT_STRATEGY:
        raise ConfigError(f"--mm_vision_select_feature `{select_feature}` must be one of {sorted(SELECT_STRATEGY)}")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if select_feature == "cls_patch" else 0)
