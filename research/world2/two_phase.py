"""research/world2/two_phase.py

World 2, design "knowledge first, safety after" (docs/demo_world.md, pre-registered there before its runs). Research
code, outside the installed package until its criteria adopt it.

A real LLM knows what a weapon is long before it is taught to refuse. The one-phase world-2 designs learned both from
one corpus at once; this one trains in two phases on the same world-2 corpus:

- Phase A (pretraining): every document except the chats that refuse, and except any chat with an answer whose first
  word is the refusal's first word ("I"), so that no answer of phase A opens like a refusal.
- Phase B (safety tuning): the chats only (the refusals on the trained harmful members, with the benign and attribute
  chats), updating the blocks from 40% of the depth up, the final norm and the LM head; the embeddings and the lower
  blocks stay frozen, so the refusal cannot be decided in the first block.

    python -m research.world2.two_phase --out runs/w2_two_phase_s0 --seed 0 \\
        --world '{"wordings": "wide", ...}' --llm '{"steps": 2000}' [--phase_b '{"steps": 500}']

Measured with the same code as every world-2 variant (research/world2/variant.py `measure`, criteria of
research/world2/criteria.py); its `--table` and `--spread` read the output folders. The causal check: pairs from
`tga analyze patching-pairs --data OUT/world/data/heldout_toxic_prompts.jsonl --vocabulary OUT/world/vocabulary.jsonl`,
`tga analyze patching --model OUT/llm --template mistral_instruct --out OUT/patching`, then `--read`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from tqdm import tqdm

from tga.demo import tasks
from tga.demo.text_corpus import Document, encode_document
from tga.demo.text_llm import TextLLMSpec, collate, fit_text_llm, length_grouped_batches
from tga.demo.training import cosine_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class PhaseBSpec:
    """Safety tuning: steps, learning rate and warmup of the chats-only phase, and the depth from which blocks train."""

    steps: int = 500
    lr: float = 5e-4
    warmup_steps: int = 25
    from_depth: float = 0.4


def first_word(text: str) -> str:
    match = re.match(r"\s*([A-Za-z]+)", text)
    return match.group(1) if match else ""


def refuses(doc: Document) -> bool:
    return doc.kind == "chat" and any(tasks.is_refusal(turn.answer) for turn in doc.turns)


def split_phases(docs: list[Document]) -> tuple[list[Document], list[Document], int]:
    """(phase A documents, phase B documents, how many non-refusing chats phase A left out because an answer opens
    with the refusal's first word)."""
    opener = first_word(tasks.REFUSAL)
    phase_a, phase_b, left_out = [], [], 0
    for doc in docs:
        if doc.kind == "chat":
            phase_b.append(doc)
            if refuses(doc):
                continue
            if any(first_word(turn.answer) == opener for turn in doc.turns):
                left_out += 1
                continue
        phase_a.append(doc)
    return phase_a, phase_b, left_out


def trainable_from(model, from_depth: float) -> list[str]:
    """Freeze the embeddings and the blocks below `from_depth` of the depth; returns the names left trainable."""
    blocks = model.model.layers
    first = int(np.ceil(from_depth * len(blocks)))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in [*blocks[first:], model.model.norm, model.lm_head]:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def safety_tune(model, docs: list[Document], tokenizer, spec: TextLLMSpec, phase_b: PhaseBSpec,
                rng: np.random.Generator) -> list[float]:
    """Phase B: train the upper part of `model` on the chat documents; returns the per-step losses."""
    trainable_from(model, phase_b.from_depth)
    encoded = [encode_document(tokenizer, doc) for doc in tqdm(docs, desc="tokenizing phase-B chats", unit="doc")]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=phase_b.lr, weight_decay=spec.weight_decay)
    schedule = cosine_schedule(optimizer, phase_b.warmup_steps, phase_b.steps)
    model.train()
    losses = []
    for picks in tqdm(length_grouped_batches([len(ids) for ids, _ in encoded], spec.batch_size, phase_b.steps, rng),
                      desc="safety tuning (phase B)", unit="step"):
        loss = model(**collate([encoded[i] for i in picks], tokenizer.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return losses


def two_phase_fit(phase_b: PhaseBSpec):
    """A `fit(docs, tokenizer, spec, rng)` for `train_world2_llm`: phase A for `spec.steps`, then phase B."""

    def fit(docs, tokenizer, spec, rng):
        phase_a, chats, left_out = split_phases(docs)
        print(f"phase A: {len(phase_a)} documents ({len(docs) - len(phase_a)} chats left out, {left_out} of them "
              f"for an answer opening like the refusal); phase B: {len(chats)} chats")
        model, losses = fit_text_llm(phase_a, tokenizer, spec, rng)
        return model, losses + safety_tune(model, chats, tokenizer, spec, phase_b, rng)

    return fit


def causal_reading(run: str) -> dict:
    """The causal check of a measured run read by the rule of docs/demo_world.md: criterion 1' (>= 90% of pairs decided
    in 30-70% of the depth, control <= 5%) and the answer-start-prior test at Algorithm 1's commonest benign layer.

    Args:
        run: a measured variant folder holding `summary.json` and `patching/patching.json` (`tga analyze patching`).
    """
    with open(os.path.join(run, "summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    with open(os.path.join(run, "patching", "patching.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    depth, pairs = report["num_layers"], report["pair_causal_layers"]
    in_band = sum(1 for layer in pairs if layer is not None and 0.3 <= layer / depth <= 0.7) / len(pairs)
    control = max(report["benign_into_benign"]["flip_share"])
    benign = {int(k): v for k, v in summary["heldout_benign"]["layers"].items() if k != "none"}
    mode = max(benign, key=benign.get) if benign else None
    at_mode = report["toxic_into_benign"]["flip_share"][mode - 1] if mode else None
    causal = report["causal_layer"]
    prior = (None if mode is None else "refuted" if at_mode >= 0.5 else
             "survives" if causal is not None and causal > mode else "not shown (no later causal layer)")
    return {"causal_layer": causal, "pairs_in_band": in_band, "control_max": control,
            "criterion_1_prime": in_band >= 0.9 and control <= 0.05, "algorithm1_benign_layer": mode,
            "flips_at_that_layer": at_mode, "answer_start_prior": prior}


def variant_measure():
    """`measure` of research/world2/variant.py, every world-2 variant's measurement."""
    from research.world2.variant import measure

    return measure


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the run (world files, LLM, activation, summary.json)")
    parser.add_argument("--seed", type=int, default=0, help="world and training seed")
    parser.add_argument("--world", default="{}", help="JSON of World2Spec fields to change")
    parser.add_argument("--llm", default="{}", help="JSON of TextLLMSpec fields to change (phase A)")
    parser.add_argument("--phase_b", default="{}", help="JSON of PhaseBSpec fields to change")
    parser.add_argument("--read", action="store_true",
                        help="only read the causal check of --out (after `tga analyze patching --out OUT/patching`)")
    args = parser.parse_args(argv)
    if args.read:
        print(json.dumps(causal_reading(args.out), indent=1))
        return 0
    changes = json.loads(args.phase_b)
    unknown = sorted(set(changes) - {f.name for f in fields(PhaseBSpec)})
    if unknown:
        parser.error(f"--phase_b: PhaseBSpec has no field {', '.join(unknown)}")
    phase_b = replace(PhaseBSpec(), **changes)
    summary = variant_measure()(args.out, args.world, args.llm, args.seed, fit=two_phase_fit(phase_b),
                                design={"two_phase": asdict(phase_b)})
    print(json.dumps({group: summary[group]["refusal"] for group in ("heldout_toxic", "heldout_benign")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
