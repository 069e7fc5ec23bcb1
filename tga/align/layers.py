"""tga/align/layers.py

Which LLM layers the guide loss aligns. A layer spec names hidden-state indices in the HF convention
(0 = embedding output, j = output of decoder layer j, 1..num_layers): an explicit list, an inclusive
band, all layers, none, or `auto`, a band that ends at the safety activation layer measured by the
activation analysis (the layer where the LLM's refusal starts to form on harmful text). The released
TGA code aligned layers 10..18 of Mistral-7B's 32; `auto` reproduces that band from activation layer 18.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from tga.errors import ConfigError, DataError

_OPTION = "--tga_layers"
ACTIVATION_KEY = "mean_activation_layer"


def _parse_int(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"{_OPTION}: cannot read {text!r} in {spec!r} as a layer index (a non-negative integer)")
    return int(text)


def _parse_text(spec: str, num_layers: int, activation_layer: float | None) -> list[int]:
    text = spec.strip().lower()
    if text in ("", "none"):
        return []
    if text == "all":
        return list(range(1, num_layers + 1))
    if text == "auto":
        return auto_band(num_layers, activation_layer)
    indices: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"{_OPTION}: empty entry in {spec!r}")
        if item.startswith("-"):
            raise ConfigError(f"{_OPTION}: negative layer index {item!r} in {spec!r}; use indices 0..{num_layers}")
        if "-" in item:
            first_text, _, last_text = item.partition("-")
            first, last = _parse_int(first_text.strip(), spec), _parse_int(last_text.strip(), spec)
            if first > last:
                raise ConfigError(f"{_OPTION}: band {item!r} in {spec!r} runs backwards (write it low-high)")
            indices.extend(range(first, last + 1))
        else:
            indices.append(_parse_int(item, spec))
    return indices


def auto_band(num_layers: int, activation_layer: float | None) -> list[int]:
    """The `auto` band: the quarter of the network that ends at the activation layer.

    With a = round(activation_layer) the band is [max(1, a - ceil(num_layers / 4)), a], inclusive. For
    Mistral-7B (32 layers) and activation layer 18 this is 10..18, the band of the released TGA code.

    Args:
        num_layers: Number of decoder layers of the LLM.
        activation_layer: Mean activation layer from the activation analysis (hidden-state index).

    Returns:
        The band as a sorted list of hidden-state indices.

    Raises:
        ConfigError: no activation layer was given, or it lies outside 1..num_layers.
    """
    if activation_layer is None:
        raise ConfigError(
            f"{_OPTION}: 'auto' needs the activation layer; run the activation analysis (`tga analyze`) and pass "
            "its JSON result"
        )
    if not math.isfinite(activation_layer):
        raise ConfigError(f"{_OPTION}: 'auto' got a non-finite activation layer {activation_layer}")
    last = round(activation_layer)
    if not 1 <= last <= num_layers:
        raise ConfigError(
            f"{_OPTION}: 'auto' got activation layer {activation_layer}, outside the model's layers 1..{num_layers}"
        )
    return list(range(max(1, last - math.ceil(num_layers / 4)), last + 1))


def parse_layer_spec(
    spec: str | int | Sequence[int], num_layers: int, activation_layer: float | None = None
) -> list[int]:
    """Turn a target-layer spec into sorted, distinct hidden-state indices.

    Accepted specs (indices are hidden-state indices: 1..num_layers are decoder-layer outputs, 0 the
    embedding output, which is allowed only when named explicitly):

    - "10-18": an inclusive band; "10,12,14": a list; bands and indices mix ("2,5-7").
    - "all": 1..num_layers. "none" or "": no layer (the guide loss is off).
    - "auto": [max(1, a - ceil(num_layers / 4)), a] with a = round(activation_layer), the band that ends
      at the safety activation layer (10..18 for 32 layers and a = 18, the released TGA band).
    - a list (or range) of ints, or a single int.

    Args:
        spec: The spec, as given on the command line or in YAML.
        num_layers: Number of decoder layers of the LLM.
        activation_layer: Mean activation layer, required by "auto" (see `load_activation_layer`).

    Returns:
        The indices, sorted ascending without duplicates.

    Raises:
        ConfigError: malformed spec or an index outside 0..num_layers; the message names `--tga_layers`.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(f"{_OPTION}: the model must have at least one decoder layer, got num_layers={num_layers!r}")
    if isinstance(spec, str):
        indices = _parse_text(spec, num_layers, activation_layer)
    elif isinstance(spec, int) and not isinstance(spec, bool):
        indices = [spec]
    elif isinstance(spec, Sequence):
        indices = list(spec)
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int):
                raise ConfigError(f"{_OPTION}: layer entries must be integers, got {index!r} in {list(spec)!r}")
    else:
        raise ConfigError(f"{_OPTION}: expected a string, an integer or a list of integers, got {spec!r}")
    for index in indices:
        if not 0 <= index <= num_layers:
            raise ConfigError(
                f"{_OPTION}: layer {index} is out of range for a model with {num_layers} decoder layers "
                f"(valid hidden-state indices: 0..{num_layers}, 0 = embeddings)"
            )
    return sorted(set(indices))


def load_activation_layer(path: str | os.PathLike[str]) -> float:
    """Read the mean activation layer from the activation analysis's JSON result.

    Args:
        path: The JSON file written by the activation analysis; it holds `mean_activation_layer`.

    Returns:
        The mean activation layer (a hidden-state index, possibly fractional).

    Raises:
        DataError: the file is missing or not JSON, or the key is absent or not a number; the message names
            the file.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
    except FileNotFoundError as error:
        raise DataError(f"{path}: activation analysis result not found") from error
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the activation analysis result as JSON ({error})") from error
    if not isinstance(result, dict) or ACTIVATION_KEY not in result:
        raise DataError(f"{path}: no {ACTIVATION_KEY!r} key in the activation analysis result")
    value = result[ACTIVATION_KEY]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(
            f"{path}: {ACTIVATION_KEY!r} must be a finite number, got {value!r} (no activation layer was found?)"
        )
    return float(value)
