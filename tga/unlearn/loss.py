"""tga/unlearn/loss.py

The three terms of the unlearning loss (Yao et al. 2023, "Large Language Model Unlearning"), pure torch, on response
tokens only (positions whose label is not IGNORE_INDEX; logits at t predict the token at t + 1):
    L = w_fgt * L_forget + w_rdn * L_mismatch + w_nor * L_keep
    L_forget   = -NLL(harmful response | harmful prompt)          gradient ascent
    L_mismatch =  NLL(random benign or refusal response | harmful prompt)
    L_keep     =  mean over response tokens of KL(p_reference || p_model) on normal data
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tga.data.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class UnlearnWeights:
    forget: float = 0.5  # w_fgt
    mismatch: float = 1.0  # w_rdn
    keep: float = 1.0  # w_nor


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [N, V], targets [N] and the response mask [N] of next-token prediction, flattened."""
    logits, targets = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    return logits, targets, targets != IGNORE_INDEX


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the response tokens of a batch (float32)."""
    logits, targets, mask = shifted(logits, labels)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), targets[mask])


def response_kl(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(p_reference || p_model) over the response tokens (zero when the two models agree)."""
    logits, _, mask = shifted(logits, labels)
    reference, _, _ = shifted(reference_logits, labels)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits[mask].float(), dim=-1)
    log_q = F.log_softmax(reference[mask].float(), dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(dim=-1).mean()


def unlearn_loss(forget_nll: torch.Tensor, mismatch_nll: torch.Tensor, keep_kl: torch.Tensor,
                 weights: UnlearnWeights) -> torch.Tensor:
    """The combined loss; the forget NLL enters with a minus sign (gradient ascent)."""
    return -weights.forget * forget_nll + weights.mismatch * mismatch_nll + weights.keep * keep_kl
