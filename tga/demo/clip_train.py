"""tga/demo/clip_train.py

Trains the demo world's tiny CLIP: a transformers `CLIPModel` (small ViT + 2-layer text encoder) fitted
contrastively on image-caption pairs of every concept, toxic ones included (a real CLIP has seen knives), with soft
targets where two images of a batch share a caption. The folder it saves is a standard CLIP checkpoint: model
(safetensors), `CLIPImageProcessor` (image size, CLIP mean/std) and a word-level tokenizer (CLIP start/end tokens) of the world's
captions, so `CLIPVisionModel.from_pretrained` gives the VLM's vision tower and the same folder serves retrieval.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from tga.demo.clip_captions import training_captions, valid_captions
from tga.demo.clip_eval import CLIP_MEAN, CLIP_STD, evaluate_clip, load_images, normalise, tokenize
from tga.demo.training import cosine_schedule, deterministic, timed
from tga.demo.world import COLOURS, CONCEPTS, POSITIONS, Scene
from tga.errors import ConfigError


@dataclass(frozen=True)
class ClipSpec:
    steps: int = 1200  # concept zero-shot 0.56 at 400 steps, 0.87 at 800, 0.91 at 1200 (docs/demo_world.md)
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 40
    weight_decay: float = 0.05
    patch_size: int = 12  # 48 px images: 16 patches, as cheap as 32 px with patch 8 and twice the pixels
    vision_width: int = 96
    vision_layers: int = 4
    text_width: int = 64
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 64
    max_text_length: int = 40
    vocab_size: int = 400  # BPE vocabulary of the caption tokenizer (the world has ~70 distinct words)
    captions_per_image: int = 4  # canonical, a random style, and captions of single objects; one is drawn per step
    hard_negatives: bool = True  # add, per image, its caption with one attribute changed (NegCLIP-style)
    sincos_positions: bool = True  # start the patch position embeddings from a 2D sine-cosine grid
    aux_weight: float = 1.0  # auxiliary scene-parsing loss on the image features (head discarded after training)
    eval_every: int = 200  # steps between learning-curve evaluations on held-out images (0: none)


CLIP_PRESETS = {"full": ClipSpec(), "tiny": ClipSpec(steps=3, batch_size=32, warmup_steps=1)}


def clip_spec(size: str) -> ClipSpec:
    if size not in CLIP_PRESETS:
        raise ConfigError(f"demo size `{size}` is not supported; choose one of {sorted(CLIP_PRESETS)}")
    return CLIP_PRESETS[size]


CAPTION_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|unk|>")  # ids 0, 1, 2: eos is 1 (see build_clip)


def train_caption_tokenizer(captions: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level, lower-cased tokenizer of the world's closed vocabulary, with CLIP's start and end tokens.

    [IMPORTANT] Not a trained BPE: the `tokenizers` BPE trainer breaks count ties in hash-map order, so two builds
    with the same seed gave different vocabularies (and different CLIPs). A sorted word list is the same every time.
    """
    words = sorted({word for caption in captions for word in re.findall(r"\w+|[^\w\s]+", caption.lower())})
    if len(words) + len(CAPTION_SPECIALS) > vocab_size:
        raise ConfigError(f"the captions hold {len(words)} distinct words; raise the CLIP vocab_size ({vocab_size})")
    vocab = {token: index for index, token in enumerate([*CAPTION_SPECIALS, *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<|unk|>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|unk|>", pad_token="<|endoftext|>", model_max_length=77)


def build_clip(spec: ClipSpec, tokenizer: PreTrainedTokenizerFast, image_size: int) -> CLIPModel:
    if image_size % spec.patch_size:
        raise ConfigError(f"patch size {spec.patch_size} does not divide the image size {image_size}")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": spec.text_width, "intermediate_size": 4 * spec.text_width,
            "num_hidden_layers": spec.text_layers, "num_attention_heads": spec.heads,
            "max_position_embeddings": spec.max_text_length, "bos_token_id": tokenizer.bos_token_id,
            # [IMPORTANT] the text features are read at the first eos token; eos id 2 would select a legacy rule
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": image_size, "patch_size": spec.patch_size, "hidden_size": spec.vision_width,
            "intermediate_size": 4 * spec.vision_width, "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.heads,
        },
        projection_dim=spec.projection_dim,
    )
    return CLIPModel(config)


def sincos_grid(grid: int, dim: int) -> torch.Tensor:
    """2D sine-cosine position codes for a grid x grid patch layout, [grid * grid, dim] (rows first, like patches)."""
    quarter = dim // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    angles_x = xs.reshape(-1, 1) * frequencies
    angles_y = ys.reshape(-1, 1) * frequencies
    codes = torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)
    return F.pad(codes, (0, dim - codes.shape[1]))


