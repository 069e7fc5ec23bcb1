"""tga/model/text_states.py

The hidden states of a decoder-only language model up to a given depth, without running the layers above it.

TGA's caption target is read at the target layers only, and `--tga_layers auto` ends at the activation layer (about
the middle of a 7B model's stack, layer 1 of 6 in the demo world), so the no-grad caption pass of every training
step can stop after the deepest target layer. The states are those of the full forward at the same indices: the
same modules run on the same inputs in the same order (embedding, rotary position embedding, causal mask, decoder
layers); nothing above the depth can change them, since each layer reads only the one below. Only model types whose
forward is exactly that sequence take this path (Llama, Mistral: tested bit for bit); others (Gemma scales its
embeddings, Qwen2 picks a mask per layer) and a depth that reaches the final norm take the full forward.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

PARTIAL_MODEL_TYPES = ("llama", "mistral")  # forward = embed, rotary, causal mask, layers, norm; nothing else


def supports_partial_pass(language_model) -> bool:
    """Whether `language_model`'s forward is the plain sequence that `text_hidden_states` runs layer by layer."""
    return getattr(language_model.config, "model_type", None) in PARTIAL_MODEL_TYPES


def caption_pass_modules(language_model, depth: int) -> list[torch.nn.Module]:
    """The modules a text pass to hidden state `depth` runs: the embeddings and decoder layers up to `depth`, or the
    whole model where the pass is its full forward (the depth reaches the last layer, or the forward is not one
    `text_hidden_states` mirrors)."""
    if depth >= language_model.config.num_hidden_layers or not supports_partial_pass(language_model):
        return [language_model]
    return [language_model.embed_tokens, *language_model.layers[:depth]]


def text_hidden_states(language_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       depth: int) -> tuple[torch.Tensor, ...]:
    """`hidden_states[0 .. depth]` of `language_model(input_ids, attention_mask, output_hidden_states=True)`.

    Args:
        language_model: the decoder stack (`LlavaModel.language_model`, e.g. a `MistralModel`).
        input_ids: [B, T] token ids.
        attention_mask: [B, T] (1 = token, 0 = padding) or None.
        depth: the deepest hidden-state index needed (0 = embedding output, j = output of decoder layer j).

    Returns:
        A tuple of depth + 1 tensors [B, T, H] (the full model's tuple when the depth reaches the last layer, whose
        state the model returns after its final norm).
    """
    if caption_pass_modules(language_model, depth) == [language_model]:
        return language_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                              use_cache=False).hidden_states
    embeds = language_model.embed_tokens(input_ids)
    inputs = layer_inputs(language_model, embeds, attention_mask)
    states = [embeds]
    for layer in language_model.layers[:depth]:
        states.append(layer(states[-1], **inputs))
    return tuple(states)


def layer_inputs(language_model, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    """The keyword inputs the model's forward gives every decoder layer for these embeddings: the causal mask, the
    position ids and the rotary position embeddings (also used by the caption pass that rides the training forward,
    `tga.align.shared_pass`). The rotary module holds no parameters; its `forward` is called without module hooks so
    that a pass inside another forward adds no module to a ZeRO-3 trace."""
    config = language_model.config
    position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    # the mask function the model's own forward picks (Mistral v0.1 configs carry a sliding window)
    make_mask = create_causal_mask if getattr(config, "sliding_window", None) is None else create_sliding_window_causal_mask
    mask = make_mask(config=config, inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=None,
                     position_ids=position_ids)
    position_embeddings = language_model.rotary_emb.forward(embeds, position_ids=position_ids)
    return {"attention_mask": mask, "position_ids": position_ids, "position_embeddings": position_embeddings}
