"""tga/caption/captioner.py

Caption generation with any HF image-to-text model that `AutoModelForImageTextToText` loads (BLIP, BLIP-2,
GIT, vision-encoder-decoder, LLaVA, Qwen-VL, ...) with its `AutoProcessor`, by batched greedy decoding.
Models whose processor has a chat template get the prompt as a user instruction beside the image and only
the answer is kept; other models (BLIP, GIT) take the prompt as the start of the caption, which it then
begins with (their convention), or no prompt at all.
"""

from __future__ import annotations

import os

import torch
from PIL import Image

from tga.errors import ConfigError

DEFAULT_INSTRUCTION = "Describe the image in one sentence."  # used for chat models when no prompt is given
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Captioner:
    """Batched greedy captioning with an image-to-text model.

    Args:
        model: the loaded image-text-to-text model (eval mode, on its device).
        processor: its processor (images + text).
        prompt: instruction (chat models) or caption prefix (others); None for unconditional captioning.
        max_new_tokens: generation budget per caption.
    """

    def __init__(self, model, processor, *, prompt: str | None = None, max_new_tokens: int = 40) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.chat = getattr(processor, "chat_template", None) is not None
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not self.encoder_decoder:
            tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
        if self.chat:
            conversation = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": prompt or DEFAULT_INSTRUCTION}],
                }
            ]
            self.text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        else:
            self.text = prompt or None

    @classmethod
    def load(
        cls,
        model_dir: str,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 40,
        trust_remote_code: bool = False,
    ) -> Captioner:
        """Load model and processor from a folder (or a hub id where the hub is reachable).

        Args:
            model_dir: saved model folder with its processor files.
            device: torch device string.
            dtype: "float32", "float16", "bfloat16", or None for the dtype the model was saved in.
            prompt, max_new_tokens: see the class.
            trust_remote_code: run the model repository's own code (only when asked for explicitly).

        Returns:
            The captioner.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not os.path.isdir(model_dir) and os.path.exists(model_dir):
            raise ConfigError(f"--model {model_dir}: expected a model folder")
        try:
            processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                model_dir, dtype=DTYPES[dtype] if dtype else "auto", trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(
                f"--model {model_dir}: cannot load an image-to-text model and processor ({error}); "
                "it must be a model that AutoModelForImageTextToText supports"
            ) from error
        model.to(device).eval()
        return cls(model, processor, prompt=prompt, max_new_tokens=max_new_tokens)

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (whitespace-collapsed; may be empty if the model stops at once)."""
        if self.text is None:
            inputs = self.processor(images=images, return_tensors="pt")
        else:
            inputs = self.processor(images=images, text=[self.text] * len(images), return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)  # BatchFeature casts only float tensors
        prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if self.chat and not self.encoder_decoder:
            output = output[:, prompt_length:]  # keep the answer, not the echoed instruction
        return [" ".join(text.split()) for text in self.processor.batch_decode(output, skip_special_tokens=True)]
