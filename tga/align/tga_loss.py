"""tga/align/tga_loss.py

The TGA guide loss on pooled per-layer states: image states I (from the training pass, with grad),
caption states C (the caption read as text, the target) and optionally retrieved-text states R, each
[L, B, H]. Three forms on pooled states are here: `paper` (the formula of the TGA paper, the default), `released`
(the weighting and step decay of the released TGA code, made differentiable) and `contrastive` (batch
InfoNCE from image to caption, which rewards concept-specific rather than shared-direction alignment). The fourth
`--tga_form`, `request`, compares tokens rather than pools (tga.align.request_guide).
Every term is built from torch ops so that its gradient reaches the image states; the released code
applied Python `math.exp` to tensors, which returned floats and gave its guide loss zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tga.align.metrics import apply_center, cosine_matrix, paired_cosine, specificity
from tga.errors import ConfigError


class FormInputs(NamedTuple):
    """What a loss form computes its terms from: centred pooled states [L, B, H] (B >= 1), their cosines [L, B], the
    resolved weights and the options."""

    image: Tensor
    caption: Tensor
    retrieved: Tensor | None
    cos_ic: Tensor
    cos_rc: Tensor | None
    pair_weight: float
    hinge_weight: float
    step_ratio: float
    temperature: float


class LossForm(NamedTuple):
    """One form of the guide loss (`--tga_form NAME`, an entry of `FORMS`).

    Attributes:
        terms: the weighted pair term and hinge term (None without retrieved states) of a batch.
        default_weights: (pair, hinge) weights used when `--tga_pair_weight` / `--tga_hinge_weight` are not given.
        uses_step_ratio: the terms read training progress (checked to lie in [0, 1]).
        uses_temperature: the terms read `--tga_temperature` (checked > 0).
    """

    terms: Callable[[FormInputs], tuple[Tensor, Tensor | None]]
    default_weights: tuple[float, float] = (1.0, 1.0)
    uses_step_ratio: bool = False
    uses_temperature: bool = False


class GuideTerms(NamedTuple):
    """The two weighted parts of the guide loss, still attached to the graph.

    Attributes:
        pair: Scalar image-caption term (already multiplied by its weight and decay).
        hinge: Scalar retrieved-text hinge term (a constant zero when no retrieved states were given).
        cos_ic: cos(I, C) per layer and sample [L, B], after centring.
        cos_rc: cos(R, C) [L, B] after centring, or None.
    """

    pair: Tensor
    hinge: Tensor
    cos_ic: Tensor
    cos_rc: Tensor | None


def _validate(
    form: str,
    image_states: Tensor,
    caption_states: Tensor,
    retrieved_states: Tensor | None,
    center: Tensor | None,
    step_ratio: float,
    temperature: float,
    weights: tuple[float, float],
) -> None:
    """Raise ConfigError naming the option when the inputs cannot make a guide loss (`form` is a known one)."""
    where = f"guide loss (--tga_form {form})"
    if image_states.dim() != 3 or image_states.shape[0] == 0 or image_states.shape[2] == 0:
        raise ConfigError(
            f"{where}: image states must be [layers >= 1, batch, hidden >= 1], got {tuple(image_states.shape)}"
        )
    if caption_states.shape != image_states.shape:
        raise ConfigError(
            f"{where}: caption states {tuple(caption_states.shape)} do not match image states "
            f"{tuple(image_states.shape)}; both must be pooled over the same --tga_layers and batch"
        )
    if retrieved_states is not None and retrieved_states.shape != image_states.shape:
        raise ConfigError(
            f"{where}: retrieved-text states {tuple(retrieved_states.shape)} do not match image states "
            f"{tuple(image_states.shape)}"
        )
    num_layers, _, hidden = image_states.shape
    if center is not None and tuple(center.shape) != (num_layers, hidden):
        raise ConfigError(
            f"{where}: the caption centre has shape {tuple(center.shape)}, expected [{num_layers}, {hidden}] "
            "(one row per --tga_layers entry)"
        )
    if FORMS[form].uses_step_ratio and not 0.0 <= step_ratio <= 1.0:
        raise ConfigError(f"{where}: step_ratio must lie in [0, 1] (step / max_steps), got {step_ratio}")
    if FORMS[form].uses_temperature and not temperature > 0.0:
        raise ConfigError(f"--tga_temperature: must be > 0, got {temperature}")
    for option, value in zip(("--tga_pair_weight", "--tga_hinge_weight"), weights, strict=True):
        if not value >= 0.0:
            raise ConfigError(f"{option}: must be >= 0, got {value}")


def _info_nce(image: Tensor, caption: Tensor, temperature: float) -> Tensor:
    """Image-to-caption InfoNCE averaged over layers and samples; image/caption are centred [L, B, H]."""
    num_layers, batch, _ = image.shape
    logits = cosine_matrix(image, caption) / temperature  # [L, B, B]: row b scores image b against every caption
    targets = torch.arange(batch, device=image.device).repeat(num_layers)
    # Cross-entropy over the flattened (layer, sample) rows = mean over layers of each layer's InfoNCE.
    return F.cross_entropy(logits.reshape(num_layers * batch, batch), targets)


def guide_terms(
    image_states: Tensor,
    caption_states: Tensor,
    retrieved_states: Tensor | None = None,
    *,
    form: str = "paper",
    step_ratio: float = 0.0,
    pair_weight: float | None = None,
    hinge_weight: float | None = None,
    temperature: float = 0.07,
    center: Tensor | None = None,
) -> GuideTerms:
    """Compute the weighted pair and hinge parts of the guide loss (see `guide_loss` for the forms).

    Args and Raises: as `guide_loss`.

    Returns:
        GuideTerms with both parts attached to the autograd graph.
    """
    if form not in FORMS:
        raise ConfigError(f"--tga_form: unknown guide-loss form {form!r}; choose one of {', '.join(FORMS)}")
    default_pair, default_hinge = FORMS[form].default_weights
    w_pair = default_pair if pair_weight is None else float(pair_weight)
    w_hinge = default_hinge if hinge_weight is None else float(hinge_weight)
    _validate(form, image_states, caption_states, retrieved_states, center, step_ratio, temperature, (w_pair, w_hinge))

    image = apply_center(image_states, center)
    caption = apply_center(caption_states, center)
    retrieved = None if retrieved_states is None else apply_center(retrieved_states, center)
    cos_ic = paired_cosine(image, caption)  # [L, B]
    cos_rc = None if retrieved is None else paired_cosine(retrieved, caption)

    if image.shape[1] == 0:
        # No usable sample on this rank this step: a zero that stays on the graph, so that every rank runs
        # the same backward (DDP/ZeRO expect it); the metrics come out NaN and are skipped by the logger.
        zero = image_states.float().sum() * 0.0
        return GuideTerms(pair=zero, hinge=zero.detach().clone(), cos_ic=cos_ic, cos_rc=cos_rc)
    pair, hinge = FORMS[form].terms(FormInputs(image, caption, retrieved, cos_ic, cos_rc, w_pair, w_hinge,
                                               float(step_ratio), temperature))
    if hinge is None:
        hinge = torch.zeros((), device=pair.device, dtype=pair.dtype)
    return GuideTerms(pair=pair, hinge=hinge, cos_ic=cos_ic, cos_rc=cos_rc)


def guide_loss(
    image_states: Tensor,
    caption_states: Tensor,
    retrieved_states: Tensor | None = None,
    *,
    form: str = "paper",
    step_ratio: float = 0.0,
    pair_weight: float | None = None,
    hinge_weight: float | None = None,
    temperature: float = 0.07,
    center: Tensor | None = None,
    diagnostics: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The TGA guide loss on pooled per-layer states, with its metrics.

    With cos the cosine over the hidden dimension, every mean taken over layers l and samples b:

    - `paper`: mean[-cos(I, C)] * w_pair + mean[softplus(cos(R, C) - cos(I, C))] * w_hinge,
      w_pair = w_hinge = 1 by default.
    - `released`: w_pair (1 - r) mean[exp(-cos(I, C))] + w_hinge (1 - r)^2 mean[exp(cos(R, C) - cos(I, C))],
      w_pair = 1/4, w_hinge = 1/10 by default, r = `step_ratio` (step / max_steps), so the loss fades to 0.
    - `contrastive`: per layer, InfoNCE from each image to the batch's captions, logits
      cos(I_b, C_b') / temperature with target b' = b, averaged over layers, times w_pair; plus the paper's
      hinge term times w_hinge when R is given. A batch of one sample has no negatives, so that call falls
      back to the pair term mean[-cos(I, C)] * w_pair.

    An empty batch (B = 0, e.g. only toxic or caption-less samples on this rank) gives a zero loss that
    stays on the graph, and NaN metrics. Without retrieved states the hinge part is a constant zero and `hinge_weight` has no effect.
    `center` [L, H] (see `CaptionCenter`) is subtracted from I, C and R before every cosine: caption
    states of a layer share a dominant direction, and an uncentred cosine mostly rewards that direction.

    Args:
        image_states: Pooled image-token states [L, B, H] (with grad).
        caption_states: Pooled caption states [L, B, H], the target (normally without grad).
        retrieved_states: Pooled retrieved-text states [L, B, H], or None.
        form: "paper", "released" or "contrastive".
        step_ratio: Training progress r in [0, 1]; used by the released form only.
        pair_weight: Weight of the image-caption term (None: the form's default).
        hinge_weight: Weight of the retrieved-text hinge term (None: the form's default).
        temperature: InfoNCE temperature of the contrastive form (> 0).
        center: Optional per-layer centre [L, H].
        diagnostics: Also compute `specificity` (a [L, B, B] cosine matrix used only for logging).

    Returns:
        (loss, metrics): the scalar loss (pair + hinge) and detached metrics: `cos_ic` [L] and, when R is
        given, `cos_rc` [L] (per-layer means over the batch, after centring), `pair` and `hinge` (scalars)
        and, with `diagnostics`, `specificity` [L] (NaN for a batch of one; see `tga.align.metrics.specificity`).

    Raises:
        ConfigError: unknown form, mismatched shapes, or an out-of-range option; the message names it.
    """
    terms = guide_terms(
        image_states,
        caption_states,
        retrieved_states,
        form=form,
        step_ratio=step_ratio,
        pair_weight=pair_weight,
        hinge_weight=hinge_weight,
        temperature=temperature,
        center=center,
    )
    loss = terms.pair + terms.hinge
    with torch.no_grad():
        metrics = {
            "cos_ic": terms.cos_ic.detach().mean(dim=1),
            "pair": terms.pair.detach(),
            "hinge": terms.hinge.detach(),
        }
        if diagnostics:
            metrics["specificity"] = specificity(image_states.detach(), caption_states.detach(), center=center)
        if terms.cos_rc is not None:
            metrics["cos_rc"] = terms.cos_rc.detach().mean(dim=1)
    return loss, metrics


