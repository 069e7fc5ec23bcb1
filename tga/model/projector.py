"""tga/model/projector.py

Vision-to-language projectors built from LLaVA's type strings: `linear`, `mlp{N}x_gelu` (N >= 1 linear layers
with GELU between them; `mlp2x_gelu` is LLaVA-1.5's) and `identity`.

`mlp2x_gelu` is transformers' own `LlavaMultiModalProjector` (keys `linear_1`, `linear_2`), so the default model is
a stock `LlavaForConditionalGeneration` that plain transformers, vLLM and lmms-eval load. Other types keep the same
naming (`linear_1` ... `linear_N`) and are restored by `tga.model.vlm.load_vlm`, which reads `mm_projector_type`
from the saved config.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from tga.errors import ConfigError

DEFAULT_PROJECTOR = "mlp2x_gelu"
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class MLPProjector(nn.Module):
    """`depth` linear layers with GELU between; layer k is `linear_k` (1-based), as in HF Llava's projector."""

    def __init__(self, in_features: int, out_features: int, depth: int, bias: bool = True):
        super().__init__()
        self.depth = depth
        for k in range(1, depth + 1):
            setattr(self, f"linear_{k}", nn.Linear(in_features if k == 1 else out_features, out_features, bias=bias))
        self.act = nn.GELU()

    def forward(self, features):
        for k in range(1, self.depth + 1):
            features = getattr(self, f"linear_{k}")(features if k == 1 else self.act(features))
        return features


def projector_depth(projector_type: str) -> int:
    """Number of linear layers of a projector type (0 for identity)."""
    if projector_type == "identity":
        return 0
    if projector_type == "linear":
        return 1
    match = _MLP.match(projector_type)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(
            f"--mm_projector_type `{projector_type}` is not supported; use linear, identity or mlp{{N}}x_gelu"
        )
    return int(match.group(1))


def build_projector(projector_type: str, config: LlavaConfig) -> nn.Module:
    """A freshly initialised projector of the given type for a Llava config."""
    depth = projector_depth(projector_type)
    in_features, out_features = config.vision_config.hidden_size, config.text_config.hidden_size
    if depth == 0:
        if in_features != out_features:
            raise ConfigError(
                f"--mm_projector_type identity needs equal vision and LLM widths, got {in_features} and {out_features}"
            )
        return nn.Identity()
    if depth == 2:
        return LlavaMultiModalProjector(config)
    return MLPProjector(in_features, out_features, depth, bias=config.multimodal_projector_bias)


LLAVA_PROJECTOR_KEY = re.compile(r"^(?:model\.)?mm_projector\.(\d+)\.(weight|bias)$")


def llava_projector_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """LLaVA projector tensors (`model.mm_projector.{i}.*`) renamed to ours, and the keys that are not such tensors.

    LLaVA's projector is nn.Sequential(Linear, GELU, Linear, ...): Linear k sits at index 2(k-1).
    """
    converted, unknown = {}, []
    for key, tensor in state.items():
        match = LLAVA_PROJECTOR_KEY.match(key)
        if match is None:
            unknown.append(key)
        else:
            converted[f"linear_{int(match.group(1)) // 2 + 1}.{match.group(2)}"] = tensor
    return converted, unknown
