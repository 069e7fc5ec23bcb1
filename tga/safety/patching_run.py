"""tga/safety/patching_run.py

`tga analyze patching`: the pairs file, the model (a plain causal LM folder or a tga VLM's LLM), the patching over
every block in resumable batches, the refusal direction, and the report (patching.json, patching.png, a console
line).

Pairs file (JSON or JSONL), one record per pair:
    {"id": "p1", "toxic": "Describe: a knife on a plate.", "benign": "Describe: a spoon on a plate.",
     "toxic_concept": "knife", "benign_concept": "spoon",
     "control": "Describe: a cup on a plate.", "control_concept": "cup"}      # optional: the control's donor
The two prompts must differ only in the concept. `patching_pairs` makes such a file from any prompts file with a
`concept` field (the demo worlds' text prompts).

The refusal direction of block j is the difference of the mean last-token states, toxic minus benign (as in Arditi
et al. 2024, "Refusal in language models is mediated by a single direction"); every prompt's projection on it is
reported per block, and for a VLM with `--images` also image prompts beside the same scenes given as captions: the
ratio of their projections at the causal layer is the share of the text refusal signal an image carries.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from tga.errors import DataError
from tga.records_io import load_records, record_label
from tga.safety.io import write_json
from tga.safety.judge import KeywordJudge
from tga.safety.loading import is_vlm_dir, load_causal_lm, load_chat
from tga.safety.patching import DIRECTIONS, Encoded, PatchingModel, causal_layer, patch_pairs
from tga.safety.refusal_tokens import DEFAULT_REFUSAL_PHRASES, refusal_token_ids
from tga.safety.resume import ResultStore, run_resumable
from tga.safety.states import format_user_turns

PAIR_FIELDS = ("toxic", "benign", "toxic_concept", "benign_concept")


def read_patch_pairs(path: str, *, positions: str = "last") -> list[dict]:
    """The pairs of `path`, checked: each names its concepts, and its prompts differ only in them."""
    pairs = []
    for index, record in enumerate(load_records(path)):
        label = record_label(record, index)
        missing = [name for name in PAIR_FIELDS if not isinstance(record.get(name), str) or not record[name]]
        if missing:
            raise DataError(f"{path}: pair {label} needs string fields {missing}")
        for side in ("toxic", "benign"):
            if record[f"{side}_concept"] not in record[side]:
                raise DataError(f"{path}: pair {label}: the concept {record[f'{side}_concept']!r} does not occur in its "
                                f"{side} prompt")
        if record["toxic"].replace(record["toxic_concept"], record["benign_concept"]) != record["benign"]:
            raise DataError(f"{path}: pair {label}: the prompts differ in more than the concept (the toxic prompt with "
                            f"{record['toxic_concept']!r} replaced by {record['benign_concept']!r} is not the benign one)")
        control = record.get("control")
        if control is not None and control != record["toxic"].replace(record["toxic_concept"],
                                                                        str(record.get("control_concept"))):
            raise DataError(f"{path}: pair {label}: `control` must be the toxic prompt with `control_concept` in "
                            "place of the concept")
        if positions == "concept" and control is None:
            raise DataError(f"{path}: pair {label}: --positions concept needs a `control` prompt (the same scene with "
                            "another benign concept) for the benign-into-benign control")
        pairs.append({**record, "key": str(record.get("id", index))})
    if len(pairs) < 2 and not all(pair.get("control") for pair in pairs):
        raise DataError(f"{path}: at least 2 pairs are needed (the control patches another pair's benign prompt)")
    return pairs


def load_runner(model_dir: str, *, device: str, dtype: str | None, template: str | None):
    """(`PatchingModel`, the chat model or None): prompts formatted as single user turns, as the analyses ask them."""
    if is_vlm_dir(model_dir):
        chat = load_chat(model_dir, device=device, dtype=dtype, template=template)

        def encode(texts: Sequence[str]) -> Encoded:
            encoded, _ = chat.encode([None] * len(texts), list(texts))
            ids, attention, _ = chat.padded(encoded, left=True)
            return Encoded(ids.cpu(), attention.cpu())

        return PatchingModel(chat.model, chat.tokenizer, encode), chat
    model, tokenizer = load_causal_lm(model_dir, device=device, dtype=dtype)
    if template is not None:
        from tga.data.chat_templates import chat_template

        tokenizer.chat_template = chat_template(template)

    def encode(texts: Sequence[str]) -> Encoded:
        prompts, templated = format_user_turns(tokenizer, texts)
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=not templated)
        return Encoded(batch["input_ids"], batch["attention_mask"])

    return PatchingModel(model, tokenizer, encode), None


def last_token_states(runner: PatchingModel, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """[L+1, N, H] states at the last prompt token (left padded: the last column)."""
    return torch.cat([runner.states(runner.encode(texts[i:i + batch_size]))[:, :, -1].float().cpu()
                      for i in range(0, len(texts), batch_size)], dim=1)


def refusal_direction(toxic: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
    """Unit difference of the mean states, toxic minus benign, per layer: [L+1, H]."""
    direction = toxic.mean(dim=1) - benign.mean(dim=1)
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def image_caption_states(chat, records: list[dict], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token states of each image prompt and of the same scene given as its caption, [L+1, N, H] each."""
    from tga.image_io import open_image

    images, captions = [], []
    for start in range(0, len(records), batch_size):
        part = records[start:start + batch_size]
        pictures = [open_image(r["image"], f"record {r['id']}") for r in part]
        for target, inputs in ((images, (pictures, [r["question"] for r in part])),
                               (captions, ([None] * len(part), [f"{r['caption']}\n{r['question']}" for r in part]))):
            result = chat.hidden_states(*inputs)
            rows, last = torch.arange(len(part)), result.last_index.cpu()
            target.append(torch.stack([h.float().cpu()[rows, last] for h in result.states]))
    return torch.cat(images, dim=1), torch.cat(captions, dim=1)