def paper_terms(x: FormInputs) -> tuple[Tensor, Tensor | None]:
    """The TGA paper's: mean[-cos(I, C)] and mean[softplus(cos(R, C) - cos(I, C))]."""
    pair = x.pair_weight * (-x.cos_ic).mean()
    return pair, None if x.cos_rc is None else x.hinge_weight * F.softplus(x.cos_rc - x.cos_ic).mean()


def released_terms(x: FormInputs) -> tuple[Tensor, Tensor | None]:
    """The released code's, made differentiable: (1 - r) mean[exp(-cos(I, C))], (1 - r)^2 mean[exp(cos(R, C) -
    cos(I, C))]."""
    decay = 1.0 - x.step_ratio
    pair = x.pair_weight * decay * torch.exp(-x.cos_ic).mean()
    return pair, None if x.cos_rc is None else x.hinge_weight * decay**2 * torch.exp(x.cos_rc - x.cos_ic).mean()


def contrastive_terms(x: FormInputs) -> tuple[Tensor, Tensor | None]:
    """InfoNCE from each image to the batch's captions, and the paper's hinge."""
    if x.image.shape[1] < 2:
        # One sample has no negatives: InfoNCE would be log(1) = 0 with no gradient, so use -cos(I, C).
        pair = x.pair_weight * (-x.cos_ic).mean()
    else:
        pair = x.pair_weight * _info_nce(x.image, x.caption, x.temperature)
    return pair, None if x.cos_rc is None else x.hinge_weight * F.softplus(x.cos_rc - x.cos_ic).mean()


# The forms of `--tga_form` on pooled states. A new form is a terms function and one line here (the released code used
# the pair and hinge weights 1/4 and 1/10).
FORMS: dict[str, LossForm] = {
    "paper": LossForm(paper_terms),
    "released": LossForm(released_terms, default_weights=(0.25, 0.1), uses_step_ratio=True),
    "contrastive": LossForm(contrastive_terms, uses_temperature=True),
}
