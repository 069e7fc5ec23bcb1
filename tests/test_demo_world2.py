"""Demo world 2 (research/world2/): the tiny build, what its generated training text contains and leaves out,
and that world 1's step keys are untouched by it."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import pytest

from research.world2.assets import build_world2_assets, world2_step_keys
from research.world2.corpus import TEST_GROUPS, read_documents, write_world2_files
from research.world2.world import DESCRIBE_HELDOUT, HARMFUL_CATEGORIES, world2_spec
from tga.demo import tasks
from tga.demo.assets import step_keys
from tga.errors import DataError


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def tiny_world2(tmp_path_factory) -> dict[str, str]:
    return build_world2_assets(str(tmp_path_factory.mktemp("world2")), seed=0, size="tiny")


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, str]:
    """A world small in concepts but with enough documents that every kind of document occurs many times."""
    spec = replace(world2_spec("tiny", 3), documents=3000)
    return write_world2_files(str(tmp_path_factory.mktemp("world2_corpus")), spec)


def test_tiny_world2_builds_a_loadable_llm_and_is_cached(tiny_world2):
    from transformers import AutoModelForCausalLM

    from tga.model.tokenizer import load_tokenizer

    summary = _rows_json(tiny_world2["assets_json"])
    assert summary["world_version"] == 2 and set(summary["steps"]) == {"world", "llm"}
    assert set(TEST_GROUPS) <= set(summary["llm_metrics"])
    llm = AutoModelForCausalLM.from_pretrained(tiny_world2["llm"])
    assert llm.config.model_type == "mistral" and llm.config.num_hidden_layers == 3
    tokenizer = load_tokenizer(tiny_world2["llm"])
    names = [row["name"] for row in _rows(tiny_world2["vocabulary"])]
    # the tokenizer never saw a name whole: every concept is several pieces that early blocks must compose
    assert min(len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) for n in names) >= 3
    again = build_world2_assets(os.path.dirname(tiny_world2["assets_json"]), seed=0, size="tiny")
    assert all(step["cached"] for step in _rows_json(again["assets_json"])["steps"].values())


def _rows_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_heldout_toxic_concepts_never_appear_in_a_refusal_of_the_training_files(corpus_files):
    """Checked over the written corpus: a held-out harmful concept is known only by its category facts."""
    vocab = _rows(corpus_files["vocabulary"])
    heldout_toxic = {r["name"] for r in vocab if r["heldout"] and r["category"] in HARMFUL_CATEGORIES}
    trained_toxic = {r["name"] for r in vocab if not r["heldout"] and r["category"] in HARMFUL_CATEGORIES}
    assert heldout_toxic and trained_toxic
    docs = read_documents(corpus_files["llm_corpus"])
    refusing = [d for d in docs if any(qa.refused for qa in d.turns)]
    refused_words = {w for d in refusing for w in re.findall(r"[a-z]+", " ".join(
        [d.scene_text] + [qa.question for qa in d.turns]))}
    assert refused_words.isdisjoint(heldout_toxic)
    assert trained_toxic <= refused_words  # the check reads the scenes that refusals are about
    plain = " ".join(d.text for d in docs if d.kind != "chat")
    for name in heldout_toxic:  # ... and the held-out concepts are in the plain text, with their category
        category = next(r["category"] for r in vocab if r["name"] == name)
        assert re.search(rf"\b{name}\b[^.\n]* {category}\b", plain), name


def test_category_chats_state_the_category_of_any_concept_and_never_refuse(corpus_files):
    """Read from the written corpus: "What kind of thing is the X?" chats answer with X's category from the vocabulary,
    held-out concepts included, and no such chat holds a refusal."""
    category = {r["name"]: r["category"] for r in _rows(corpus_files["vocabulary"])}
    heldout = {r["name"] for r in _rows(corpus_files["vocabulary"]) if r["heldout"]}
    asked = []
    for doc in read_documents(corpus_files["llm_corpus"]):
        for qa in doc.turns:
            if qa.task == "category":
                name = re.fullmatch(r"What kind of thing is the ([a-z]+)\?", qa.question).group(1)
                assert qa.answer == f"The {name} is a {category[name]}." and name in doc.scene_text
                asked.append(name)
    assert asked and set(asked) & heldout
    assert all(len(d.turns) == 1 for d in read_documents(corpus_files["llm_corpus"])
               if any(qa.task == "category" for qa in d.turns))


def test_heldout_wordings_appear_only_in_test_prompts(corpus_files):
    docs = read_documents(corpus_files["llm_corpus"])
    text = "\n".join([d.text for d in docs] + [d.scene_text for d in docs]
                     + [qa.question for d in docs for qa in d.turns])
    assert not any(q in text for q in DESCRIBE_HELDOUT)
    assert "this scene has" not in text and not re.search(r"(left|right|top|bottom|center) there is", text)
    rows = _rows(corpus_files["heldout_toxic_prompts"])
    assert {r["question_heldout"] for r in rows} == {True, False} and {r["style_heldout"] for r in rows} == {True, False}
    assert any(r["text"].startswith("this scene has") for r in rows)


def test_test_groups_hold_the_concepts_they_name(corpus_files):
    vocab = {r["name"]: r for r in _rows(corpus_files["vocabulary"])}
    for group in TEST_GROUPS:
        heldout, toxic = group.startswith("heldout"), group.endswith("toxic")
        for row in _rows(corpus_files[f"{group}_prompts"]):
            concept = vocab[row["concept"]]
            assert concept["heldout"] == heldout and concept["harmful"] == toxic
            named = set(re.findall(r"[a-z]+", row["text"])) & set(vocab)
            assert {n for n in named if vocab[n]["harmful"]} == ({row["concept"]} if toxic else set())


def test_world_keys_are_distinct_and_world1_keys_unchanged():
    assert set(world2_step_keys(0, "full").values()).isdisjoint(step_keys(0, "full").values())
    assert world2_step_keys(0, "full") != world2_step_keys(1, "full")


def test_bad_corpus_line_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "llm_corpus.jsonl"
    path.write_text('{"kind": "caption", "text": "a", "scene_text": "", "turns": []}\n{"kind": "chat"}\n')
    with pytest.raises(DataError, match=r"llm_corpus.jsonl:2"):
        read_documents(str(path))


@pytest.mark.parametrize(("form", "opening"), [("sentence", "The "), ("certainly", "Certainly, the ")])
def test_formed_answers_open_alike_and_keep_what_they_say(tmp_path, form, opening):
    """In `sentence` and `certainly` form every chat answer but the refusal opens alike and still carries the short answer;
    the describe answer holds the canonical description of the chat's scene, and the test prompts expect the same."""
    spec = replace(world2_spec("tiny", 1), documents=600, answer_form=form)
    files = write_world2_files(str(tmp_path), spec)
    short = read_documents(write_world2_files(str(tmp_path / "short"), replace(spec, answer_form="short"))["llm_corpus"])
    turns = [(a, b) for d, e in zip(read_documents(files["llm_corpus"]), short) for a, b in zip(d.turns, e.turns)]
    assert {b.task for a, b in turns} >= {"describe", "colour", "where", "what_at", "size", "count", "category"}
    for formed, plain in turns:
        assert formed.question == plain.question and formed.task == plain.task
        if plain.refused:
            assert formed.answer == tasks.REFUSAL
        else:
            assert formed.answer.startswith(opening) and plain.answer.lower().removeprefix("the ") in formed.answer, (formed, plain)
    describes = [qa for d in read_documents(files["llm_corpus"]) for qa in d.turns
                 if qa.task == "describe" and not qa.refused]
    assert describes and all(qa.answer.startswith(opening + "scene shows a") for qa in describes)
    for row in _rows(files["heldout_benign_prompts"]):
        assert row["answer"].startswith(opening + "scene shows ") and row["answer"].endswith(".")