def summarise(results: list[dict], num_layers: int) -> dict:
    """Per direction and block: share of flipped pairs and mean opener log-probability change; the causal layer."""
    summary = {"num_pairs": len(results), "num_layers": num_layers,
               "clean_refused": {side: float(np.mean([r["clean_refused"][side] for r in results]))
                                 for side in ("toxic", "benign")}}
    for direction in DIRECTIONS:
        summary[direction] = {
            "flip_share": np.mean([r["flips"][direction] for r in results], axis=0).tolist(),
            "opener_change": np.mean([r["opener_change"][direction] for r in results], axis=0).tolist(),
        }
    summary["causal_layer"] = causal_layer(summary["toxic_into_benign"]["flip_share"])
    # each pair's own causal layer: the earliest block whose toxic state flips its benign twin (None: none does)
    summary["pair_causal_layers"] = [causal_layer([float(flip) for flip in r["flips"]["toxic_into_benign"]], 1.0)
                                     for r in results]
    return summary


def run_patching(model_dir: str, pairs_path: str, out_dir: str, *, positions: str = "last", batch_size: int = 8,
                 max_new_tokens: int = 16, device: str = "cpu", dtype: str | None = None, template: str | None = None,
                 refusal_phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES, images_path: str | None = None,
                 image_folder: str | None = None, question: str = "Describe this image.") -> dict:
    """Patch every pair at every block, resumably; write patching.json and patching.png into `out_dir`."""
    from tga.safety.plots import plot_patching

    pairs = read_patch_pairs(pairs_path, positions=positions)
    runner, chat = load_runner(model_dir, device=device, dtype=dtype, template=template)
    if images_path and chat is None:
        raise DataError(f"--images {images_path}: image prompts need a VLM folder, and {model_dir} is a plain LLM")
    opener_ids = refusal_token_ids(runner.tokenizer, refusal_phrases)
    judge = KeywordJudge()
    store = ResultStore(os.path.join(out_dir, "patching_pairs.jsonl"), {
        "model": os.path.abspath(model_dir), "pairs": os.path.abspath(pairs_path), "positions": positions,
        "max_new_tokens": max_new_tokens, "template": template, "refusal_phrases": list(refusal_phrases)})
    donors = {pair["key"]: pair.get("control") or pairs[(index + 1) % len(pairs)]["benign"]
              for index, pair in enumerate(pairs)}

    def process(batch: list[dict]) -> list[dict]:
        results = patch_pairs(runner, [p["toxic"] for p in batch], [p["benign"] for p in batch],
                              [donors[p["key"]] for p in batch], judge.is_refusal, opener_ids, positions=positions,
                              max_new_tokens=max_new_tokens, labels=[p["key"] for p in batch])
        return [vars(result) for result in results]

    results = run_resumable(pairs, [p["key"] for p in pairs], store, process, batch_size=batch_size,
                            desc="patching pairs")
    report = {"model": model_dir, "positions": positions, **summarise(results, runner.num_layers),
              "refusal_tokens": runner.tokenizer.convert_ids_to_tokens(opener_ids)}
    toxic = last_token_states(runner, [p["toxic"] for p in pairs], batch_size)
    benign = last_token_states(runner, [p["benign"] for p in pairs], batch_size)
    direction = refusal_direction(toxic, benign)
    project = lambda states: torch.einsum("lnh,lh->ln", states, direction)  # noqa: E731
    report["direction"] = {"toxic": project(toxic).mean(dim=1).tolist(), "benign": project(benign).mean(dim=1).tolist()}
    if images_path:
        records = [{**r, "question": r.get("question", question)} for r in read_image_records(images_path, image_folder)]
        image, caption = image_caption_states(chat, records, batch_size)
        report["direction"].update(image=project(image).mean(dim=1).tolist(),
                                   caption=project(caption).mean(dim=1).tolist())
        report["image_caption_ratio"] = transfer_ratio(report["direction"], report["causal_layer"])
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "patching.json"), report)
    plot_patching(report, os.path.join(out_dir, "patching.png"))
    return report


