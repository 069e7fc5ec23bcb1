"""research/world2/corpus.py

Demo world 2's files: the text LLM's training corpus (written to disk, so what the LLM learns from can be checked
file by file) and its test prompts. Training documents are category facts (every concept, held-out ones included),
captions and "repeat" documents (every concept; with `first_person_share` some facts and captions are told by a
narrator, "I know that ..."), chats about scenes of *trained* concepts only, whose describe
requests are refused when a scene holds a harmful concept, and category chats ("What kind of thing is the X?" about
any concept of the scene, held-out ones included, answered with its category and never refused). Test prompts ask to
describe held-out scenes, grouped by whether the scene holds a held-out harmful concept, a held-out benign one, or
trained concepts only, in training and held-out wordings (request phrasing and scene description).
"""

from __future__ import annotations

import json
import os

import numpy as np

from research.world2.answers import category_refusal, describe_answer, formed_answer
from research.world2.world import (
    DESCRIBE_HELDOUT,
    FIRST_PERSON_STYLES,
    HELDOUT_STYLES,
    SPLITS,
    TRAIN_STYLES,
    WORDINGS,
    TextScene,
    Vocabulary,
    World2Spec,
    build_vocabulary,
    describe,
    fact_text,
    first_person,
    named_by_category,
    sample_text_scene,
)
from tga.demo import tasks
from tga.demo.datasets import STAGE2_TURNS
from tga.demo.text_corpus import Document
from tga.errors import DataError

TEST_GROUPS = ("heldout_toxic", "heldout_benign", "trained_toxic", "trained_benign")


def _chat_scene(rng: np.random.Generator, scene_id: str, vocab: Vocabulary, spec: World2Spec) -> TextScene:
    """A scene of trained concepts only; with probability `toxic_share` it holds a harmful one."""
    trained = vocab.names(heldout=False)
    if rng.random() < spec.toxic_share:
        harmful = vocab.names(harmful=True, heldout=False)
        return sample_text_scene(rng, scene_id, vocab, spec, pool=trained, include=str(rng.choice(harmful)))
    return sample_text_scene(rng, scene_id, vocab, spec, pool=vocab.names(harmful=False, heldout=False))


def category_question(name: str) -> str:
    return f"What kind of thing is the {name}?"


def _category_chat(rng: np.random.Generator, scene_id: str, vocab: Vocabulary, spec: World2Spec) -> Document:
    """A scene of trained benign concepts plus one concept of any category (held-out ones included), and the question
    what kind of thing that concept is, answered with its category: no refusal, whatever the category."""
    concept = str(rng.choice(list(vocab.category)))
    scene = sample_text_scene(rng, scene_id, vocab, spec, pool=vocab.names(harmful=False, heldout=False),
                              include=concept)
    qa = tasks.QA(category_question(concept), f"The {concept} is a {vocab.category[concept]}.", "category")
    _, styles = WORDINGS[spec.wordings]
    style = str(rng.choice(styles))
    return Document("chat", turns=(formed_answer(qa, spec.answer_form),), scene_text=describe(scene, style))


def training_documents(spec: World2Spec, vocab: Vocabulary) -> list[Document]:
    """The LLM's training text: facts, captions, repeats and chats in the `mix` of the spec."""
    rng = np.random.default_rng([spec.seed, SPLITS["train"]])
    requests, styles = WORDINGS[spec.wordings]
    docs = []
    for index, kind in enumerate(rng.choice(["fact", "caption", "repeat", "chat"], size=spec.documents,
                                            p=list(spec.mix))):
        share = spec.first_person_share  # no draw when 0, so the corpus of a spec without it does not change
        narrated = bool(share) and kind in ("fact", "caption") and rng.random() < share
        if kind == "fact":
            text = fact_text(vocab, rng)
            docs.append(Document("caption", text=first_person(text, rng, fact=True) if narrated else text))
            continue
        if kind == "chat" and rng.random() < spec.category_chat_share:
            docs.append(_category_chat(rng, f"train/{index:06d}", vocab, spec))
            continue
        if kind == "chat":
            scene = _chat_scene(rng, f"train/{index:06d}", vocab, spec)
            if spec.category_scene_share and rng.random() < spec.category_scene_share:
                scene = named_by_category(scene, vocab, rng)
            turns = tuple(tasks.conversation(scene, rng, n_turns=int(rng.choice(STAGE2_TURNS)),
                                             describe_prob=spec.describe_prob, describe_questions=requests))
            turns = tuple(formed_answer(qa, spec.answer_form) for qa in turns)
            if spec.refusal_names_category:
                turns = tuple(category_refusal(qa, scene, vocab) for qa in turns)
            docs.append(Document("chat", turns=turns, scene_text=describe(scene, str(rng.choice(styles)))))
            continue
        scene = sample_text_scene(rng, f"train/{index:06d}", vocab, spec, pool=list(vocab.category))
        if narrated:  # plain text, loss on every token, like every caption
            docs.append(Document("caption", text=first_person(describe(scene, str(rng.choice(FIRST_PERSON_STYLES))),
                                                              rng, fact=False)))
            continue
        text = describe(scene, str(rng.choice(styles)))
        docs.append(Document("caption" if kind == "caption" else "repeat",
                             text=text if kind == "caption" else f"{text}\n{text}"))
    return docs


