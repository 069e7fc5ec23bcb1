"""tga/safety/states.py

Collects the hidden states the analyses need and finds the pieces of a model the logit lens uses. Works on
a plain Hugging Face causal LM and on the language model inside a `LlavaForConditionalGeneration` (found
generically through `get_decoder()` and `get_output_embeddings()`), and on a `ChatModel` from
`tga.inference`, whose `hidden_states` returns per-layer states with image/text masks and the last real
token. Layer indexing follows HF: states[0] are the embeddings, states[j] the output of decoder block j.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


@dataclass
class LensParts:
    """What the logit lens applies to a hidden state: final norm, then the output embedding (lm_head).

    Attributes:
        norm: the decoder's final normalisation layer.
        lm_head: the output embedding.
        last_normalized: whether the last entry of HF's `hidden_states` is already the normed state
            (true for HF language models unless the config sets `tie_last_hidden_states=False`), in which case
            the lens must not normalise it again.
    """

    norm: nn.Module
    lm_head: nn.Module
    last_normalized: bool = True


def lens_parts(model: nn.Module) -> LensParts:
    """Find the final norm and lm_head of a causal LM or of the language model inside a Llava model.

    Args:
        model: an HF `*ForCausalLM` or `LlavaForConditionalGeneration`.

    Returns:
        The lens parts.
    """
    lm_head = model.get_output_embeddings()
    decoder = model.get_decoder()
    norm = next(
        (getattr(decoder, name) for name in _NORM_NAMES if isinstance(getattr(decoder, name, None), nn.Module)), None
    )
    if lm_head is None or norm is None:
        raise ValueError(f"cannot find the final norm / lm_head of {type(model).__name__} for the logit lens")
    config = getattr(decoder, "config", None)
    last_normalized = getattr(config, "tie_last_hidden_states", None) is not False
    return LensParts(norm=norm, lm_head=lm_head, last_normalized=last_normalized)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding position of each row, for left or right padding. [B, T] -> [B]."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


def format_user_turns(tokenizer: Any, texts: Sequence[str]) -> tuple[list[str], bool]:
    """Format texts as single user turns with the tokenizer's chat template, if it has one.

    Returns:
        The prompts and whether they already carry special tokens (BOS) from the template.
    """
    if getattr(tokenizer, "chat_template", None):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
        return prompts, True
    return list(texts), False


@torch.no_grad()
def last_token_states(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 8, chat_format: bool = True
) -> torch.Tensor:
    """Hidden states of every layer at the last real token of each prompt (plain HF causal LM or Llava).

    Args:
        model: the model; only its decoder runs (no logits are computed).
        tokenizer: its tokenizer.
        texts: the prompts (user-turn contents when `chat_format`).
        batch_size: prompts per forward pass (left padded).
        chat_format: format each text as a user turn with the tokenizer's chat template when it has one.

    Returns:
        Float32 tensor [L+1, N, H] on CPU (index 0 = embeddings).
    """
    prompts, templated = format_user_turns(tokenizer, texts) if chat_format else (list(texts), False)
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    chunks = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="hidden states", unit="batch"):
        batch = tokenizer(
            prompts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=not templated,
        ).to(device)
        out = decoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        )
        rows = torch.arange(batch["input_ids"].shape[0], device=device)
        last = last_real_index(batch["attention_mask"])
        chunks.append(torch.stack([h[rows, last] for h in out.hidden_states]).float().cpu())
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def chat_last_token_states(chat: Any, texts: Sequence[str], *, batch_size: int = 8) -> torch.Tensor:
    """Like `last_token_states`, through a `tga.inference.ChatModel` (its template, text-only prompts).

    Returns:
        Float32 tensor [L+1, N, H] on CPU.
    """
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="hidden states", unit="batch"):
        part = list(texts[start : start + batch_size])
        result = chat.hidden_states([None] * len(part), part)
        rows = torch.arange(len(part))
        last = result.last_index.cpu()
        chunks.append(torch.stack([h.float().cpu()[rows, last] for h in result.states]))
    return torch.cat(chunks, dim=1)


def masked_mean(states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of each row, for every layer. [B,T,H] x (L+1) with [B,T] -> [L+1,B,H]."""
    weights = mask.float().cpu().unsqueeze(-1)
    counts = weights.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a sample has no positions in the pooling mask (no image/caption tokens found)")
    return torch.stack([(h.float().cpu() * weights).sum(dim=1) / counts for h in states])


@torch.no_grad()
def chat_pooled_states(
    chat: Any,
    images: Sequence[Any],
    texts: Sequence[str],
    *,
    region: str,
    batch_size: int = 8,
    desc: str = "pooled states",
) -> torch.Tensor:
    """Per-layer mean hidden state over the image tokens or the user-text tokens of each prompt.

    Args:
        chat: a `tga.inference.ChatModel`.
        images: one image (or None for a text-only prompt) per text.
        texts: the user text of each prompt (a question for image prompts, the caption for caption prompts).
        region: "image" (pool `image_mask`) or "text" (pool `text_mask`).
        batch_size: prompts per forward pass.
        desc: progress-bar label.

    Returns:
        Float32 tensor [L+1, N, H] on CPU.
    """
    if region not in ("image", "text"):
        raise ValueError(f"region must be 'image' or 'text', got {region!r}")
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        result = chat.hidden_states(list(images[start : start + batch_size]), list(texts[start : start + batch_size]))
        mask = result.image_mask if region == "image" else result.text_mask
        chunks.append(masked_mean(result.states, mask))
    return torch.cat(chunks, dim=1)
