"""tga/safety/analysis.py

Runs the two Section-3 analyses on checkpoint folders and writes their reports: the activation layer of the
safety mechanism on toxic text prompts (plain causal LM or the LLM inside a project checkpoint), and the
per-layer similarity of image-token and caption-text hidden states for one or more checkpoints. The
`tga analyze` command is a thin wrapper around these functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tga.data.chat_templates import chat_template
from tga.errors import ConfigError, DataError
from tga.image_io import open_image, resolve_image_path
from tga.records_io import load_records, record_label
from tga.safety.activation import ActivationResult, analyze_activation
from tga.safety.io import read_texts, write_json
from tga.safety.loading import is_vlm_dir, load_causal_lm, load_chat
from tga.safety.refusal_tokens import DEFAULT_REFUSAL_PHRASES, refusal_token_ids
from tga.safety.similarity import save_similarity, similarity_report
from tga.safety.states import chat_last_token_states, chat_pooled_states, last_token_states, lens_parts


def run_activation(
    model_dir: str,
    data_path: str,
    out_dir: str,
    *,
    rule: str = "paper",
    top_k: int = 5,
    refusal_phrases: Sequence[str] = DEFAULT_REFUSAL_PHRASES,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    template: str | None = None,
    control_path: str | None = None,
) -> ActivationResult:
    """Activation-layer analysis of a checkpoint on toxic text prompts; writes activation.json/.png.

    Args:
        model_dir: a project checkpoint (Llava) or a plain HF causal LM folder.
        data_path: toxic prompts (.txt, .json or .jsonl; see `read_texts`), each formatted as a user turn.
        out_dir: output folder.
        rule: "paper" (top-1) or "released" (top-K).
        top_k: K of the released rule.
        refusal_phrases: phrases whose first tokens count as refusal tokens.
        batch_size: prompts per forward pass.
        device: torch device.
        dtype: model dtype name or None.
        template: conversation template the prompts are asked in, instead of the checkpoint's own (a plain LLM
            folder without a chat template needs one: its raw text would be continued, not answered).
        control_path: optional benign prompts (same formats), analysed the same way as a control.

    Returns:
        The analysis result.
    """
    texts = read_texts(data_path)
    control_texts = read_texts(control_path) if control_path else []
    if is_vlm_dir(model_dir):
        chat = load_chat(model_dir, device=device, dtype=dtype, template=template)
        model, tokenizer = chat.model, chat.tokenizer

        def states_of(prompts):
            return chat_last_token_states(chat, prompts, batch_size=batch_size)
    else:
        model, tokenizer = load_causal_lm(model_dir, device=device, dtype=dtype)
        if template is not None:
            tokenizer.chat_template = chat_template(template)

        def states_of(prompts):
            return last_token_states(model, tokenizer, prompts, batch_size=batch_size)
    ids = refusal_token_ids(tokenizer, refusal_phrases)
    result = analyze_activation(
        states_of(texts), lens_parts(model), ids, rule=rule, top_k=top_k, tokenizer=tokenizer, texts=texts,
        control_states=states_of(control_texts) if control_texts else None,
    )
    save_activation(result, out_dir)
    return result


def read_pairs(data_path: str, image_folder: str | None) -> list[dict[str, Any]]:
    """Read image-caption pairs ({image, caption, scene?, id?}) and resolve their image paths.

    Raises:
        DataError: a record lacks `image` or `caption` (named by id or index), or its path escapes the folder.
    """
    folder = image_folder or os.path.dirname(os.path.abspath(data_path))
    pairs = []
    for index, record in enumerate(load_records(data_path)):
        label = record_label(record, index)
        if not isinstance(record.get("image"), str) or not isinstance(record.get("caption"), str):
            raise DataError(f"{data_path}: record {label} needs string fields `image` and `caption`")
        pairs.append(
            {
                "id": record.get("id", index),
                "image": resolve_image_path(folder, record["image"], label),
                "caption": record["caption"],
                "scene": record.get("scene"),
            }
        )
    if not pairs:
        raise DataError(f"{data_path}: no image-caption pairs")
    return pairs


def run_similarity(
    model_dirs: Sequence[str],
    data_path: str,
    out_dir: str,
    *,
    image_folder: str | None = None,
    question: str = "Describe this image.",
    labels: Sequence[str] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
    template: str | None = None,
) -> dict[str, Any]:
    """Per-layer image-vs-caption similarity for each checkpoint; writes similarity.json/.png.

    Args:
        model_dirs: checkpoint folders (e.g. before and after TGA training).
        data_path: pairs file (JSON/JSONL records with `image`, `caption`, optional `scene`).
        out_dir: output folder.
        image_folder: where image paths are resolved (default: the pairs file's folder).
        question: the user text that accompanies each image (image tokens are pooled, not the question).
        labels: plot/JSON label per checkpoint (default: folder names, made unique).
        batch_size: prompts per forward pass.
        device: torch device.
        dtype: model dtype name or None.
        template: conversation template instead of each model's own (None: their own).

    Returns:
        Label -> similarity report.
    """
    pairs = read_pairs(data_path, image_folder)
    for model_dir in model_dirs:
        if not is_vlm_dir(model_dir):
            raise ConfigError(f"--model: {model_dir} is not a vision-language (Llava) checkpoint")
    labels = list(labels) if labels else _unique_labels(model_dirs)
    if len(labels) != len(model_dirs) or len(set(labels)) != len(labels):
        raise ConfigError(f"--label: give one distinct label per --model ({len(model_dirs)}), got {labels}")
    images = [open_image(p["image"], f"id {p['id']!r}") for p in pairs]
    captions = [p["caption"] for p in pairs]
    scenes = [p["scene"] or "all" for p in pairs] if any(p["scene"] for p in pairs) else None
    reports = {}
    for label, model_dir in zip(labels, model_dirs):
        chat = load_chat(model_dir, device=device, dtype=dtype, template=template)
        image_states = chat_pooled_states(
            chat, images, [question] * len(images), region="image", batch_size=batch_size, desc=f"{label}: image states"
        )
        caption_states = chat_pooled_states(
            chat,
            [None] * len(captions),
            captions,
            region="text",
            batch_size=batch_size,
            desc=f"{label}: caption states",
        )
        reports[label] = similarity_report(image_states, caption_states, scenes)
        del chat
    save_similarity(reports, out_dir)
    return reports


def _unique_labels(model_dirs: Sequence[str]) -> list[str]:
    labels: list[str] = []
    for model_dir in model_dirs:
        base = os.path.basename(os.path.normpath(model_dir)) or model_dir
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


def save_activation(result: ActivationResult, out_dir: str) -> tuple[str, str]:
    """Write `activation.json` and `activation.png` into `out_dir`.

    Returns:
        The JSON and PNG paths.
    """
    from tga.safety.plots import plot_activation  # matplotlib is only imported when plotting

    json_path = os.path.join(out_dir, "activation.json")
    png_path = os.path.join(out_dir, "activation.png")
    write_json(json_path, result.to_json())
    plot_activation(result, png_path)
    return json_path, png_path
