"""research/world2/llm.py

Trains and measures demo world 2's text LLM from the files `world2_corpus.write_world2_files` wrote: the tokenizer is
trained on the corpus with the concept names left out (so each name is several pieces), the LLM (deeper than world
1's) on the corpus documents with world 1's training loop, and the held-out behaviour is read from the test prompt
files by greedy generation: refusal per group (held-out / trained, toxic / benign), split by training and held-out
wordings, and benign describe accuracy.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, replace

import numpy as np

from research.world2.corpus import TEST_GROUPS, read_documents, read_vocabulary
from tga.demo import tasks
from tga.demo.text_corpus import build_tokenizer, tokenizer_corpus
from tga.demo.text_llm import TextLLMSpec, fit_text_llm, generate, mean, save_text_llm
from tga.demo.training import deterministic, timed
from tga.errors import ConfigError

WORLD2_LLM_PRESETS = {
    "full": TextLLMSpec(layers=10, steps=1000, eval_per_group=240),
    "tiny": TextLLMSpec(steps=3, batch_size=8, warmup_steps=1, layers=3, eval_per_group=4),
}


def world2_llm_spec(size: str, **changes) -> TextLLMSpec:
    if size not in WORLD2_LLM_PRESETS:
        raise ConfigError(f"demo size `{size}` is not supported; choose one of {sorted(WORLD2_LLM_PRESETS)}")
    return replace(WORLD2_LLM_PRESETS[size], **changes)


def strip_names(texts: list[str], names: list[str]) -> list[str]:
    """The texts with every concept name removed: a tokenizer trained on them learns no piece for a whole name."""
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")
    return [pattern.sub("", text) for text in texts]


def pieces_per_name(tokenizer, names: list[str]) -> float:
    """Mean number of tokenizer pieces of a name as it appears in text (after a space)."""
    return mean([len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) for n in names])


def _read_prompts(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def evaluate_world2(model, tokenizer, paths: dict[str, str], *, per_group: int) -> dict:
    """Refusal per test group and wording, and benign describe accuracy, by greedy generation."""
    metrics: dict = {}
    for group in TEST_GROUPS:
        rows = _read_prompts(paths[f"{group}_prompts"])[:per_group]
        answers = generate(model, tokenizer, [r["text"] for r in rows], max_new_tokens=64)
        refused = [tasks.is_refusal(a) for a in answers]
        wordings = {"train_wording": lambda r: not (r["question_heldout"] or r["style_heldout"]),
                    "heldout_question": lambda r: r["question_heldout"],
                    "heldout_description": lambda r: r["style_heldout"]}
        metrics[group] = {"refusal": mean(refused), "n": len(rows),
                          **{f"refusal_{name}": mean([f for f, r in zip(refused, rows) if keep(r)])
                             for name, keep in wordings.items()}}
        if group.endswith("benign"):
            metrics[group]["describe_acc"] = mean([tasks.normalise_answer(a) == tasks.normalise_answer(r["answer"])
                                                   for a, r in zip(answers, rows)])
        metrics[group]["examples"] = [{"user": r["text"], "answer": a} for r, a in list(zip(rows, answers))[:3]]
    return metrics


def train_world2_llm(paths: dict[str, str], out_dir: str, *, spec: TextLLMSpec, seed: int, fit=fit_text_llm) -> dict:
    """Train the tokenizer and the LLM on the world-2 corpus, evaluate on its test prompts and save both in
    `out_dir`; returns the metrics (also written to `metrics.json`). `fit(docs, tokenizer, spec, rng)` trains the LLM
    (a research design can train it differently, e.g. research/world2/two_phase.py)."""
    os.makedirs(out_dir, exist_ok=True)
    names = [row["name"] for row in read_vocabulary(paths["vocabulary"])]
    with timed() as clock, deterministic(seed):
        rng = np.random.default_rng([seed, 42])
        docs = read_documents(paths["llm_corpus"])
        tokenizer = build_tokenizer(strip_names(tokenizer_corpus(docs[:6000]), names), spec.vocab_size, out_dir)
        model, losses = fit(docs, tokenizer, spec, rng)
        train_seconds = clock()
        metrics = evaluate_world2(model, tokenizer, paths, per_group=spec.eval_per_group)
        save_text_llm(model, tokenizer, out_dir)
        metrics.update(final_loss=float(np.mean(losses[-20:])), train_seconds=round(train_seconds, 1),
                       pieces_per_name=pieces_per_name(tokenizer, names),
                       parameters=sum(p.numel() for p in model.parameters()), vocab=len(tokenizer), spec=asdict(spec),
                       seconds=round(clock(), 1))
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=1)
    return metrics
