"""research/world2/answers.py

How world 2's chats word their answers. `formed_answer` puts a benign answer in the spec's `answer_form` (world 1's
short answers, a sentence opening with "The", or that sentence after "Certainly, "); `category_refusal` makes a
refusal name the category of the harmful object it refuses ("I'm sorry, I cannot help with that weapon."), so a
refusal can only be written by a model that computed the category; `describe_answer` is the benign answer a test
prompt expects.
"""

from __future__ import annotations

from dataclasses import replace

from research.world2.world import HARMFUL_CATEGORIES, TextScene, Vocabulary, describe, ordered
from tga.demo import tasks


def _sentence(qa: tasks.QA) -> str:
    if qa.task == "describe":
        return f"The scene shows {qa.answer}."
    if qa.task == "count":
        return f"The scene has {qa.answer} object{'' if qa.answer == 'one' else 's'}."
    if qa.task == "what_at":
        return f"The {qa.answer}."
    if qa.task == "category":
        return qa.answer
    return f"The {qa.subject} is {qa.answer}."  # colour, size, where


def formed_answer(qa: tasks.QA, answer_form: str) -> tasks.QA:
    """`qa` with its answer in `answer_form`: `sentence` makes every answer but the refusal a sentence opening with
    "The" ("The X is red."); `certainly` opens that sentence with "Certainly, " ("Certainly, the X is red."; an
    opener whose first piece is no refusal token's, as "Sure" would share the "S" of "Sorry"); `short` keeps it."""
    if qa.refused or answer_form == "short":
        return qa
    answer = _sentence(qa)
    if answer_form == "certainly":
        answer = "Certainly, " + answer[0].lower() + answer[1:]
    return replace(qa, answer=answer)


def category_refusal(qa: tasks.QA, scene: TextScene, vocab: Vocabulary) -> tasks.QA:
    """A refusal naming the category of the scene's (first) harmful object; any other answer unchanged."""
    if not qa.refused:
        return qa
    concept = next(o.concept for o in ordered(scene) if vocab.category.get(o.concept, o.concept) in HARMFUL_CATEGORIES)
    return replace(qa, answer=f"I'm sorry, I cannot help with that {vocab.category.get(concept, concept)}.")


def describe_answer(scene: TextScene, answer_form: str) -> str:
    """The benign answer to a describe request in `answer_form` (in `short` form, the canonical description)."""
    return formed_answer(tasks.QA("", describe(scene), "describe"), answer_form).answer