def init_positions(model: CLIPModel) -> None:
    """Replace the vision tower's random position embeddings by sine-cosine codes (the CLS slot gets zeros).

    [IMPORTANT] With the default 0.02-std init a tiny ViT trained for a few hundred steps never learns where an object
    is (position zero-shot stays at chance); fixed-scale codes make position visible from the first step.
    """
    config = model.config.vision_config
    grid = config.image_size // config.patch_size
    weight = model.vision_model.embeddings.position_embedding.weight
    with torch.no_grad():
        weight[0].zero_()
        weight[1:] = sincos_grid(grid, config.hidden_size)


class SceneHead(torch.nn.Module):
    """Auxiliary head on the vision tower's pooled state: the concepts present, and the concept and colour at each of
    the five positions.

    [IMPORTANT] The contrastive loss alone teaches a 0.6 M-parameter ViT colour within the budget but shape and
    position only slowly (they matter for few in-batch negatives); this dense signal makes the vision tower parse the
    scene early. It is an aid to training only: the head is not saved, the CLIP folder is a plain CLIPModel.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.present = torch.nn.Linear(width, len(CONCEPTS))
        self.concepts = torch.nn.Linear(width, len(POSITIONS) * (len(CONCEPTS) + 1))
        self.colours = torch.nn.Linear(width, len(POSITIONS) * (len(COLOURS) + 1))

    def loss(self, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Which concepts are present (multi-label), and the concept and colour at each position."""
        concept_logits = self.concepts(pooled).view(len(pooled) * len(POSITIONS), -1)
        colour_logits = self.colours(pooled).view(len(pooled) * len(POSITIONS), -1)
        present = torch.zeros(len(pooled), len(CONCEPTS) + 1).scatter_(1, targets[..., 0], 1.0)[:, :-1]
        return (F.binary_cross_entropy_with_logits(self.present(pooled), present, reduction="sum") / len(pooled)
                + F.cross_entropy(concept_logits, targets[..., 0].reshape(-1))
                + F.cross_entropy(colour_logits, targets[..., 1].reshape(-1)))


def slot_targets(scenes: list[Scene]) -> torch.Tensor:
    """[N, positions, 2] long: the concept and colour index at each position (the last index means empty)."""
    targets = torch.empty((len(scenes), len(POSITIONS), 2), dtype=torch.long)
    targets[..., 0], targets[..., 1] = len(CONCEPTS), len(COLOURS)
    slots, concepts, colours = list(POSITIONS), list(CONCEPTS), list(COLOURS)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            targets[row, slots.index(obj.position)] = torch.tensor([concepts.index(obj.concept), colours.index(obj.colour)])
    return targets


def image_processor(image_size: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )


def validity(valid_sets: list[frozenset[str]], texts: list[str]) -> torch.Tensor:
    """[images, texts] matrix: 1 where the text is a true caption of the image."""
    return torch.tensor([[text in valid for text in texts] for valid in valid_sets], dtype=torch.float32)


