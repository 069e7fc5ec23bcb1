"""tga/model/vision.py

Vision towers and their image processors. The default is an HF CLIP vision model (`openai/clip-vit-large-patch14-336`
in the paper recipe), loaded from either a full `CLIPModel` checkpoint or a `CLIPVisionModel` one. The tower is
frozen by the training stages; its features are taken from layer `mm_vision_select_layer` (-2) with the CLS token
dropped (`patch`) or kept (`cls_patch`).

The image processor is a `LlavaImageProcessor` whose `do_pad` records `--image_aspect_ratio`: `pad` (LLaVA-1.5) pads to
a square with the mean colour before CLIP's resize and centre crop, `resize` leaves the image as it is. Every folder the
project writes saves it, so `AutoProcessor` (plain transformers, vLLM, lmms-eval) computes the pixels training saw.
Folders written before carry a plain `CLIPImageProcessor`; their aspect ratio comes from the run's tga_config.json.

Loading the tower from a full CLIPModel checkpoint (the paper recipe's and the demo's) leaves the text tower and the
two projections unused, which transformers reports as two dozen "UNEXPECTED" keys; that expected case is one info
line here (`tga.model.loading`), while a weight the checkpoint lacks is still a warning and one of another shape an
error.
"""

from __future__ import annotations

import json
import os
import re

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaImageProcessor,
    PreTrainedModel,
)

from tga.errors import ConfigError
from tga.model.loading import load_pretrained

SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # LLaVA flag value -> HF Llava strategy
ASPECT_RATIOS = ("pad", "resize")
# What a CLIP image processor does besides padding; copied into the LlavaImageProcessor unchanged.
PROCESSOR_SETTINGS = ("size", "crop_size", "do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor",
                      "do_normalize", "do_center_crop", "image_mean", "image_std")
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


def load_image_processor(name_or_path: str, aspect_ratio: str = "pad") -> LlavaImageProcessor:
    """The image processor of a vision tower or model folder, padding (`pad`) or not (`resize`) as training does."""
    return with_aspect_ratio(AutoImageProcessor.from_pretrained(name_or_path), aspect_ratio)


def with_aspect_ratio(processor, aspect_ratio: str) -> LlavaImageProcessor:
    """A `LlavaImageProcessor` with `processor`'s resize, crop and normalisation, padding as `aspect_ratio` says.

    It pads like `tga.data.dataset.pad_to_square`: centred, the left/top margin rounded down, filled with
    `int(255 * image_mean)`, so its pixels equal the training pipeline's for every image size.
    """
    if aspect_ratio not in ASPECT_RATIOS:
        raise ConfigError(f"image aspect ratio `{aspect_ratio}` must be one of {list(ASPECT_RATIOS)}")
    return LlavaImageProcessor(**{key: getattr(processor, key) for key in PROCESSOR_SETTINGS},
                               do_pad=aspect_ratio == "pad")


def saved_aspect_ratio(path: str) -> str | None:
    """`pad` / `resize` as recorded by the LlavaImageProcessor saved in a folder; None when it holds another one."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        config_file = os.path.join(path, name)
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as handle:
                settings = json.load(handle)
            settings = settings.get("image_processor", settings)
            if settings.get("image_processor_type") in ("LlavaImageProcessor", "LlavaImageProcessorFast"):
                return "pad" if settings.get("do_pad") else "resize"
    return None


def run_settings(path: str) -> dict:
    """The resolved config (tga_config.json) of the run that wrote `path` (a run folder or its checkpoint-N), or {}."""
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        config_file = os.path.join(folder, "tga_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as handle:
                return json.load(handle)
    return {}


def folder_aspect_ratio(path: str) -> str:
    """How a model folder's images were shaped in training: its saved processor, else its run's config, else `pad`.

    Folders saved before the processor recorded it hold a CLIPImageProcessor (which would centre-crop); the run's
    `--image_aspect_ratio` (default `pad`) is what their training used.
    """
    saved = saved_aspect_ratio(path)
    if saved is not None:
        return saved
    settings = run_settings(path)
    for section in ("DataArguments", "UnlearnArguments"):
        if settings.get(section, {}).get("image_aspect_ratio") in ASPECT_RATIOS:
            return settings[section]["image_aspect_ratio"]
    return "pad"


def num_patches(vision_config: CLIPVisionConfig, select_feature: str = "patch") -> int:
    """Image tokens per image: one per patch, plus the CLS token when it is kept."""
    if select_feature not in SELECT_STRATEGY:
        raise ConfigError(f"--mm_vision_select_feature `{select_feature}` must be one of {sorted(SELECT_STRATEGY)}")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if select_feature == "cls_patch" else 0)
