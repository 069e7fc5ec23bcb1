"""Tests of tga.align.pooling (masked means of hidden states) and tga.align.layers (target-layer specs)."""

from __future__ import annotations

import json

import pytest
import torch

from tga.align import load_activation_layer, masked_mean, parse_layer_spec, pool_layers
from tga.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------- pooling


def _direct_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean over True positions by explicit loops (zeros for an empty row)."""
    rows = []
    for b in range(hidden.shape[0]):
        picked = [hidden[b, t].float() for t in range(hidden.shape[1]) if mask[b, t]]
        rows.append(torch.stack(picked).mean(0) if picked else torch.zeros(hidden.shape[2]))
    return torch.stack(rows)


def _padded_masks(lengths: list[int], total: int, left: bool) -> torch.Tensor:
    mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for b, length in enumerate(lengths):
        if left:
            mask[b, total - length :] = True
        else:
            mask[b, :length] = True
    return mask


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_masked_mean_excludes_padding(left):
    mask = _padded_masks([5, 2, 7], total=7, left=left)
    hidden = torch.randn(3, 7, 6)
    # Padding carries huge values: any leak into the mean shows up at once.
    hidden = torch.where(mask.unsqueeze(-1), hidden, torch.full_like(hidden, 1e6))
    pooled = masked_mean(hidden, mask)
    assert pooled.shape == (3, 6)
    assert pooled.abs().max() < 10
    torch.testing.assert_close(pooled, _direct_mean(hidden, mask))


def test_masked_mean_span_in_the_middle():
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 3:6] = True  # e.g. image tokens between a prompt prefix and the question
    mask[1, [1, 4, 8]] = True
    hidden = torch.randn(2, 9, 4)
    torch.testing.assert_close(masked_mean(hidden, mask), _direct_mean(hidden, mask))


def test_masked_mean_empty_row_gives_zeros_and_finite_grads():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    pooled = masked_mean(hidden, mask)
    assert torch.equal(pooled[1], torch.zeros(4))
    pooled.pow(2).sum().backward()
    assert torch.isfinite(hidden.grad).all()
    assert torch.equal(hidden.grad[1], torch.zeros(3, 4))
    assert torch.equal(hidden.grad[0, 2], torch.zeros(4))  # unmasked position of a valid row
    assert hidden.grad[0, :2].abs().sum() > 0


def test_masked_mean_accepts_integer_masks_and_checks_shapes():
    hidden = torch.randn(2, 4, 3)
    int_mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    torch.testing.assert_close(masked_mean(hidden, int_mask), masked_mean(hidden, int_mask.bool()))
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(hidden, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden states"):
        masked_mean(torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool))


def test_pool_layers_selects_hf_indices_in_order():
    # A fake HF tuple: index 0 = embeddings, j = decoder layer j; each layer filled with its own index.
    states = tuple(torch.full((2, 5, 3), float(j)) + torch.randn(2, 5, 3) * 0.01 for j in range(5))
    mask = _padded_masks([3, 5], total=5, left=True)
    pooled = pool_layers(states, [4, 0, 2], mask)
    assert pooled.shape == (3, 2, 3)
    for row, index in enumerate([4, 0, 2]):
        torch.testing.assert_close(pooled[row], _direct_mean(states[index], mask))


def test_pool_layers_computes_float32_from_half_precision_and_keeps_grad():
    mask = _padded_masks([4, 2], total=6, left=False)
    states = [torch.randn(2, 6, 8).to(torch.bfloat16).requires_grad_() for _ in range(3)]
    pooled = pool_layers(states, [1, 2], mask)
    assert pooled.dtype == torch.float32
    # Same numbers as pooling float32 copies of the bf16 values (no bf16 rounding of the sums).
    expected = torch.stack([_direct_mean(states[j].detach().float(), mask) for j in (1, 2)])
    torch.testing.assert_close(pooled, expected, rtol=1e-6, atol=1e-6)
    pooled.sum().backward()
    assert states[1].grad is not None and states[1].grad.dtype == torch.bfloat16
    assert states[1].grad.abs().sum() > 0
    assert states[0].grad is None  # layer 0 was not selected


def test_pool_layers_rejects_bad_layers():
    states = tuple(torch.randn(1, 3, 2) for _ in range(3))
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match="--tga_layers.*layer 3 is out of range"):
        pool_layers(states, [1, 3], mask)
    with pytest.raises(ConfigError, match="--tga_layers.*no target layers"):
        pool_layers(states, [], mask)


# ---------------------------------------------------------------------------------------------- layer specs


@pytest.mark.parametrize(
    ("spec", "num_layers", "expected"),
    [
        ("10-18", 32, list(range(10, 19))),
        ("10,12,14", 32, [10, 12, 14]),
        ("2,5-7", 8, [2, 5, 6, 7]),
        (" 3 - 5 ", 8, [3, 4, 5]),
        ("14,10,12,12", 32, [10, 12, 14]),
        ("0,1", 4, [0, 1]),
        ("all", 4, [1, 2, 3, 4]),
        ("ALL", 2, [1, 2]),
        ("none", 32, []),
        ("", 32, []),
        ([3, 1, 3], 6, [1, 3]),
        (range(2, 5), 6, [2, 3, 4]),
        ((6,), 6, [6]),
        (4, 6, [4]),
        ([], 6, []),
    ],
)
def test_parse_layer_spec_accepted_forms(spec, num_layers, expected):
    assert parse_layer_spec(spec, num_layers) == expected


@pytest.mark.parametrize(
    ("num_layers", "activation", "expected"),
    [
        (32, 18, list(range(10, 19))),  # the released band for Mistral-7B
        (32, 17.6, list(range(10, 19))),  # rounded
        (32, 4, [1, 2, 3, 4]),  # clipped at layer 1
        (6, 4, [2, 3, 4]),
        (6, 1, [1]),
        (40, 20.2, list(range(10, 21))),
    ],
)
def test_parse_layer_spec_auto_band(num_layers, activation, expected):
    assert parse_layer_spec("auto", num_layers, activation_layer=activation) == expected


@pytest.mark.parametrize(
    ("spec", "num_layers", "activation", "message"),
    [
        ("18-10", 32, None, "runs backwards"),
        ("a-b", 32, None, "cannot read"),
        ("1,,2", 32, None, "empty entry"),
        ("ten", 32, None, "cannot read 'ten'"),
        ("1.5", 32, None, "cannot read"),
        ("-1", 32, None, "negative layer index"),
        ("33", 32, None, "layer 33 is out of range"),
        ("30-40", 32, None, "layer 33 is out of range"),
        ([33], 32, None, "out of range"),
        ([-1], 32, None, "out of range"),
        ([1.5], 32, None, "must be integers"),
        ([True], 32, None, "must be integers"),
        (None, 32, None, "expected a string"),
        ({"a": 1}, 32, None, "expected a string"),
        ("auto", 32, None, "needs the activation layer"),
        ("auto", 32, 0.2, "outside the model's layers"),
        ("auto", 32, 40, "outside the model's layers"),
        ("auto", 32, float("nan"), "non-finite"),
        ("all", 0, None, "at least one decoder layer"),
    ],
)
def test_parse_layer_spec_errors_name_the_option(spec, num_layers, activation, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_layer_spec(spec, num_layers, activation_layer=activation)
    assert "--tga_layers" in str(info.value)


def test_load_activation_layer_reads_the_analysis_result(tmp_path):
    path = tmp_path / "activation.json"
    path.write_text(json.dumps({"mean_activation_layer": 18.25, "per_prompt": [18, 19, 18, 18]}))
    assert load_activation_layer(path) == 18.25
    assert parse_layer_spec("auto", 32, load_activation_layer(str(path))) == list(range(10, 19))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "cannot read"),
        (json.dumps({"activation_layer": 18}), "no 'mean_activation_layer' key"),
        (json.dumps([18]), "no 'mean_activation_layer' key"),
        (json.dumps({"mean_activation_layer": None}), "finite number"),
        (json.dumps({"mean_activation_layer": "18"}), "finite number"),
    ],
)
def test_load_activation_layer_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "result.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_activation_layer(path)
    assert str(path) in str(info.value)
