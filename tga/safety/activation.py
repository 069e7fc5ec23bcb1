"""tga/safety/activation.py

Algorithm 1 of the TGA paper: where does the LLM's safety mechanism "activate"? For each toxic prompt the
logit lens reads the word distribution at the last position of every layer, P^j = softmax(lm_head(norm(h^j)))
(HF's last hidden state is already normed and is not normed again), and the per-layer change
D^j = log P^j - log P^(j-1) (P^0 from the embeddings). The activation layer of a prompt is the first layer
whose D^j ranks a refusal token top-1 (`rule="paper"`) or within the top K (`rule="released"`, the released
code's variant). Ranks are pessimistic under ties (a token tied with others is ranked behind them), so a
layer that changes nothing (D^j = 0) never activates.

Benign control prompts, asked the same way, tell a safety decision from the answer-start prior: a layer where the
control prompts activate as often as the toxic ones writes the opening of every answer (the refusal's first word
among them), not a judgement about the content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tga.errors import ConfigError, DataError
from tga.safety.refusal_tokens import RULES
from tga.safety.states import LensParts


@torch.no_grad()
def logit_lens(states: torch.Tensor, parts: LensParts) -> torch.Tensor:
    """Log word distributions of every layer at one position.

    Args:
        states: [L+1, B, H] hidden states (index 0 = embeddings, index L = HF's last state).
        parts: the model's final norm and lm_head.

    Returns:
        Float32 log-probabilities [L+1, B, V].
    """
    weight = parts.lm_head.weight
    out = []
    for j, h in enumerate(states):
        h = h.to(device=weight.device, dtype=weight.dtype)
        if not (j == len(states) - 1 and parts.last_normalized):  # HF's last state is already normed
            h = parts.norm(h)
        out.append(torch.log_softmax(parts.lm_head(h).float(), dim=-1).cpu())
    return torch.stack(out)


def refusal_ranks(log_probs: torch.Tensor, refusal_ids: Sequence[int]) -> torch.Tensor:
    """Best (smallest) rank of any refusal token in D^j = log P^j - log P^(j-1), for j = 1..L.

    Args:
        log_probs: [L+1, B, V] from `logit_lens`.
        refusal_ids: the refusal token ids.

    Returns:
        Long tensor [L, B]; rank 1 = the largest increase. Row 0 is layer 1.
    """
    delta = log_probs[1:] - log_probs[:-1]
    best = None
    for token in refusal_ids:
        # Pessimistic rank: every token whose increase is >= this one's (itself included) ranks ahead.
        rank = (delta >= delta[..., token : token + 1]).sum(dim=-1)
        best = rank if best is None else torch.minimum(best, rank)
    return best


def activation_layers(ranks: torch.Tensor, top_k: int) -> list[int | None]:
    """First layer (1-based) whose best refusal rank is <= top_k, per sample; None if no layer qualifies."""
    hits = ranks <= top_k
    layers: list[int | None] = []
    for b in range(ranks.shape[1]):
        where = torch.nonzero(hits[:, b]).flatten()
        layers.append(int(where[0]) + 1 if len(where) else None)
    return layers


@dataclass
class ActivationResult:
    """Outcome of the activation-layer analysis (serialises to the JSON training reads)."""

    rule: str
    top_k: int
    num_layers: int
    refusal_token_ids: list[int]
    refusal_tokens: list[str]
    layers: list[int | None]
    mean_activation_layer: float | None
    activated_fraction: float
    mean_rank_per_layer: list[float]
    median_rank_per_layer: list[float]
    texts: list[str] = field(default_factory=list)
    control_layers: list[int | None] | None = None  # activation layers of benign control prompts, if given

    @property
    def control_activated_fraction(self) -> float | None:
        if not self.control_layers:
            return None
        return sum(layer is not None for layer in self.control_layers) / len(self.control_layers)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; `mean_activation_layer` is the key `--tga_layers auto` reads."""
        payload = asdict(self)
        payload["samples"] = [{"text": t, "layer": layer} for t, layer in zip(self.texts, self.layers)]
        payload["share_per_layer"] = layer_shares(self.layers, self.num_layers)
        del payload["texts"], payload["control_layers"]
        if self.control_layers:
            payload["control"] = {"layers": self.control_layers, "activated_fraction": self.control_activated_fraction,
                                  "share_per_layer": layer_shares(self.control_layers, self.num_layers)}
        return payload


def layer_shares(layers: Sequence[int | None], num_layers: int) -> list[float]:
    """Share of prompts whose activation layer is j, for j = 1..num_layers."""
    return [sum(1 for layer in layers if layer == j) / max(len(layers), 1) for j in range(1, num_layers + 1)]


def analyze_activation(
    states: torch.Tensor,
    parts: LensParts,
    refusal_ids: Sequence[int],
    *,
    rule: str = "paper",
    top_k: int = 5,
    tokenizer: Any = None,
    texts: Sequence[str] = (),
    control_states: torch.Tensor | None = None,
) -> ActivationResult:
    """Run Algorithm 1 on last-token hidden states of toxic prompts.

    Args:
        states: [L+1, N, H] last-real-token states (see `tga.safety.states`).
        parts: final norm and lm_head of the model that produced them.
        refusal_ids: refusal token ids (see `refusal_token_ids`).
        rule: "paper" (top-1) or "released" (top-K).
        top_k: K for the released rule.
        tokenizer: optional, to record the refusal tokens as text.
        texts: optional prompts, recorded per sample.
        control_states: optional [L+1, M, H] states of benign control prompts, analysed with the same rule.

    Returns:
        The per-sample activation layers, their mean over samples that activate, and per-layer rank statistics.
    """
    if rule not in RULES:
        raise ConfigError(f"--rule: `{rule}` is not supported (choose from {', '.join(RULES)})")
    if rule == "released" and top_k < 1:
        raise ConfigError(f"--top_k must be >= 1, got {top_k}")
    if states.shape[1] == 0:
        raise DataError("activation analysis needs at least one prompt")
    k = 1 if rule == "paper" else top_k
    ranks = refusal_ranks(logit_lens(states, parts), refusal_ids)
    layers = activation_layers(ranks, k)
    active = [layer for layer in layers if layer is not None]
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in refusal_ids] if tokenizer is not None else []
    control = None
    if control_states is not None and control_states.shape[1]:
        control = activation_layers(refusal_ranks(logit_lens(control_states, parts), refusal_ids), k)
    return ActivationResult(
        rule=rule,
        top_k=k,
        num_layers=ranks.shape[0],
        refusal_token_ids=list(refusal_ids),
        refusal_tokens=tokens,
        layers=layers,
        mean_activation_layer=sum(active) / len(active) if active else None,
        activated_fraction=len(active) / len(layers),
        mean_rank_per_layer=ranks.float().mean(dim=1).tolist(),
        median_rank_per_layer=ranks.float().median(dim=1).values.tolist(),
        texts=list(texts),
        control_layers=control,
    )
