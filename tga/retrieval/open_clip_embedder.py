"""tga/retrieval/open_clip_embedder.py

`ClipEmbedder` over any open_clip model: a built-in name with a pretrained tag or checkpoint file
(`ViT-L-14` + `openai`), a `local-dir:` folder holding `open_clip_config.json` and weights, or a custom
architecture registered from a JSON config file (`model_config`, open_clip's `add_model_config`).
"""

from __future__ import annotations

import glob
import os

import numpy as np
import torch
from PIL import Image

from tga.errors import ConfigError
from tga.records_io import file_signature
from tga.retrieval.embedders import DTYPES

_OPEN_CLIP_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class OpenClipEmbedder:
    """Embeds images and texts with an open_clip model.

    Args:
        model: the open_clip CLIP model (eval mode).
        preprocess: its validation image transform.
        tokenizer: its tokenizer (callable on a list of strings).
        device: where the model lives.
        dtype: "float32", "float16" or "bfloat16" (weights and image inputs).
        description: what identifies the model in caches.
    """

    def __init__(self, model, preprocess, tokenizer, device: str, dtype: str, description: dict[str, str]) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.description = description

    @classmethod
    def load(
        cls,
        model_name: str,
        pretrained: str | None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        model_config: str | None = None,
    ) -> OpenClipEmbedder:
        """Build the model, its transform and tokenizer (see `build_embedder` for the arguments)."""
        import open_clip

        if model_config is not None:
            if not os.path.isfile(model_config):
                raise ConfigError(f"--model_config file not found: {model_config}")
            open_clip.add_model_config(model_config)  # open_clip's own registry API; the file stem names the model
        weights: list[str] = []
        if model_name.startswith("local-dir:"):
            folder = os.path.abspath(model_name.split(":", 1)[1])
            model_name = f"local-dir:{folder}"
            weights = sorted(
                p for ext in ("safetensors", "bin", "pth", "pt") for p in glob.glob(os.path.join(folder, f"*.{ext}"))
            )
            if not weights:
                raise ConfigError(f"--model {model_name}: no weights file in {folder}")
            pretrained = None  # the folder carries its weights
        elif not pretrained:
            raise ConfigError(
                f"--pretrained is required for --model {model_name} (a tag like 'openai' or a checkpoint file)"
            )
        elif os.path.isfile(pretrained):
            weights = [os.path.abspath(pretrained)]
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, precision=_OPEN_CLIP_PRECISION[dtype], device=device
            )
            tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, ValueError, FileNotFoundError, KeyError) as error:
            raise ConfigError(
                f"--model {model_name} --pretrained {pretrained}: cannot build the model ({error})"
            ) from error
        model.eval()
        description = {
            "backend": "open_clip",
            "model": model_name,
            "pretrained": str(pretrained),
            "weights": ",".join(file_signature(path) for path in weights) or "tag",
        }
        return cls(model, preprocess, tokenizer, device, dtype, description)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels, normalize=True).float().cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu().numpy()