def document_json(doc: Document) -> dict:
    return {"kind": doc.kind, "text": doc.text, "scene_text": doc.scene_text,
            "turns": [[qa.question, qa.answer, qa.task] for qa in doc.turns]}


def read_documents(path: str) -> list[Document]:
    """Documents of a corpus file written by `write_world2_files` (one JSON object a line)."""
    docs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                row = json.loads(line)
                turns = tuple(tasks.QA(q, a, t) for q, a, t in row["turns"])
                docs.append(Document(row["kind"], text=row["text"], turns=turns, scene_text=row["scene_text"]))
            except (ValueError, KeyError, TypeError) as error:
                raise DataError(f"{path}:{number}: not a world-2 corpus document ({error})") from None
    return docs


def test_prompts(spec: World2Spec, vocab: Vocabulary) -> dict[str, list[dict]]:
    """`n_test` describe requests per group of `TEST_GROUPS`, cycling over training and held-out wordings.

    Each row: {id, scene, text, concept, category, question, question_heldout, style, style_heldout, answer};
    `scene` is the concept (the grouping `tga evaluate dsr` uses), `answer` the canonical description.
    """
    rng = np.random.default_rng([spec.seed, SPLITS["test"]])
    questions = tasks.DESCRIBE_TRAIN[:3] + DESCRIBE_HELDOUT
    styles = TRAIN_STYLES[:2] + HELDOUT_STYLES
    benign_trained = vocab.names(harmful=False, heldout=False)
    targets = {"heldout_toxic": vocab.names(harmful=True, heldout=True),
               "heldout_benign": vocab.names(harmful=False, heldout=True),
               "trained_toxic": vocab.names(harmful=True, heldout=False),
               "trained_benign": benign_trained}
    groups = {}
    for group, names in targets.items():
        rows = []
        for i in range(spec.n_test):
            concept = names[i % len(names)]
            scene = sample_text_scene(rng, f"{group}/{i:04d}", vocab, spec, pool=benign_trained, include=concept)
            # every (question, style) pair once in 24 rows, and both kinds of wording within the first 8
            question, style = questions[i % len(questions)], styles[(i // 2) % len(styles)]
            rows.append({"id": f"{group}-{i:04d}", "scene": concept, "concept": concept,
                         "category": vocab.category[concept],
                         "text": tasks.text_prompt(describe(scene, style), question), "question": question,
                         "question_heldout": question in DESCRIBE_HELDOUT, "style": style,
                         "style_heldout": style in HELDOUT_STYLES,
                         "answer": describe_answer(scene, spec.answer_form)})
        groups[group] = rows
    return groups


def _dump_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_world2_files(out_dir: str, spec: World2Spec) -> dict[str, str]:
    """Write the vocabulary, the training corpus and the test prompts under `out_dir`; returns their paths by name.

    `toxic_text_prompts` / `benign_text_prompts` are the held-out-concept groups (criterion 2 and Algorithm 1).
    """
    vocab = build_vocabulary(spec)
    data = os.path.join(out_dir, "data")
    paths = {"vocabulary": _dump_jsonl(os.path.join(out_dir, "vocabulary.jsonl"), [
        {"name": n, "category": c, "heldout": n in vocab.heldout, "harmful": vocab.harmful(n)}
        for n, c in vocab.category.items()])}
    paths["llm_corpus"] = _dump_jsonl(os.path.join(data, "llm_corpus.jsonl"),
                                      [document_json(d) for d in training_documents(spec, vocab)])
    for group, rows in test_prompts(spec, vocab).items():
        paths[f"{group}_prompts"] = _dump_jsonl(os.path.join(data, f"{group}_prompts.jsonl"), rows)
    paths["toxic_text_prompts"] = paths["heldout_toxic_prompts"]
    paths["benign_text_prompts"] = paths["heldout_benign_prompts"]
    return paths


def read_vocabulary(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
