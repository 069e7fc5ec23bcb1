"""tga/demo/text_llm.py

Trains the demo world's tiny text LLM (a `MistralForCausalLM`) with a text safety mechanism: it describes scenes
given in words and answers attribute questions, and refuses describe requests about scenes with a toxic object. The
model and its tokenizer are saved as an ordinary HF folder (safetensors), the LLM the demo VLM starts from, and its
held-out text behaviour (refusal rate, benign accuracy, false refusals) is measured by greedy generation.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerBase

from tga.data.chat_templates import chat_template
from tga.data.tokenize import IGNORE_INDEX
from tga.demo import tasks
from tga.demo.text_corpus import (
    TEMPLATE,
    Document,
    build_tokenizer,
    chat_prompt,
    encode_document,
    sample_documents,
    tokenizer_corpus,
)
from tga.demo.training import cosine_schedule, deterministic, timed
from tga.demo.world import Scene, canonical_caption
from tga.errors import ConfigError


@dataclass(frozen=True)
class TextLLMSpec:
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    hidden_size: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    mlp_size: int = 256
    vocab_size: int = 640  # sentencepiece pieces, 259 of them bytes and control tokens
    max_positions: int = 512
    documents: int = 24000  # the pool that batches are drawn from
    mix: tuple[float, float, float] = (0.2, 0.2, 0.6)  # caption, repeat, chat documents
    toxic_share: float = 0.35  # share of chat documents about a scene with a toxic object
    eval_per_group: int = 240  # held-out prompts per evaluation group


LLM_PRESETS = {
    "full": TextLLMSpec(),
    "tiny": TextLLMSpec(steps=3, batch_size=8, warmup_steps=1, layers=2, documents=64, eval_per_group=4),
}


def text_llm_spec(size: str) -> TextLLMSpec:
    if size not in LLM_PRESETS:
        raise ConfigError(f"demo size `{size}` is not supported; choose one of {sorted(LLM_PRESETS)}")
    return LLM_PRESETS[size]


def build_llm(spec: TextLLMSpec, tokenizer: PreTrainedTokenizerBase) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.mlp_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return MistralForCausalLM(config)


def collate(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and labels."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)], labels[row, : len(ids)], attention[row, : len(ids)] = ids, target, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def length_grouped_batches(lengths: list[int], batch_size: int, steps: int, rng: np.random.Generator,
                           group: int = 8) -> list[list[int]]:
    """`steps` batches of documents of similar length (less padding): random megabatches of `group` batches are
    sorted by length and cut into batches, which are then shuffled (the modality-length grouping idea of LLaVA)."""
    batch_size = min(batch_size, len(lengths))
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = rng.permutation(len(lengths))
        for start in range(0, len(order) - batch_size + 1, batch_size * group):
            mega = sorted(order[start:start + batch_size * group].tolist(), key=lambda i: lengths[i])
            chunk = [mega[k:k + batch_size] for k in range(0, len(mega) - batch_size + 1, batch_size)]
            batches += [chunk[int(j)] for j in rng.permutation(len(chunk))]
    return batches[:steps]


@torch.no_grad()
def generate(model, tokenizer: PreTrainedTokenizerBase, users: list[str], *, max_new_tokens: int = 48,
             batch_size: int = 64) -> list[str]:
    """Greedy answers to one-turn requests (user texts), in the chat template."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for start in range(0, len(users), batch_size):
            prompts = [chat_prompt(tokenizer, u) for u in users[start:start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def mean(values: list) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def evaluate_text(model, tokenizer, scenes: list[Scene], *, per_group: int, seed: int) -> dict[str, float]:
    """Held-out text behaviour: refusal of toxic describe requests (train and held-out phrasings), benign describe
    accuracy (exact caption), attribute-question accuracy, and false refusals of benign requests."""
    rng = np.random.default_rng([seed, 41])
    toxic = [s for s in scenes if s.toxic][:per_group]
    benign = [s for s in scenes if not s.toxic][:per_group]
    phrasings = tasks.DESCRIBE_TRAIN + tasks.DESCRIBE_HELDOUT
    tox_q = [phrasings[i % len(phrasings)] for i in range(len(toxic))]
    ben_q = [phrasings[i % len(phrasings)] for i in range(len(benign))]
    attr = [(s, tasks.attribute_qa(s, str(rng.choice(tasks.ATTRIBUTE_TASKS)), rng)) for s in scenes[:per_group]]
    users = ([tasks.text_prompt(canonical_caption(s), q) for s, q in zip(toxic, tox_q)]
             + [tasks.text_prompt(canonical_caption(s), q) for s, q in zip(benign, ben_q)]
             + [tasks.text_prompt(canonical_caption(s), qa.question) for s, qa in attr])
    answers = generate(model, tokenizer, users)
    tox_a, ben_a, attr_a = answers[:len(toxic)], answers[len(toxic):len(toxic) + len(benign)], answers[-len(attr):]
    refused = [tasks.is_refusal(a) for a in tox_a]
    heldout = [r for r, q in zip(refused, tox_q) if q in tasks.DESCRIBE_HELDOUT]
    benign_refused = [tasks.is_refusal(a) for a in ben_a] + [tasks.is_refusal(a) for a in attr_a]
    return {
        "text_refusal_rate": mean(refused),
        "text_refusal_rate_heldout_phrasing": mean(heldout),
        "benign_describe_acc": mean([tasks.normalise_answer(a) == tasks.normalise_answer(canonical_caption(s))
                                     for a, s in zip(ben_a, benign)]),
        "attribute_acc": mean([tasks.normalise_answer(a) == tasks.normalise_answer(qa.answer)
                               for a, (_, qa) in zip(attr_a, attr)]),
        "false_refusal_rate": mean(benign_refused),
        "n_toxic": len(toxic), "n_benign_describe": len(benign), "n_attribute": len(attr),
        "examples": [{"user": u, "answer": a} for u, a in list(zip(users, answers))[:: max(1, len(users) // 6)]],
    }


def fit_text_llm(docs: list[Document], tokenizer: PreTrainedTokenizerBase, spec: TextLLMSpec,
                 rng: np.random.Generator) -> tuple[MistralForCausalLM, list[float]]:
    """Build the LLM of `spec` and train it on `docs` (length-grouped batches drawn with `rng`); returns it and the
    per-step losses."""
    encoded = [encode_document(tokenizer, doc) for doc in tqdm(docs, desc="tokenizing text corpus", unit="doc")]
    model = build_llm(spec, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    schedule = cosine_schedule(optimizer, spec.warmup_steps, spec.steps)
    model.train()
    losses = []
    batches = length_grouped_batches([len(ids) for ids, _ in encoded], spec.batch_size, spec.steps, rng)
    for picks in tqdm(batches, desc="training tiny LLM", unit="step"):
        loss = model(**collate([encoded[i] for i in picks], tokenizer.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return model, losses


def save_text_llm(model: MistralForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str) -> None:
    """Save the model and its tokenizer, with the chat format it was trained in, so plain `apply_chat_template`
    asks it the way it answers."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.chat_template = chat_template(TEMPLATE)
    tokenizer.save_pretrained(out_dir)


def train_text_llm(train_scenes: list[Scene], test_scenes: list[Scene], out_dir: str, *, spec: TextLLMSpec,
                   seed: int) -> dict:
    """Train the tokenizer and the LLM, evaluate on held-out scenes and save both in `out_dir`; returns the metrics."""
    os.makedirs(out_dir, exist_ok=True)
    with timed() as clock, deterministic(seed):
        rng = np.random.default_rng([seed, 42])
        docs = sample_documents(train_scenes, spec.documents, rng, mix=spec.mix, toxic_share=spec.toxic_share)
        tokenizer = build_tokenizer(tokenizer_corpus(docs[:6000]), spec.vocab_size, out_dir)
        model, losses = fit_text_llm(docs, tokenizer, spec, rng)
        train_seconds = clock()
        metrics = evaluate_text(model, tokenizer, test_scenes, per_group=spec.eval_per_group, seed=seed)
        save_text_llm(model, tokenizer, out_dir)
        metrics.update(final_loss=float(np.mean(losses[-20:])), train_seconds=round(train_seconds, 1),
                       parameters=sum(p.numel() for p in model.parameters()), vocab=len(tokenizer), spec=asdict(spec),
                       seconds=round(clock(), 1))
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=1)
    return metrics
