"""research/world2/two_phase.py: phase A holds no refusal and no answer opening like one, phase B holds the chats,
and safety tuning leaves the embeddings and the blocks below 40% of the depth exactly as phase A left them."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from research.world2.corpus import read_documents, write_world2_files
from research.world2.llm import train_world2_llm, world2_llm_spec
from research.world2.world import world2_spec
from tga.demo import tasks
from tga.demo.text_corpus import build_tokenizer, tokenizer_corpus
from tga.demo.text_llm import build_llm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def research_module():
    from research.world2 import two_phase

    return two_phase


@pytest.fixture(scope="module")
def two_phase():
    return research_module()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    spec = replace(world2_spec("tiny", 3), documents=1500, first_person_share=0.3, answer_form="sentence")
    return write_world2_files(str(tmp_path_factory.mktemp("world2_two_phase")), spec)


def test_phase_a_has_no_refusal_and_no_answer_opening_like_one(two_phase, world):
    docs = read_documents(world["llm_corpus"])
    phase_a, phase_b, _ = two_phase.split_phases(docs)
    opener = two_phase.first_word(tasks.REFUSAL)
    assert opener == "I"
    answers = [turn.answer for doc in phase_a if doc.kind == "chat" for turn in doc.turns]
    assert answers and not any(tasks.is_refusal(a) or two_phase.first_word(a) == opener for a in answers)
    assert all(doc.kind == "chat" for doc in phase_b)
    assert sum(two_phase.refuses(doc) for doc in phase_b) == sum(two_phase.refuses(doc) for doc in docs) > 0
    assert {id(doc) for doc in docs if doc.kind != "chat"} <= {id(doc) for doc in phase_a}  # all plain text in phase A


def test_safety_tuning_trains_only_the_upper_blocks(two_phase, world, tmp_path):
    docs = read_documents(world["llm_corpus"])
    spec = replace(world2_llm_spec("tiny"), layers=5, batch_size=4)
    tokenizer = build_tokenizer(tokenizer_corpus(docs[:600]), spec.vocab_size, str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = build_llm(spec, tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _, chats, _ = two_phase.split_phases(docs)
    losses = two_phase.safety_tune(model, chats[:40], tokenizer, spec, two_phase.PhaseBSpec(steps=3, warmup_steps=1),
                                   np.random.default_rng(0))
    assert len(losses) == 3 and all(np.isfinite(losses))
    first_trained = 2  # ceil(0.4 * 5)
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        lower = "embed_tokens" in name or any(f"layers.{i}." in name for i in range(first_trained))
        if lower:
            assert not changed, name
    upper = [name for name in before if any(f"layers.{i}." in name for i in range(first_trained, 5))]
    assert any(not torch.equal(dict(model.named_parameters())[name], before[name]) for name in upper)
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable


def test_the_two_phase_fit_trains_a_world2_llm_end_to_end(two_phase, world, tmp_path):
    spec = world2_llm_spec("tiny")
    metrics = train_world2_llm(world, str(tmp_path / "llm"), spec=spec, seed=0,
                               fit=two_phase.two_phase_fit(two_phase.PhaseBSpec(steps=2, warmup_steps=1)))
    assert os.path.isfile(tmp_path / "llm" / "model.safetensors")
    assert set(metrics) >= {"heldout_toxic", "heldout_benign", "final_loss"}


def test_the_causal_reading_applies_the_written_rule(two_phase, tmp_path):
    import json

    (tmp_path / "patching").mkdir()
    summary = {"heldout_benign": {"layers": {"1": 30, "3": 5, "none": 200}}}
    report = {"num_layers": 10, "pair_causal_layers": [3] * 9 + [None], "causal_layer": 3,
              "benign_into_benign": {"flip_share": [0.0] * 9 + [0.04]},
              "toxic_into_benign": {"flip_share": [0.02, 0.3] + [0.9] * 8}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "patching" / "patching.json").write_text(json.dumps(report))
    reading = two_phase.causal_reading(str(tmp_path))
    assert reading["criterion_1_prime"] and reading["pairs_in_band"] == 0.9
    assert reading["algorithm1_benign_layer"] == 1 and reading["answer_start_prior"] == "survives"
    report["toxic_into_benign"]["flip_share"][0] = 0.6  # the benign prompts' Algorithm 1 block already decides
    report["benign_into_benign"]["flip_share"][-1] = 0.06
    (tmp_path / "patching" / "patching.json").write_text(json.dumps(report))
    reading = two_phase.causal_reading(str(tmp_path))
    assert reading["answer_start_prior"] == "refuted" and not reading["criterion_1_prime"]
