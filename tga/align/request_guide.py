"""tga/align/request_guide.py

The request-token guide (`--tga_form request`): a direct test of the hypothesis of docs/findings.md that the LLM's
safety judgement is read at the request tokens that follow the image, not at the image tokens. On benign images only
(toxic records stay out of every guide), the states of the request tokens after the image, in the training (image)
pass, are pulled toward the states of the same tokens in a pass where the caption stands in the image's place
(`--tga_caption_context request`), at the target layers. No image safety data is used.

Token pairing: the dataset marks, per sample, the tokens after the image up to the first answer token in the training
input (`request_mask`) and the tokens after the caption in the caption pass (`caption_request_mask`), keeping the
longest common run of equal token ids counted from the end of both spans, so the k-th marked token of one is the
k-th of the other (`request_spans`). A sample whose spans share no token contributes nothing.

Loss, per target layer l, guide sample b with n_b > 0 paired tokens t:
    mean over l and b of  (1 / n_b) sum_t (1 - cos(h_image[l, b, t], sg(h_caption[l, b, t])))
sg = no gradient (the caption pass is the target). Every sample weighs the same, whatever its request length.

Cost note: the paired tokens are selected by boolean masks, which on an accelerator waits for the device once per
target layer (the pooled forms need no such read); index lists built by the collator would remove it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tga.align.batch import GuideBatch
from tga.align.pooling import pool_layers
from tga.errors import DataError


def request_spans(input_ids: Tensor, labels: Tensor, image_mask: Tensor, caption_ids: Tensor,
                  caption_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Masks of the paired request tokens in a training sample and in its caption pass (1-D tensors each).

    The training span runs from after the last image token to before the first answer token (label != -100); the
    caption-pass span from after the last caption token to the end (the pass ends at the generation prompt). Both keep
    only their longest common suffix of equal ids, so tokenisation at the image/caption boundary cannot misalign them.
    """
    request = torch.zeros_like(image_mask, dtype=torch.bool)
    caption_request = torch.zeros_like(caption_mask, dtype=torch.bool)
    image_positions, caption_positions = image_mask.nonzero().flatten(), caption_mask.nonzero().flatten()
    answers = (labels != -100).nonzero().flatten()
    if not image_positions.numel() or not caption_positions.numel():
        return request, caption_request
    start, end = int(image_positions[-1]) + 1, int(answers[0]) if answers.numel() else int(labels.numel())
    caption_start = int(caption_positions[-1]) + 1
    image_span, caption_span = input_ids[start:end].tolist(), caption_ids[caption_start:].tolist()
    shared = 0
    while (shared < min(len(image_span), len(caption_span))
           and image_span[len(image_span) - 1 - shared] == caption_span[len(caption_span) - 1 - shared]):
        shared += 1
    if shared:
        request[end - shared:end] = True
        caption_request[caption_ids.numel() - shared:] = True
    return request, caption_request


def request_token_loss(image_pass, caption_pass, layers: Sequence[int],
                       request_mask: Tensor, caption_request_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The request-token guide loss of the guide samples and its detached metrics.

    Args:
        image_pass: hidden states of the training pass of the guide samples, indexed by layer ([G, T, H] each; a
            sequence or a mapping of layer -> tensor).
        caption_pass: hidden states of their caption pass, indexed the same way ([G, Tc, H] each).
        layers: the target layers (indices into both).
        request_mask: [G, T] paired request tokens in the training pass.
        caption_request_mask: [G, Tc] the same tokens in the caption pass (same count per row, same order).

    Returns:
        (loss, metrics): the scalar loss (an attached zero when no sample has a paired token) and `cos_request` [L],
        the mean cosine of the paired tokens per layer (NaN where there is none).
    """
    counts = request_mask.sum(dim=1)
    if request_mask.shape[0] != caption_request_mask.shape[0]:
        raise DataError(f"request-token guide: {request_mask.shape[0]} samples in the image pass, "
                        f"{caption_request_mask.shape[0]} in the caption pass")
    rows = request_mask.nonzero()[:, 0]  # the sample of each paired token, in the order the masks select them
    present = (counts > 0).to(image_pass[layers[0]].dtype)
    weights = present / present.sum().clamp(min=1)  # each sample with paired tokens weighs the same
    per_layer, cosines = [], []
    for layer in layers:
        image_tokens = image_pass[layer][request_mask]
        caption_tokens = caption_pass[layer][caption_request_mask].detach().to(image_tokens.dtype)
        if image_tokens.shape != caption_tokens.shape:
            raise DataError(f"request-token guide: {image_tokens.shape[0]} request tokens in the image pass against "
                            f"{caption_tokens.shape[0]} in the caption pass (the spans must pair token for token)")
        cosine = F.cosine_similarity(image_tokens.float(), caption_tokens.float(), dim=-1)
        per_sample = torch.zeros_like(present, dtype=torch.float32).index_add(0, rows, 1.0 - cosine)
        per_layer.append((per_sample / counts.clamp(min=1) * weights.float()).sum())
        cosines.append(cosine.detach().sum() / counts.sum() if counts.numel() else cosine.new_tensor(float("nan")))
    loss = torch.stack(per_layer).mean().to(image_pass[layers[0]].dtype)
    with torch.no_grad():
        cos_request = torch.stack(cosines).float()
    return loss, {"cos_request": cos_request}


def request_guide_loss(hidden_states: Sequence[Tensor], caption_pass: Sequence[Tensor] | None, extras: GuideBatch,
                       layers: Sequence[int]) -> tuple[Tensor, dict[str, Tensor]]:
    """The guide term of one micro-batch under `--tga_form request`, with the metrics the other forms log.

    Args:
        hidden_states: the training forward's hidden states ([B, T, H] by layer).
        caption_pass: the caption pass's hidden states of the guide samples, or None when it did not run.
        extras: the batch's guide part (`guide_index`, `request_mask`, `caption_request_mask`, `image_mask`,
            `caption_mask`; tga.align.batch).
        layers: the target layers.

    A micro-batch without guide samples gives an attached zero built from the same layers (under multi-rank ZeRO-3
    the autograd graph must have the same structure on every rank).
    """
    device = hidden_states[0].device
    index = extras.guide_index if extras.guide_index is not None else torch.zeros(0, dtype=torch.long, device=device)
    image_pass = {layer: hidden_states[layer][index] for layer in layers}
    if caption_pass is None or extras.caption_request_mask is None:
        empty = torch.zeros(0, hidden_states[0].shape[1], dtype=torch.bool, device=device)
        loss, _ = request_token_loss(image_pass, image_pass, layers, empty, empty)
        return loss, {}
    loss, metrics = request_token_loss(image_pass, caption_pass, layers, extras.request_mask[index],
                                       extras.caption_request_mask)
    with torch.no_grad():  # the image/caption cosine the other forms optimise, logged for comparison
        images = pool_layers(hidden_states, layers, extras.image_mask)[:, index]
        captions = pool_layers(caption_pass, layers, extras.caption_mask).to(images.dtype)
        metrics["cos_ic"] = F.cosine_similarity(images, captions, dim=-1).mean(dim=1)
    metrics["tga/guide_loss"] = loss.detach()
    return loss, metrics