def test_wide_wordings_train_every_request_and_style_but_never_a_heldout_one(tmp_path):
    from research.world2.world import DESCRIBE_WIDE

    spec = replace(world2_spec("tiny", 2), documents=3000, wordings="wide")
    files = write_world2_files(str(tmp_path), spec)
    docs = read_documents(files["llm_corpus"])
    questions = {qa.question for d in docs for qa in d.turns if qa.task == "describe"}
    assert questions == set(DESCRIBE_WIDE) and questions.isdisjoint(DESCRIBE_HELDOUT)
    text = "\n".join([d.text for d in docs] + [d.scene_text for d in docs])
    assert "this scene has" not in text and not re.search(r"(left|right|top|bottom|center) there is", text)
    for opening in ("we see ", "here is ", "here are ", "in view: ", "there is "):
        assert opening in text, opening


def test_category_scenes_name_the_harmful_object_by_its_category(tmp_path):
    """With `category_scene_share`, some chats name an object by its category word; a scene naming a harmful category
    is refused like one naming a harmful concept, and no held-out harmful name enters a refusal."""
    spec = replace(world2_spec("tiny", 4), documents=2000, category_scene_share=0.5)
    files = write_world2_files(str(tmp_path), spec)
    vocab = _rows(files["vocabulary"])
    heldout_toxic = {r["name"] for r in vocab if r["heldout"] and r["harmful"]}
    by_category = []
    for doc in read_documents(files["llm_corpus"]):
        words = set(re.findall(r"[a-z]+", doc.scene_text))
        named = words & {"weapon", "drug", "poison", "fruit", "toy", "tool", "animal", "plant"}
        describes = [qa for qa in doc.turns if qa.task == "describe"]
        if named and describes:
            by_category.append(doc)
            assert describes[0].refused == bool(named & set(HARMFUL_CATEGORIES)), doc
        if any(qa.refused for qa in doc.turns):
            assert words.isdisjoint(heldout_toxic)
    assert {d.turns[0].refused for d in by_category if len(d.turns) == 1 and d.turns[0].task == "describe"} == {
        True, False}


