"""tga/demo/clip_captions.py

The captions the tiny CLIP is trained on: for each image, whole-scene captions (canonical and one random style) and
single-object captions, each paired with a hard negative, a caption that is wrong in exactly one attribute of one
object (NegCLIP-style). Without them a tiny CLIP separates most in-batch negatives by colour alone and learns shape
and position slowly; with them every step contrasts each image with a near miss.
"""

from __future__ import annotations

import random

from tga.demo.world import CAPTION_STYLES, COLOURS, CONCEPTS, POSITIONS, SIZES, Scene, replace_attribute, styled_caption

# Attributes each caption style mentions (a negative must change a visible one), and how often each is changed:
# shape and position first, since colour is learned first anyway.
STYLE_ATTRIBUTES = {
    "canonical": ("concept", "colour", "size", "position"), "picture": ("concept", "colour", "size", "position"),
    "no_size": ("concept", "colour", "position"), "there_is": ("concept", "colour", "position"),
    "no_position": ("concept", "colour", "size"), "counted": ("concept", "colour"), "concepts": ("concept",),
}
NEGATIVE_WEIGHTS = {"concept": 0.45, "position": 0.3, "colour": 0.1, "size": 0.15}


def corrupt(scene: Scene, index: int, attributes: tuple[str, ...], rng: random.Random) -> Scene:
    """The scene with one of `attributes` of object `index` changed to a value no object of the scene has there.

    A new concept is absent from the scene and a new position is free, so the changed object matches no object of
    the original scene (positions are distinct): the result is a true negative, also for single-object captions.
    """
    obj = scene.objects[index]
    attribute = rng.choices(attributes, weights=[NEGATIVE_WEIGHTS[a] for a in attributes])[0]
    if attribute == "concept":
        values = [c for c in CONCEPTS if c not in scene.concepts]
    elif attribute == "position":
        slots = list(POSITIONS) if len(scene.objects) == 1 else ["left", "right", "top", "bottom"]
        values = [p for p in slots if p not in {o.position for o in scene.objects}]
    else:
        values = [v for v in (COLOURS if attribute == "colour" else SIZES) if v != getattr(obj, attribute)]
    return replace_attribute(scene, index, attribute, rng.choice(values))


def alone(scene: Scene, index: int) -> Scene:
    """The scene reduced to object `index` (its caption describes that object only)."""
    return Scene(scene.id, (scene.objects[index],), scene.background, scene.background_level, scene.texture_seed,
                 scene.noise)


def concept_caption(concept: str) -> str:
    return f"{'an' if concept[0] in 'aeiou' else 'a'} {concept}"


def training_captions(scene: Scene, rng: random.Random, k: int) -> tuple[list[str], list[str]]:
    """`k` captions of the scene and, for each, its hard negative.

    In turn: the canonical caption, a random style (both of the whole scene), one random object alone ("a small red
    knife on the left") and one object's concept alone ("a knife"), then object captions again. The single-object
    captions tie each object's shape, colour and position to its pixels; concept-only ones recur across images,
    which makes concept learning nearly a classification (a tiny ViT learns shapes slowly otherwise).
    """
    positives, negatives = [], []
    for slot in range(k):
        index = rng.randrange(len(scene.objects))
        if slot < 2:
            style = "canonical" if slot == 0 else rng.choice(CAPTION_STYLES)
            positives.append(styled_caption(scene, style))
            negatives.append(styled_caption(corrupt(scene, index, STYLE_ATTRIBUTES[style], rng), style))
        elif slot % 2 == 0:
            wrong = corrupt(scene, index, STYLE_ATTRIBUTES["canonical"], rng)
            positives.append(styled_caption(alone(scene, index), "canonical"))
            negatives.append(styled_caption(alone(wrong, index), "canonical"))
        else:
            positives.append(concept_caption(scene.objects[index].concept))
            negatives.append(concept_caption(rng.choice([c for c in CONCEPTS if c not in scene.concepts])))
    return positives, negatives


def valid_captions(scene: Scene) -> frozenset[str]:
    """Every training caption that is true of the scene: whole-scene captions in all styles, each object's caption
    and each object's concept caption. Contrastive targets count all of them as matches, not only the image's own."""
    captions = {styled_caption(scene, style) for style in CAPTION_STYLES}
    for index, obj in enumerate(scene.objects):
        captions.add(styled_caption(alone(scene, index), "canonical"))
        captions.add(concept_caption(obj.concept))
    return frozenset(captions)
