"""tga/safety/loading.py

Loads what the analysis and evaluation commands run on: a project checkpoint (an HF
`LlavaForConditionalGeneration` folder) through `tga.inference.load_chat_model`, or a plain HF causal LM
folder (for the text-only activation analysis of a base LLM). Checks the folder first so that a wrong path
is a clear error, and never runs remote code.
"""

from __future__ import annotations

from typing import Any

import torch

from tga.errors import ConfigError
from tga.safety.io import ensure_model_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Map a `--dtype` value to a torch dtype (None: the loaders' default, float32)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"--dtype: `{name}` is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def is_vlm_dir(model_dir: str) -> bool:
    """Whether the folder holds a Llava (vision-language) checkpoint rather than a plain causal LM."""
    from tga.model.vlm import is_vlm_checkpoint

    return is_vlm_checkpoint(ensure_model_dir(model_dir))


def load_chat(model_dir: str, *, device: str = "cpu", dtype: str | None = None, template: str | None = None) -> Any:
    """Load a checkpoint as a `tga.inference.ChatModel`.

    Args:
        model_dir: the checkpoint folder.
        device: torch device string.
        dtype: "float32" | "float16" | "bfloat16" | None.
        template: conversation template overriding the folder's own (None: the one it was trained with).

    Returns:
        The chat model.
    """
    ensure_model_dir(model_dir)
    torch_dtype = parse_dtype(dtype)
    from tga.inference import load_chat_model

    return load_chat_model(model_dir, device=device, dtype=torch_dtype, template=template)


def load_causal_lm(model_dir: str, *, device: str = "cpu", dtype: str | None = None) -> tuple[Any, Any]:
    """Load a plain HF causal LM and its tokenizer from a local folder.

    Returns:
        (model in eval mode on `device`, tokenizer with a pad token for batching).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_model_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=parse_dtype(dtype) or torch.float32)
    if tokenizer.pad_token is None:  # LLaMA/Mistral folders often ship without one; batching needs it
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model.to(device).eval(), tokenizer
