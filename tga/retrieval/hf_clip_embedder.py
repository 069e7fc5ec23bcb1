"""tga/retrieval/hf_clip_embedder.py

`ClipEmbedder` over a transformers `CLIPModel` saved in a folder (config, weights, tokenizer files and
`preprocessor_config.json`), loaded offline with `from_pretrained`. The built-in demo world trains such a
model; any CLIP checkpoint in HF format (e.g. a local copy of openai/clip-vit-large-patch14) works too.
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


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features; v4 a tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClipEmbedder:
    """Embeds images and texts with a transformers `CLIPModel`.

    Args:
        model: the CLIPModel (eval mode).
        tokenizer: its tokenizer.
        image_processor: its image processor.
        device: where the model lives.
        description: what identifies the model in caches.
    """

    def __init__(self, model, tokenizer, image_processor, device: str, description: dict[str, str]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.max_length = model.config.text_config.max_position_embeddings
        self.description = description

    @classmethod
    def load(cls, folder: str, *, device: str = "cpu", dtype: str = "float32") -> HFClipEmbedder:
        """Load model, tokenizer and image processor from `folder` (no downloads)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if not os.path.isdir(folder):
            raise ConfigError(f"--model {folder}: not a folder (--backend hf_clip needs a saved CLIPModel folder)")
        try:
            model = CLIPModel.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True).to(device)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(
                f"--model {folder}: cannot load a CLIPModel with its tokenizer and image processor ({error})"
            ) from error
        model.eval()
        weights = sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.bin")))
        description = {
            "backend": "hf_clip",
            "model": os.path.abspath(folder),
            "weights": file_signature(weights[0]) if weights else "none",
        }
        return cls(model, tokenizer, image_processor, device, description)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        features = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        features = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
        )
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