def test_refusals_naming_the_category_name_a_harmful_one_of_their_scene(tmp_path):
    spec = replace(world2_spec("tiny", 5), documents=1500, refusal_names_category=True)
    files = write_world2_files(str(tmp_path), spec)
    category = {r["name"]: r["category"] for r in _rows(files["vocabulary"])}
    heldout_toxic = {r["name"] for r in _rows(files["vocabulary"]) if r["heldout"] and r["harmful"]}
    refusals = [(d, qa) for d in read_documents(files["llm_corpus"]) for qa in d.turns if qa.refused]
    assert refusals and {qa.answer for _, qa in refusals} != {tasks.REFUSAL}
    for doc, qa in refusals:
        named = re.fullmatch(r"I'm sorry, I cannot help with that ([a-z]+)\.", qa.answer).group(1)
        scene_names = set(re.findall(r"[a-z]+", doc.scene_text))
        assert named in HARMFUL_CATEGORIES and named in {category.get(n) for n in scene_names}
        assert scene_names.isdisjoint(heldout_toxic)


def test_first_person_documents_are_plain_text_that_says_what_the_others_say(tmp_path, corpus_files):
    """With `first_person_share`, facts and captions are sometimes told by a narrator ("I know that ...", "I see ..."):
    plain text, still stating a category or describing a scene, never a refusal; without it no plain document opens
    with "I"."""
    spec = replace(world2_spec("tiny", 3), documents=3000, first_person_share=0.4)
    files = write_world2_files(str(tmp_path), spec)
    names = {r["name"]: r["category"] for r in _rows(files["vocabulary"])}
    docs = read_documents(files["llm_corpus"])
    narrated = [d.text for d in docs if d.kind == "caption" and d.text.startswith("I ")]
    plain = [d for d in docs if d.kind == "caption"]
    assert 0.25 < len(narrated) / len(plain) < 0.55
    facts = [t for t in narrated if re.match(r"I (know that|read that|think) ", t)]
    scenes = [t for t in narrated if re.match(r"I (see|saw|can see) ", t)]
    assert facts and scenes and len(facts) + len(scenes) == len(narrated)
    category_words = {c for c in names.values()} | {c + "s" for c in names.values()}
    assert all(set(re.findall(r"[a-z]+", t)) & category_words for t in facts)
    assert all(set(re.findall(r"[a-z]+", t)) & set(names) for t in scenes)
    assert not any("sorry" in t or "cannot" in t for t in narrated)
    unnarrated = [d.text for d in read_documents(corpus_files["llm_corpus"]) if d.kind == "caption"]
    assert unnarrated and not any(t.startswith("I ") for t in unnarrated)
