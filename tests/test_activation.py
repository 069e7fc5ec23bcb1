"""Activation-layer analysis (Algorithm 1) on tiny Mistral models whose safety layer is set by construction."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from tga.cli import analyze_cmd
from tga.errors import ConfigError, DataError
from tga.safety.activation import analyze_activation, logit_lens, refusal_ranks
from tga.safety.analysis import save_activation
from tga.safety.refusal_tokens import refusal_token_ids
from tga.safety.states import last_token_states, lens_parts

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "Sorry", "Alpha", "Beta"] + [f"w{i}" for i in range(50)] + ["please"]
VOCAB = {word: i for i, word in enumerate(WORDS)}
REFUSAL, RIVAL_A, RIVAL_B = VOCAB["Sorry"], VOCAB["Alpha"], VOCAB["Beta"]
# Toxic "prompts" of different lengths (so the batch is left padded), all ending with the same token.
TEXTS = ["w1 w2 w3 please", "w4 please", "w5 w6 w7 w8 w9 please", "w10 w11 please"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def tiny_model() -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return MistralForCausalLM(config).eval()


@torch.no_grad()
def constructed_model(writes: dict[int, dict[int, float]]) -> MistralForCausalLM:
    """A model whose layer k (1-based) adds exactly `amount` along hidden dim d at the last position.

    All attention and MLP outputs are zero except the listed MLP writes, so the residual stream at the last
    position is the last token's embedding until the first write. Hidden dims 0/1/2 are the lm_head rows of
    "Sorry"/"Alpha"/"Beta" alone (no other token or embedding uses them), so a write along dim 0 raises only the
    refusal token's logit.
    """
    model = tiny_model()
    layers = model.model.layers
    for layer in layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight[:, :3] = 0
    head = model.lm_head.weight
    head[:, :3] = 0
    for token, dim in ((REFUSAL, 0), (RIVAL_A, 1), (RIVAL_B, 2)):
        head[token] = 0
        head[token, dim] = 1.0
    batch = tiny_tokenizer()(["w1 please"], return_tensors="pt")
    for k in sorted(writes):
        # The MLP input of block k at the last position is known exactly: norm(residual), attention adds 0.
        h = model(**batch, output_hidden_states=True).hidden_states[k - 1][0, -1]
        mlp = layers[k - 1].mlp
        n = layers[k - 1].post_attention_layernorm(h)
        z = mlp.act_fn(mlp.gate_proj(n)) * mlp.up_proj(n)
        for dim, amount in writes[k].items():
            mlp.down_proj.weight[dim] = amount * z / z.dot(z)
    return model


def run_analysis(model, rule: str, top_k: int = 5):
    tokenizer = tiny_tokenizer()
    states = last_token_states(model, tokenizer, TEXTS, batch_size=3, chat_format=False)
    return analyze_activation(
        states, lens_parts(model), [REFUSAL], rule=rule, top_k=top_k, tokenizer=tokenizer, texts=TEXTS
    )


@pytest.mark.parametrize("k", [2, 4])
def test_single_write_layer_found_by_both_rules(k):
    model = constructed_model({k: {0: 10.0}})
    for rule in ("paper", "released"):
        result = run_analysis(model, rule)
        assert result.layers == [k] * len(TEXTS)
        assert result.mean_activation_layer == k
        assert result.activated_fraction == 1.0
    # Layers that change nothing tie every token (D = 0): the refusal token is ranked last, not first.
    assert result.mean_rank_per_layer[0] == len(WORDS)
    assert result.mean_rank_per_layer[k - 1] == 1


def test_top_k_rule_fires_earlier_than_top_1():
    # Layer 2 raises "Sorry" but raises two rivals twice as much (rank 3); layer 4 makes "Sorry" top-1.
    model = constructed_model({2: {0: 10.0, 1: 20.0, 2: 20.0}, 4: {0: 200.0}})
    paper = run_analysis(model, "paper")
    released = run_analysis(model, "released", top_k=5)
    assert paper.layers == [4] * len(TEXTS)
    assert released.layers == [2] * len(TEXTS)
    assert paper.mean_rank_per_layer[1] == 3
    assert run_analysis(model, "released", top_k=2).layers == [4] * len(TEXTS)


def test_no_activation_gives_none():
    result = run_analysis(constructed_model({}), "paper")
    assert result.layers == [None] * len(TEXTS)
    assert result.mean_activation_layer is None
    assert result.to_json()["mean_activation_layer"] is None


@torch.no_grad()
def test_logit_lens_matches_hand_computation_and_last_layer_is_normed_once():
    model = tiny_model()
    model.model.norm.weight.uniform_(0.5, 2.0)  # a non-unit norm makes normalising twice visible
    tokenizer = tiny_tokenizer()
    parts = lens_parts(model)
    assert parts.norm is model.model.norm and parts.lm_head is model.lm_head and parts.last_normalized
    states = last_token_states(model, tokenizer, TEXTS, batch_size=4, chat_format=False)
    log_probs = logit_lens(states, parts)

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    out = model(**batch, output_hidden_states=True)
    assert batch["attention_mask"][:, 0].min() == 0  # left padding really happened: last column is last token
    final = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    assert torch.allclose(log_probs[-1], final, atol=1e-5)
    for j in range(len(out.hidden_states) - 1):
        expected = torch.log_softmax(model.lm_head(model.model.norm(out.hidden_states[j][:, -1])), dim=-1)
        assert torch.allclose(log_probs[j], expected, atol=1e-5)
    twice = torch.log_softmax(model.lm_head(model.model.norm(out.hidden_states[-1][:, -1])), dim=-1)
    assert not torch.allclose(twice, final, atol=1e-3)


def test_refusal_ranks_are_pessimistic_under_ties():
    log_probs = torch.zeros(3, 1, 5)
    log_probs[2, 0, 1] = 2.0  # layer 2: token 1 rises alone
    ranks = refusal_ranks(log_probs, [1, 3])
    assert ranks[:, 0].tolist() == [5, 1]


def test_refusal_token_ids_from_tokenizers(mistral_tokenizer_dir):
    from transformers import LlamaTokenizer

    assert refusal_token_ids(tiny_tokenizer(), ["Sorry"]) == [REFUSAL]
    tokenizer = LlamaTokenizer.from_pretrained(mistral_tokenizer_dir)
    ids = refusal_token_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert {"▁Sorry", "Sorry", "▁I", "I"} <= set(pieces)
    with pytest.raises(ConfigError):
        refusal_token_ids(tokenizer, [" "])


def test_activation_outputs_and_cli(tmp_path):
    model = constructed_model({3: {0: 10.0}})
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "toxic.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    analyze_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "analyze",
            "activation",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--refusal_tokens",
            "Sorry",
            "--batch_size",
            "2",
        ]
    )
    assert args.func(args) == 0
    report = json.loads((out / "activation.json").read_text())
    assert report["mean_activation_layer"] == 3
    assert [s["layer"] for s in report["samples"]] == [3] * len(TEXTS)
    assert (out / "activation.png").stat().st_size > 1000

    missing = parser.parse_args(
        ["analyze", "activation", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(out)]
    )
    with pytest.raises(ConfigError, match="nope"):
        missing.func(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_data = parser.parse_args(
        ["analyze", "activation", "--model", str(model_dir), "--data", str(empty), "--out", str(out)]
    )
    with pytest.raises(DataError, match="empty.jsonl"):
        no_data.func(no_data)


def test_save_activation_writes_json_and_plot(tmp_path):
    result = run_analysis(constructed_model({5: {0: 10.0}}), "paper")
    json_path, png_path = save_activation(result, str(tmp_path))
    assert json.loads(open(json_path).read())["mean_activation_layer"] == 5
    assert open(png_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@torch.no_grad()
def test_lens_parts_and_states_of_the_llm_inside_llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = MistralConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=16, patch_size=8)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=VOCAB["<unk>"])).eval()
    model.model.language_model.norm.weight.uniform_(0.5, 2.0)
    parts = lens_parts(model)
    assert parts.norm is model.model.language_model.norm and parts.lm_head is model.lm_head
    tokenizer = tiny_tokenizer()
    states = last_token_states(model, tokenizer, TEXTS, batch_size=2, chat_format=False)
    assert states.shape == (4, len(TEXTS), 32)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    expected = torch.log_softmax(model(**batch).logits[:, -1].float(), dim=-1)
    assert torch.allclose(logit_lens(states, parts)[-1], expected, atol=1e-5)


def test_activation_json_feeds_tga_layers_auto(tmp_path):
    from tga.align.layers import load_activation_layer, parse_layer_spec

    result = run_analysis(constructed_model({5: {0: 10.0}}), "paper")
    json_path, _ = save_activation(result, str(tmp_path))
    activation_layer = load_activation_layer(json_path)
    assert activation_layer == 5
    assert parse_layer_spec("auto", 6, activation_layer)[-1] == 5


def test_template_option_asks_a_plain_llm_in_its_chat_format(tmp_path, monkeypatch):
    """A plain LLM folder without a chat template would see raw text and continue it; --template formats the prompts
    as user turns of the named conversation template."""
    from tga.safety import analysis
    from tga.safety.states import format_user_turns

    model_dir = tmp_path / "model"
    constructed_model({3: {0: 10.0}}).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "toxic.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    seen = []
    real = analysis.last_token_states

    def spy(model, tokenizer, texts, **kwargs):
        seen.append(format_user_turns(tokenizer, texts)[0])
        return real(model, tokenizer, texts, **kwargs)

    monkeypatch.setattr(analysis, "last_token_states", spy)
    analysis.run_activation(str(model_dir), str(data), str(tmp_path / "raw"), refusal_phrases=["Sorry"])
    analysis.run_activation(str(model_dir), str(data), str(tmp_path / "chat"), refusal_phrases=["Sorry"],
                            template="mistral_instruct")
    assert seen[0] == list(TEXTS)
    assert all(p.endswith(f"{t} [/INST]") and "[INST]" in p for p, t in zip(seen[1], TEXTS))


def test_benign_control_that_activates_at_the_same_layer_is_flagged_as_prior(tmp_path, capsys):
    """The constructed write depends only on the last token, as an answer-start prior does: control prompts that end
    the same way activate at the same layer, and the console says the layer may be the prior, not a decision."""
    model_dir = tmp_path / "model"
    constructed_model({3: {0: 10.0}}).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data, control = tmp_path / "toxic.txt", tmp_path / "benign.jsonl"
    data.write_text("\n".join(TEXTS) + "\n")
    control.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("w30 please", "w31 w32 please", "w33 please")))
    parser = argparse.ArgumentParser()
    analyze_cmd.register(parser.add_subparsers(dest="command"))
    common = ["analyze", "activation", "--model", str(model_dir), "--data", str(data), "--refusal_tokens", "Sorry"]
    args = parser.parse_args([*common, "--out", str(tmp_path / "out"), "--control", str(control)])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "out" / "activation.json").read_text())
    assert report["control"]["layers"] == [3, 3, 3] and report["control"]["activated_fraction"] == 1.0
    assert report["control"]["share_per_layer"][2] == 1.0 and report["share_per_layer"][2] == 1.0
    assert report["mean_activation_layer"] == 3  # what --tga_layers auto reads is unchanged by the control
    console = capsys.readouterr().out
    assert "control: 100% of 3 benign prompts activate" in console and "answer-start prior" in console

    plain = parser.parse_args([*common, "--out", str(tmp_path / "plain")])
    assert plain.func(plain) == 0
    assert "control" not in json.loads((tmp_path / "plain" / "activation.json").read_text())
    assert "benign prompts" not in capsys.readouterr().out

    missing = parser.parse_args([*common, "--out", str(tmp_path / "x"), "--control", str(tmp_path / "none.txt")])
    with pytest.raises(DataError, match="none.txt"):
        missing.func(missing)
