"""tga/safety/patching.py

Where an LLM decides to refuse, causally: activation patching of the residual stream on matched prompt pairs.

A pair is two prompts that differ only in one concept (a toxic name against a benign one, same scene and wording).
Run clean, the toxic prompt is refused and the benign one is not. For each decoder block j, the block's output (the
residual stream after block j, HF's `hidden_states[j]`) at the prompt's last token (or over the concept's tokens) is
copied from one prompt of the pair into the other's forward pass, and the greedy answer is read again:

- toxic into benign: does the benign prompt now get refused? The earliest block where this flips at least half of
  the pairs is the *causal layer*: from there on, the state at that position carries the refusal;
- benign into toxic: does the toxic prompt stop being refused?
- benign into benign (control): another pair's benign prompt patched into this one; flips here mean the patch
  itself, not the concept, changes answers.

Besides the flip, each patched run gives the change in the log-probability that the answer opens with a refusal token
(at the first answer position). The patch is applied to the prompt's forward pass only; the answer's own tokens run
unpatched, as in the literature's "patch the prompt, read the generation".

`PatchingModel` wraps a plain HF causal LM or a tga VLM (text-only prompts through its chat template) behind one
interface: encode prompts, read every block's states, generate greedily under a patch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tga.errors import DataError

DIRECTIONS = ("toxic_into_benign", "benign_into_toxic", "benign_into_benign")
CAUSAL_SHARE = 0.5  # the causal layer flips at least this share of the pairs (toxic into benign)


@dataclass
class Encoded:
    """A left-padded batch of prompts: ids and attention [B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class PatchingModel:
    """A causal LM (or the LLM inside a VLM) with hooks to overwrite one block's output at chosen positions.

    Args:
        model: an HF `*ForCausalLM` or `LlavaForConditionalGeneration` (text-only prompts).
        tokenizer: its tokenizer (pad and eos ids).
        encode: prompts -> `Encoded` (left padded, formatted as single user turns, as the analyses ask them).
    """

    def __init__(self, model: nn.Module, tokenizer, encode: Callable[[Sequence[str]], Encoded]):
        self.model, self.tokenizer, self.encode = model.eval(), tokenizer, encode
        self.blocks = model.get_decoder().layers
        self.device = next(model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @torch.no_grad()
    def states(self, batch: Encoded) -> torch.Tensor:
        """Every block's output at every position, [L+1, B, T, H] (index 0 = embeddings), read from the prompt's pass
        of a greedy generation: the same computation (positions of a left-padded row included) that a patched
        `answer` runs, so a prompt patched with its own states answers exactly as before."""
        captured: list[torch.Tensor | None] = [None] * (self.num_layers + 1)

        def keep(index):
            def hook(module, inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                if hidden.shape[1] > 1 and captured[index] is None:
                    captured[index] = hidden.detach()
            return hook

        modules = [self.model.get_input_embeddings(), *self.blocks]
        handles = [module.register_forward_hook(keep(index)) for index, module in enumerate(modules)]
        try:
            self.model.generate(input_ids=batch.input_ids.to(self.device),
                                attention_mask=batch.attention_mask.to(self.device), max_new_tokens=1, do_sample=False,
                                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(captured)

    @contextlib.contextmanager
    def patched(self, layer: int, positions: torch.Tensor, values: torch.Tensor):
        """Inside the block, block `layer` (1-based) writes `values` [B, P, H] at `positions` [B, P] of the prompt's
        forward pass (a pass over more than one position; generated tokens run one at a time and stay unpatched)."""
        rows = torch.arange(positions.shape[0], device=self.device).unsqueeze(1)

        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] <= 1:
                return output
            hidden = hidden.clone()
            hidden[rows, positions.to(self.device)] = values.to(hidden.device, hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = self.blocks[layer - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def answer(self, batch: Encoded, opener_ids: Sequence[int], max_new_tokens: int) -> tuple[list[str], torch.Tensor]:
        """Greedy answers and log P(the answer opens with a refusal token) at the first answer position, [B]."""
        output = self.model.generate(
            input_ids=batch.input_ids.to(self.device), attention_mask=batch.attention_mask.to(self.device),
            max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        first = torch.log_softmax(output.scores[0].float(), dim=-1)
        opener = torch.logsumexp(first[:, list(opener_ids)], dim=-1).cpu()
        new = output.sequences[:, batch.input_ids.shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)], opener


def concept_span(toxic: torch.Tensor, benign: torch.Tensor, label: str) -> tuple[int, int]:
    """[start, end) of the positions where two left-padded encodings of a pair differ: the concept's tokens (with
    any shared tokens between its first and last differing one)."""
    if toxic.shape != benign.shape:
        raise DataError(f"pair {label}: the concept has {toxic.numel()} vs {benign.numel()} prompt tokens; patching "
                        "over the concept's positions needs names of equal token length (or use --positions last)")
    differ = torch.nonzero(toxic != benign).flatten()
    if not len(differ):
        raise DataError(f"pair {label}: the two prompts are the same tokens")
    return int(differ[0]), int(differ[-1]) + 1


def last_positions(batch: Encoded) -> torch.Tensor:
    """The last prompt position of each row of a left-padded batch, as [B, 1]."""
    return torch.full((batch.input_ids.shape[0], 1), batch.input_ids.shape[1] - 1, dtype=torch.long)


def unpad(batch: Encoded) -> list[torch.Tensor]:
    return [row[mask.bool()] for row, mask in zip(batch.input_ids, batch.attention_mask)]


@dataclass
class PairResults:
    """One pair's outcome over every block: refusal of the clean prompts, and per direction and block whether the
    patched answer's refusal differs from the clean recipient's and the change in its opener log-probability."""

    clean_refused: dict[str, bool]
    flips: dict[str, list[bool]]
    opener_change: dict[str, list[float]]


def patch_pairs(runner: PatchingModel, toxic: Sequence[str], benign: Sequence[str], donors: Sequence[str],
                is_refusal: Callable[[str], bool], opener_ids: Sequence[int], *, positions: str = "last",
                max_new_tokens: int = 16, labels: Sequence[str] | None = None) -> list[PairResults]:
    """Every direction at every block for a batch of pairs; `donors[i]` is the benign prompt patched into pair i's
    benign prompt for the control (the same scene with another benign concept, or another pair's benign prompt when
    patching the last token only)."""
    labels = list(labels or range(len(toxic)))
    prompts = {"toxic": runner.encode(toxic), "benign": runner.encode(benign), "donor": runner.encode(donors)}
    rows = {name: unpad(batch) for name, batch in prompts.items()}
    clean = {name: runner.answer(prompts[name], opener_ids, max_new_tokens) for name in ("toxic", "benign")}
    refused = {name: [is_refusal(text) for text in clean[name][0]] for name in clean}
    directions = {"toxic_into_benign": ("toxic", "benign"), "benign_into_toxic": ("benign", "toxic"),
                  "benign_into_benign": ("donor", "benign")}
    results = [PairResults({name: refused[name][i] for name in refused}, {}, {}) for i in range(len(toxic))]
    for direction, (source, target) in directions.items():
        source_batch, target_batch = prompts[source], prompts[target]
        if positions == "last":
            where, take = last_positions(target_batch), last_positions(source_batch)
        else:
            where, take = spans(rows[target], rows[source], target_batch, source_batch, labels)
        source_states = runner.states(source_batch)
        for result in results:
            result.flips[direction], result.opener_change[direction] = [], []
        for layer in range(1, runner.num_layers + 1):
            gathered = source_states[layer][torch.arange(len(toxic)).unsqueeze(1), take.to(source_states.device)]
            with runner.patched(layer, where, gathered):
                answers, opener = runner.answer(target_batch, opener_ids, max_new_tokens)
            for i, result in enumerate(results):
                result.flips[direction].append(is_refusal(answers[i]) != refused[target][i])
                result.opener_change[direction].append(float(opener[i] - clean[target][1][i]))
    return results


def spans(target_rows, source_rows, target_batch: Encoded, source_batch: Encoded, labels):
    """Positions of the concept's tokens in the target and source batches (left padded), [B, P] each."""
    where, take = [], []
    for i, (target, source) in enumerate(zip(target_rows, source_rows)):
        start, end = concept_span(source, target, labels[i])
        where.append(torch.arange(start, end) + target_batch.input_ids.shape[1] - target.numel())
        take.append(torch.arange(start, end) + source_batch.input_ids.shape[1] - source.numel())
    width = max(len(w) for w in where)  # pad by repeating the last position (writing it twice is harmless)
    where = [torch.cat([w, w[-1:].repeat(width - len(w))]) for w in where]
    take = [torch.cat([t, t[-1:].repeat(width - len(t))]) for t in take]
    return torch.stack(where), torch.stack(take)


def causal_layer(share_per_layer: Sequence[float], threshold: float = CAUSAL_SHARE) -> int | None:
    """The earliest block (1-based) whose share of flipped pairs is at least `threshold`, or None."""
    return next((layer for layer, share in enumerate(share_per_layer, start=1) if share >= threshold), None)
