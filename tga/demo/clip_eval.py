"""tga/demo/clip_eval.py

The tiny CLIP's inputs (image loading, CLIP normalisation, caption tokenization), shared by training and evaluation,
and its zero-shot evaluation on held-out images: concept accuracy with "a {concept}" prompts, colour and position
accuracy among captions that differ only in that attribute (single-object scenes), and caption R@1 (each image
against every held-out canonical caption).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, PreTrainedTokenizerFast

from tga.demo.world import COLOURS, CONCEPTS, POSITIONS, TOXIC_CONCEPTS, Scene, canonical_caption, replace_attribute

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def load_images(image_folder: str, scenes: list[Scene]) -> torch.Tensor:
    """The scenes' images as one uint8 tensor [N, 3, H, W]."""
    arrays = [np.asarray(Image.open(os.path.join(image_folder, s.id + ".png")).convert("RGB")) for s in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> CLIP-normalised float (what the saved image processor computes)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def tokenize(tokenizer: PreTrainedTokenizerFast, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [N, max_length]; each distinct text is tokenized once (captions repeat a lot)."""
    unique = list(dict.fromkeys(texts))
    encoded = tokenizer(unique, truncation=True, max_length=max_length)["input_ids"]
    table = np.full((len(unique), max_length), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(unique), max_length), dtype=np.int64)
    for row, ids in enumerate(encoded):
        table[row, : len(ids)], mask[row, : len(ids)] = ids, 1
    index = {text: row for row, text in enumerate(unique)}
    rows = np.fromiter((index[text] for text in texts), dtype=np.int64, count=len(texts))
    return torch.from_numpy(table[rows]), torch.from_numpy(mask[rows])


@torch.no_grad()
def embed(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, *, images: torch.Tensor | None = None,
          texts: list[str] | None = None, max_length: int = 40, batch: int = 512) -> torch.Tensor:
    """L2-normalised image (uint8 batch) or text embeddings."""
    out = []
    if images is not None:
        for i in range(0, len(images), batch):
            feats = model.get_image_features(pixel_values=normalise(images[i:i + batch]))
            out.append(getattr(feats, "pooler_output", feats))
    else:
        for i in range(0, len(texts), batch):
            ids, mask = tokenize(tokenizer, texts[i:i + batch], max_length)
            feats = model.get_text_features(input_ids=ids, attention_mask=mask)
            out.append(getattr(feats, "pooler_output", feats))
    return F.normalize(torch.cat(out), dim=-1)


def zero_shot(model, tokenizer, image_emb: torch.Tensor, candidates: list[list[str]], truth: list[int],
              max_length: int) -> float:
    """Accuracy of picking the true caption among each image's (equally many) candidates."""
    if not candidates:
        return 0.0
    flat = [text for texts in candidates for text in texts]
    text_emb = embed(model, tokenizer, texts=flat, max_length=max_length).view(len(candidates), len(candidates[0]), -1)
    predicted = torch.einsum("nkd,nd->nk", text_emb, image_emb).argmax(dim=1)
    return float((predicted == torch.tensor(truth)).float().mean())


def evaluate_clip(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, images: torch.Tensor, scenes: list[Scene],
                  max_length: int) -> dict[str, float]:
    """Zero-shot accuracy on held-out images: concept (single-object scenes), colour and position, and caption R@1."""
    model.eval()
    single = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
    concept_emb = embed(model, tokenizer, texts=[f"a {c}" for c in CONCEPTS], max_length=max_length)
    image_emb = embed(model, tokenizer, images=images, max_length=max_length)
    predicted = (image_emb[single] @ concept_emb.t()).argmax(dim=1).tolist()
    truth = [CONCEPTS.index(scenes[i].objects[0].concept) for i in single]
    hits = [p == t for p, t in zip(predicted, truth)]
    toxic_hits = [h for h, t in zip(hits, truth) if CONCEPTS[t] in TOXIC_CONCEPTS]
    metrics = {"concept_acc": float(np.mean(hits)), "toxic_concept_acc": float(np.mean(toxic_hits)) if toxic_hits else 0.0}
    for attribute, values in (("colour", list(COLOURS)), ("position", list(POSITIONS))):
        candidates = [[canonical_caption(replace_attribute(scenes[i], 0, attribute, v)) for v in values] for i in single]
        truth_v = [values.index(getattr(scenes[i].objects[0], attribute)) for i in single]
        metrics[f"{attribute}_acc"] = zero_shot(model, tokenizer, image_emb[single], candidates, truth_v, max_length)
    captions = [canonical_caption(s) for s in scenes]
    text_emb = embed(model, tokenizer, texts=captions, max_length=max_length)
    best = (image_emb @ text_emb.t()).argmax(dim=1)
    metrics["caption_r1"] = float(np.mean([captions[int(b)] == captions[i] for i, b in enumerate(best)]))
    metrics["n_single_object_images"] = len(single)
    return metrics
