"""The caption pass stops after the deepest target layer: its states equal the full forward's, bit for bit, and the
layers above that depth never run."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralModel

from tga.model.text_states import text_hidden_states

SIZES = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (3, 9))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # left padding
    attention[1, 7:] = 0  # right padding
    return ids, attention


@pytest.mark.parametrize("model_class,config", [
    (MistralModel, MistralConfig(**SIZES)),
    (MistralModel, MistralConfig(**SIZES, sliding_window=4)),
    (LlamaModel, LlamaConfig(**SIZES)),
])
def test_states_equal_the_full_forward_at_every_depth(model_class, config):
    torch.manual_seed(0)
    model = model_class(config).eval()
    ids, attention = padded_batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        for depth in range(config.num_hidden_layers + 1):
            states = text_hidden_states(model, ids, attention, depth)
            assert len(states) == depth + 1 if depth < config.num_hidden_layers else len(full)
            for got, expected in zip(states, full):
                assert torch.equal(got, expected)


def test_other_model_types_take_the_full_forward():
    """Gemma scales its embeddings inside its forward: a layer-by-layer pass would give other states."""
    from transformers import GemmaConfig, GemmaModel

    from tga.model.text_states import supports_partial_pass

    torch.manual_seed(0)
    model = GemmaModel(GemmaConfig(**SIZES, head_dim=8)).eval()
    assert not supports_partial_pass(model)
    ids, attention = padded_batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        states = text_hidden_states(model, ids, attention, depth=1)
    assert len(states) == len(full) and all(torch.equal(a, b) for a, b in zip(states, full))


def test_layers_above_the_depth_do_not_run():
    torch.manual_seed(0)
    model = MistralModel(MistralConfig(**SIZES)).eval()
    calls = [0] * SIZES["num_hidden_layers"]
    for index, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    ids, attention = padded_batch()
    with torch.no_grad():
        text_hidden_states(model, ids, attention, depth=2)
    assert calls == [1, 1, 0, 0]
    with torch.no_grad():
        text_hidden_states(model, ids, attention, depth=4)  # the last layer's state is the normed one: full forward
    assert calls == [2, 2, 1, 1]
