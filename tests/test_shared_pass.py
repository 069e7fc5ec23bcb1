"""The caption pass riding the training forward (tga.align.shared_pass): its states equal the separate pass's bit for
bit, the training forward and its gradients are untouched, each layer runs the captions once per forward (gradient
checkpointing included), and where it cannot hold the separate pass is chosen with a one-line notice."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GemmaConfig, GemmaModel, LlamaConfig, LlamaModel, MistralConfig, MistralModel

from tga.align.shared_pass import SharedCaptionPass, caption_pass_mode
from tga.errors import ConfigError
from tga.model.text_states import text_hidden_states

SIZES = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def batches():
    torch.manual_seed(1)
    ids, captions = torch.randint(3, 100, (2, 11)), torch.randint(3, 100, (3, 7))
    attention, caption_attention = torch.ones_like(ids), torch.ones_like(captions)
    attention[1, 8:] = 0
    caption_attention[0, 5:] = 0  # right padding
    caption_attention[2, :2] = 0  # left padding
    return ids, attention, captions, caption_attention


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_class,config", [
    (MistralModel, MistralConfig(**SIZES)),
    (MistralModel, MistralConfig(**SIZES, sliding_window=4)),
    (LlamaModel, LlamaConfig(**SIZES)),
])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_ridden_states_equal_the_separate_pass_and_leave_the_training_step_alone(model_class, config, checkpointing):
    torch.manual_seed(0)
    model = model_class(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, attention, captions, caption_attention = batches()
    plain = model(input_ids=ids, attention_mask=attention).last_hidden_state
    plain.square().mean().backward()
    plain_grads = grads(model)
    for depth in range(1, config.num_hidden_layers + 1):  # the last depth takes the final norm, as the full forward
        with torch.no_grad():
            expected = text_hidden_states(model, captions, caption_attention, depth)
        model.zero_grad(set_to_none=True)
        shared = SharedCaptionPass(model, depth, zero3=False)
        with shared.riding(captions, caption_attention):
            output = model(input_ids=ids, attention_mask=attention).last_hidden_state
        output.square().mean().backward()  # a checkpointed layer recomputes here: no caption state added
        states = shared.take()
        assert len(states) == len(expected) == depth + 1
        assert all(torch.equal(got, want) for got, want in zip(states, expected))
        assert not any(s.requires_grad for s in states)
        assert torch.equal(output, plain)
        assert grads(model).keys() == plain_grads.keys()
        assert all(torch.equal(grads(model)[name], grad) for name, grad in plain_grads.items())
        assert shared.take() is None  # taken once; nothing armed since
        assert not any(getattr(getattr(hook, "func", hook), "__self__", None) is shared  # nothing stays on the model
                       for module in model.modules() for hook in module._forward_hooks.values())


def test_a_forward_without_captions_runs_nothing_and_gives_an_empty_tuple():
    model = MistralModel(MistralConfig(**SIZES)).eval()
    calls = []
    for layer in model.layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    ids, attention, _, _ = batches()
    shared = SharedCaptionPass(model, 2, zero3=False)
    with shared.riding(None, None), torch.no_grad():
        model(input_ids=ids, attention_mask=attention)
    assert shared.take() == () and len(calls) == 4  # the training forward's four layers, nothing more


def test_a_forward_that_stops_below_the_depth_is_an_error():
    model = MistralModel(MistralConfig(**SIZES)).eval()
    _, _, captions, caption_attention = batches()
    shared = SharedCaptionPass(model, 3, zero3=False)
    with shared.riding(captions, caption_attention), torch.no_grad():
        model.embed_tokens(captions)  # a forward that never reaches the decoder layers
    with pytest.raises(RuntimeError, match="ran 0 of the 3 decoder layers"):
        shared.take()


def test_zero3_marks_the_layers_up_to_the_depth_as_leaf_modules():
    from deepspeed.utils import z3_leaf_module

    model = MistralModel(MistralConfig(**SIZES))
    SharedCaptionPass(model, 2, zero3=True)
    assert [z3_leaf_module(layer) for layer in model.layers] == [True, True, False, False]


def test_auto_shares_where_it_can_and_names_why_not():
    mistral, gemma = MistralModel(MistralConfig(**SIZES)), GemmaModel(GemmaConfig(**SIZES, head_dim=8))
    assert caption_pass_mode("auto", bank=False, frozen=False, language_model=mistral) == ("shared", None)
    assert caption_pass_mode("auto", bank=True, frozen=True, language_model=mistral) == ("bank", None)
    assert caption_pass_mode("separate", bank=False, frozen=False, language_model=mistral) == ("separate", None)
    mode, why = caption_pass_mode("auto", bank=False, frozen=False, language_model=gemma)
    assert mode == "separate" and "'gemma'" in why
    mode, why = caption_pass_mode("auto", bank=False, frozen=True, language_model=mistral)
    assert mode == "separate" and "--tga_target frozen" in why
    with pytest.raises(ConfigError, match="--tga_caption_pass shared: the forward of model type 'gemma'"):
        caption_pass_mode("shared", bank=False, frozen=False, language_model=gemma)
    with pytest.raises(ConfigError, match="--tga_caption_pass bank needs --tga_bank"):
        caption_pass_mode("bank", bank=False, frozen=False, language_model=mistral)
    with pytest.raises(ConfigError, match="--tga_caption_pass separate: --tga_bank"):
        caption_pass_mode("separate", bank=True, frozen=True, language_model=mistral)


def test_guide_falls_back_to_the_separate_pass_with_one_notice(tiny_assets, caplog):
    """A frozen-copy target (stage 2, LLM trainable) is a module the training forward never runs."""
    from tga.align.guide import Guide, GuideSettings
    from tga.model.tokenizer import load_tokenizer
    from tga.model.vlm import build_vlm

    tokenizer = load_tokenizer(tiny_assets["llm"])
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    with caplog.at_level(logging.WARNING, logger="tga.align.guide"):
        frozen = Guide(GuideSettings(layers=[1, 2], target="frozen"), model, pad_token_id=tokenizer.pad_token_id)
    notices = [r.getMessage() for r in caplog.records if "caption pass" in r.getMessage()]
    assert frozen.caption_pass == "separate" and frozen.shared is None
    assert len(notices) == 1 and "\n" not in notices[0] and "--tga_target frozen" in notices[0]
    live = Guide(GuideSettings(layers=[1, 2]), model, pad_token_id=tokenizer.pad_token_id)
    assert live.caption_pass == "shared" and live.shared is not None
