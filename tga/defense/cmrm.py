"""tga/defense/cmrm.py

CMRM, cross-modality representation manipulation (Liu et al., "Unraveling and Mitigating Safety Alignment
Degradation of Vision-Language Models", Findings of ACL 2025), dataset-level: the hidden states of image-conditioned
inputs sit shifted, layer by layer, from those of the text-only inputs the LLM was aligned on; `tga calibrate cmrm`
measures that shift once on images with captions (`tga.defense.calibrate`), and at inference the image-conditioned
states are moved back by `alpha` times it, through forward hooks on the decoder layers that are removed when the call
returns (`shifted_states`, a context manager).

Which states move. Layer l's shift was measured on the output of decoder layer l (hidden-state index l, 1..L) at the
last prompt token, the position whose state produces the answer. At inference, in a request with an image, every
position after the image moves: the request tokens that follow it, the assistant prefix, and every generated token,
since these are the states the image conditions and the ones the measured position stands for. Image tokens do not
move (they have no text-only counterpart to be moved toward) and neither do the tokens before the image (causal
attention keeps them equal to a text-only input's); text-only requests are left as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tga.data.tokenize import ROLE_ID
from tga.defense.base import Backend, Images, Reply, cost_of
from tga.errors import ConfigError


@dataclass
class Calibration:
    """The calibrated shift: row l-1 of `shift` is mean(image-conditioned - text-only) of decoder layer l's output."""

    shift: torch.Tensor  # [num_layers, hidden_size], float32
    meta: dict[str, str] = field(default_factory=dict)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({"shift": self.shift.contiguous()}, path, metadata={"method": "cmrm", **self.meta})


def load_calibration(path: str) -> Calibration:
    """Read a `tga calibrate cmrm --out` file (ConfigError naming `--cmrm_file` when it is not one)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise ConfigError(f"--cmrm_file: file not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            shift = handle.get_tensor("shift") if "shift" in handle.keys() else None
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"--cmrm_file {path}: not a safetensors file ({error})") from error
    if shift is None or meta.get("method") != "cmrm" or shift.dim() != 2:
        raise ConfigError(f"--cmrm_file {path}: not a CMRM calibration (write one with `tga calibrate cmrm`)")
    with open(path, "rb") as handle:
        meta["sha256"] = hashlib.sha256(handle.read()).hexdigest()[:16]
    return Calibration(shift.float(), meta)


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """`all`, or indices and inclusive bands of hidden-state indices 1..num_layers (`8-16`, `4,8,12-14`)."""
    if spec.strip() == "all":
        return list(range(1, num_layers + 1))
    layers: set[int] = set()
    try:
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            low, _, high = part.partition("-")
            layers.update(range(int(low), int(high or low) + 1))
    except ValueError as error:
        raise ConfigError(f"--cmrm_layers `{spec}`: expected all, or indices and bands like 8-16 or 4,8") from error
    if not layers or min(layers) < 1 or max(layers) > num_layers:
        raise ConfigError(f"--cmrm_layers `{spec}`: layers must lie in 1..{num_layers} (decoder-layer outputs)")
    return sorted(layers)


def decoder_layers(model) -> Sequence[torch.nn.Module]:
    """The decoder layers of a Llava model's language model (layer l's output is hidden-state index l + 1)."""
    return model.model.language_model.layers


def shift_mask(roles: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which prompt positions move, and which rows hold an image (their generated tokens move too).

    Args:
        roles: [B, T] role ids of left-padded prompts (`ChatModel.padded`).
        attention: [B, T] attention mask.

    Returns:
        positions [B, T] bool (after the row's last image token, not padding) and rows [B] bool.
    """
    is_image = roles == ROLE_ID["image"]
    rows = is_image.any(dim=1)
    index = torch.arange(roles.shape[1]).expand_as(roles)
    last_image = torch.where(is_image, index, torch.full_like(index, -1)).max(dim=1).values
    positions = rows[:, None] & (index > last_image[:, None]) & attention.bool().cpu()
    return positions, rows


@contextlib.contextmanager
def shifted_states(model, shifts: dict[int, torch.Tensor], alpha: float, positions: torch.Tensor,
                   rows: torch.Tensor) -> Iterator[None]:
    """Within the block, subtract `alpha * shifts[l]` from decoder layer l's output at the masked positions.

    Args:
        model: a Llava model.
        shifts: {hidden-state index l (1..L): shift [H]}.
        alpha: the strength (1: the whole calibrated shift).
        positions: [B, T] prompt positions to move (the first forward pass of `generate` sees the whole prompt).
        rows: [B] rows whose later positions (generated tokens, one per cached decoding step) move.
    """
    layers = decoder_layers(model)
    width = positions.shape[1]

    def mask_for(length: int, device: torch.device) -> torch.Tensor:
        if length == width:
            mask = positions
        elif length < width:  # a cached decoding step: the new tokens all follow the image
            mask = rows[:, None].expand(-1, length)
        else:  # no cache: the whole sequence again, prompt then generated tokens
            mask = torch.cat([positions, rows[:, None].expand(-1, length - width)], dim=1)
        return mask.to(device)

    def hook_for(shift: torch.Tensor):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            mask = mask_for(hidden.shape[1], hidden.device)[..., None].to(hidden.dtype)
            moved = hidden - mask * (alpha * shift).to(hidden.device, hidden.dtype)
            return (moved, *output[1:]) if isinstance(output, tuple) else moved

        return hook

    handles = [layers[index - 1].register_forward_hook(hook_for(shift)) for index, shift in sorted(shifts.items())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class CMRM:
    """Answers with the image-conditioned states moved back by alpha x the calibrated shift at the chosen layers.

    Args:
        chat: the `ChatModel` (its model is hooked during each call).
        backend: answers through `chat` (`ChatBackend`).
        calibration: from `load_calibration`.
        alpha: the strength.
        layers: `parse_layers` spec.
    """

    name = "cmrm"

    def __init__(self, chat, backend: Backend, calibration: Calibration, *, alpha: float = 1.0,
                 layers: str = "all") -> None:
        config = chat.model.config.text_config
        expected = (config.num_hidden_layers, config.hidden_size)
        if tuple(calibration.shift.shape) != expected:
            raise ConfigError(f"--cmrm_file: calibrated for {tuple(calibration.shift.shape)} (layers, hidden size), "
                              f"the model has {expected}; calibrate this model with `tga calibrate cmrm`")
        self.chat, self.backend, self.calibration, self.alpha = chat, backend, calibration, alpha
        self.layers = parse_layers(layers, config.num_hidden_layers)

    def settings(self) -> dict:
        return {"defense": self.name, "cmrm_alpha": self.alpha, "cmrm_layers": self.layers,
                "cmrm_calibration": self.calibration.meta.get("sha256")}

    def __call__(self, images: Images, requests: Sequence[str]) -> list[Reply]:
        if not requests:
            return []
        encoded, _ = self.chat.encode(list(images), list(requests))
        _, attention, roles = self.chat.padded(encoded, left=True)  # the layout generate will use
        positions, rows = shift_mask(roles, attention)
        shifts = {layer: self.calibration.shift[layer - 1] for layer in self.layers}
        with shifted_states(self.chat.model, shifts, self.alpha, positions, rows):
            usages = self.backend.generate(images, requests)
        return [Reply(u.text, cost_of([u], u.prompt_tokens)) for u in usages]