def contrastive_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: every true caption in the batch is a match.

    `logits` and `valid` are [B, B], or [B, 2B] when each image's hard-negative caption follows the B captions (the
    text-to-image direction uses the B captions only).
    """
    batch = logits.shape[0]
    image_to_text = valid / valid.sum(dim=1, keepdim=True)
    text_to_image = valid[:, :batch].t()
    text_to_image = text_to_image / text_to_image.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, image_to_text) + F.cross_entropy(logits[:, :batch].t(), text_to_image))


def train_clip(image_folder: str, train_scenes: list[Scene], test_scenes: list[Scene], out_dir: str, *,
               spec: ClipSpec, image_size: int, seed: int) -> dict:
    """Train, evaluate and save the tiny CLIP in `out_dir`; returns the metrics (also in `out_dir/metrics.json`)."""
    with timed() as clock, deterministic(seed):
        rng = np.random.default_rng([seed, 31])
        caption_rng = random.Random(seed)  # Python's generator: millions of tiny draws, numpy's is slow per call
        pairs = [training_captions(scene, caption_rng, spec.captions_per_image) for scene in train_scenes]
        flat = [caption for positives, _ in pairs for caption in positives]
        negatives = [caption for _, wrong in pairs for caption in wrong]
        valid_sets = [valid_captions(scene) for scene in train_scenes]
        tokenizer = train_caption_tokenizer(flat, spec.vocab_size)
        shape = (len(train_scenes), spec.captions_per_image, -1)
        input_ids, attention = (t.view(shape) for t in tokenize(tokenizer, flat, spec.max_text_length))
        negative_ids, negative_attention = (t.view(shape) for t in tokenize(tokenizer, negatives, spec.max_text_length))
        images = load_images(image_folder, train_scenes)
        targets = slot_targets(train_scenes)
        test_images = load_images(image_folder, test_scenes)
        model = build_clip(spec, tokenizer, image_size)
        if spec.sincos_positions:
            init_positions(model)
        head = SceneHead(spec.vision_width)
        optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=spec.lr,
                                      weight_decay=spec.weight_decay)
        schedule = cosine_schedule(optimizer, spec.warmup_steps, spec.steps)
        model.train()
        losses, curve = [], []
        for step in tqdm(range(1, spec.steps + 1), desc="training tiny CLIP", unit="step"):
            batch = torch.from_numpy(rng.choice(len(train_scenes), size=min(spec.batch_size, len(train_scenes)),
                                                replace=False))
            which = torch.from_numpy(rng.integers(spec.captions_per_image, size=len(batch)))
            ids, mask = input_ids[batch, which], attention[batch, which]
            texts = [flat[int(i) * spec.captions_per_image + int(w)] for i, w in zip(batch, which)]
            if spec.hard_negatives:
                ids = torch.cat([ids, negative_ids[batch, which]])
                mask = torch.cat([mask, negative_attention[batch, which]])
                texts += [negatives[int(i) * spec.captions_per_image + int(w)] for i, w in zip(batch, which)]
            length = int(mask.sum(dim=1).max())  # pad only to the batch's longest caption
            out = model(input_ids=ids[:, :length], attention_mask=mask[:, :length], pixel_values=normalise(images[batch]))
            loss = contrastive_loss(out.logits_per_image, validity([valid_sets[int(i)] for i in batch], texts))
            if spec.aux_weight:
                # the tower's pooled CLS state (CLIP's `pooler_output` is already projected in transformers 5)
                pooled = model.vision_model.post_layernorm(out.vision_model_output.last_hidden_state[:, 0])
                loss = loss + spec.aux_weight * head.loss(pooled, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if spec.eval_every and step % spec.eval_every == 0 and step < spec.steps:
                probe = evaluate_clip(model, tokenizer, test_images, test_scenes, spec.max_text_length)
                curve.append({"step": step, "loss": round(float(np.mean(losses[-spec.eval_every:])), 4),
                              **{k: round(v, 3) for k, v in probe.items() if k.endswith("_acc")}})
                tqdm.write(f"CLIP step {step}: {curve[-1]}")
                model.train()
        train_seconds = clock()
        metrics = evaluate_clip(model, tokenizer, test_images, test_scenes, spec.max_text_length)
        metrics.update(curve=curve, final_loss=float(np.mean(losses[-20:])), train_seconds=round(train_seconds, 1),
                       parameters=sum(p.numel() for p in model.parameters()), spec=asdict(spec))
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        image_processor(image_size).save_pretrained(out_dir)
        metrics["seconds"] = round(clock(), 1)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=1)
    return metrics