def transfer_ratio(projections: dict, layer: int | None) -> float | None:
    """(image - benign) / (caption - benign) of the mean projections at `layer`: 1 when an image carries the refusal
    signal its caption carries, 0 when it carries none."""
    if layer is None:
        return None
    gap = projections["caption"][layer] - projections["benign"][layer]
    return (projections["image"][layer] - projections["benign"][layer]) / gap if abs(gap) > 1e-12 else None


def read_image_records(path: str, image_folder: str | None) -> list[dict]:
    from tga.safety.analysis import read_pairs

    return read_pairs(path, image_folder)


def patching_pairs(prompts_path: str, benign_concepts: Sequence[str], *, concept_field: str = "concept") -> list[dict]:
    """Matched pairs from a prompts file whose records carry their (toxic) concept: each prompt with its concept
    replaced by a benign one (cycling through `benign_concepts`, skipping names the prompt holds), and a control with
    the next such name."""
    pairs = []
    for index, record in enumerate(load_records(prompts_path)):
        text, concept = record.get("text"), record.get(concept_field)
        if not isinstance(text, str) or not isinstance(concept, str) or concept not in text:
            raise DataError(f"{prompts_path}: record {record_label(record, index)} needs `text` containing its "
                            f"`{concept_field}`")
        # names cycle with the index, skipping any the prompt already holds (a scene may show a benign object too)
        ordered = list(benign_concepts)[index % len(benign_concepts):] + list(benign_concepts)
        names = [name for name in dict.fromkeys(ordered) if name not in text]
        if len(names) < 2:
            raise DataError(f"{prompts_path}: record {record_label(record, index)}: fewer than 2 of the benign names "
                            "are absent from its prompt")
        benign, control = names[0], names[1]
        pairs.append({"id": str(record.get("id", index)), "toxic": text, "benign": text.replace(concept, benign),
                      "toxic_concept": concept, "benign_concept": benign,
                      "control": text.replace(concept, control), "control_concept": control})
    return pairs
