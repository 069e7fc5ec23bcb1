"""tga/demo/datasets.py

Writes every data file the demo pipeline reads, from the world's scenes: the images, stage-1 captioning records,
stage-2 instruction records (benign VL tasks plus text-only instructions, as LLaVA-1.5 mixes text data), the
caption corpus for retrieval, and the test sets (toxic scenes per concept for DSR, benign VQA and describe sets,
text prompts, toxic image-caption pairs). Design rule: no image record ever has a refusal as an answer; images with a
toxic object take part in benign tasks only and carry `"toxic": true`, so the guide loss can leave them out. The one
exception is a separate file, the VLGuard-style safety data (`safety_records`), which only methods that ask for it
(`--safety_data`) train on.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tga.demo import tasks
from tga.demo.render import write_images
from tga.demo.world import POSITION_PHRASES, Scene, WorldScenes, WorldSpec, canonical_caption, caption_variants

STAGE2_TURNS = (1, 2, 3)
# The toxic concepts the VLGuard-style safety data covers; the others are held out, so that image DSR on them says
# whether image safety training generalises beyond the concepts it saw (docs/demo.md).
SAFETY_DATA_CONCEPTS = ("knife", "gun")
SAFETY_DATA_REFUSALS = 500  # at most this many refusal records (as many helpful ones on benign images beside them)
STAGE2_DESCRIBE_PROB = 0.45  # chance that a benign image's conversation holds one describe request


def _dump(path: str, data) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, ensure_ascii=False)
    return path


def _dump_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def image_path(scene: Scene) -> str:
    """A scene's image, relative to the image folder."""
    return scene.id + ".png"


def _turns(first_prompt: str, qas: list[tasks.QA]) -> list[dict]:
    turns = []
    for index, qa in enumerate(qas):
        turns.append({"from": "human", "value": first_prompt if index == 0 else qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return turns


def stage1_records(scenes: list[Scene]) -> list[dict]:
    """Stage-1 (`plain` template) records: the image, then its canonical caption."""
    return [
        {"id": f"s1-{scene.id}", "image": image_path(scene),
         "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": canonical_caption(scene)}],
         "image_caption": canonical_caption(scene), "toxic": scene.toxic}
        for scene in scenes
    ]


def stage2_image_record(scene: Scene, rng: np.random.Generator) -> dict:
    """A multi-turn benign VL conversation about an image; describe requests only for images without toxic objects."""
    qas = tasks.conversation(scene, rng, n_turns=int(rng.choice(STAGE2_TURNS)), describe_prob=STAGE2_DESCRIBE_PROB,
                             allow_describe=not scene.toxic)
    if any(qa.refused for qa in qas):  # the world's design rule, checked where records are made
        raise RuntimeError(f"scene {scene.id}: an image record must never answer with a refusal")
    return {"id": f"s2-{scene.id}", "image": image_path(scene),
            "conversations": _turns(tasks.image_prompt(qas[0].question), qas),
            "image_caption": canonical_caption(scene), "toxic": scene.toxic}


def text_conversation(scene: Scene, rng: np.random.Generator, *, describe_prob: float = 0.5) -> list[tasks.QA]:
    """A text conversation about a scene given in words (describe requests of toxic scenes are refused)."""
    return tasks.conversation(scene, rng, n_turns=int(rng.choice(STAGE2_TURNS)), describe_prob=describe_prob)


def text_record(scene: Scene, rng: np.random.Generator, record_id: str) -> dict:
    qas = text_conversation(scene, rng)
    first = tasks.text_prompt(canonical_caption(scene), qas[0].question)
    return {"id": record_id, "conversations": _turns(first, qas), "toxic": scene.toxic}


def stage2_records(image_scenes: list[Scene], text_scenes: list[Scene], n_text: int, seed: int) -> list[dict]:
    """Image conversations plus `n_text` text-only instructions (drawn from `text_scenes`), shuffled together."""
    rng = np.random.default_rng([seed, 21])
    records = [stage2_image_record(scene, rng) for scene in image_scenes]
    picks = rng.integers(len(text_scenes), size=n_text)
    records += [text_record(text_scenes[int(i)], rng, f"s2t-{k:06d}") for k, i in enumerate(picks)]
    order = rng.permutation(len(records))
    return [records[int(i)] for i in order]


def safety_records(scenes: list[Scene], seed: int) -> list[dict]:
    """VLGuard-style image safety data (Zong et al., ICML 2024): a describe request on a training image whose toxic
    objects are all of `SAFETY_DATA_CONCEPTS`, answered with the refusal, and as many describe requests on benign
    training images answered with their caption (VLGuard pairs unsafe images with safe ones against over-refusal)."""
    rng = np.random.default_rng([seed, 24])
    unsafe = [s for s in scenes
              if s.toxic and all(o.concept in SAFETY_DATA_CONCEPTS for o in s.objects if o.toxic)][:SAFETY_DATA_REFUSALS]
    benign = [s for s in scenes if not s.toxic][:len(unsafe)]
    rows = []
    for scene in unsafe + benign:
        qa = tasks.describe_qa(scene, str(rng.choice(tasks.DESCRIBE_TRAIN)))
        rows.append({"id": f"safety-{scene.id}", "image": image_path(scene),
                     "conversations": _turns(tasks.image_prompt(qa.question), [qa]),
                     "image_caption": canonical_caption(scene), "toxic": scene.toxic})
    order = rng.permutation(len(rows))
    return [rows[int(i)] for i in order]


def caption_corpus(scenes: list[Scene], seed: int, variants: int = 2) -> list[str]:
    """Distinct captions of the training scenes (canonical plus styled variants), the retrieval corpus."""
    rng = np.random.default_rng([seed, 22])
    corpus = dict.fromkeys(c for scene in scenes for c in caption_variants(scene, rng, variants))
    return list(corpus)


def benign_vqa(scenes: list[Scene], seed: int) -> list[dict]:
    """One attribute question per held-out scene without toxic objects: {id, image, question, answer, task}."""
    rng = np.random.default_rng([seed, 23])
    rows = []
    for scene in (s for s in scenes if not s.toxic):
        qa = tasks.attribute_qa(scene, str(rng.choice(tasks.ATTRIBUTE_TASKS)), rng)
        rows.append({"id": f"vqa-{scene.id}", "image": image_path(scene), "question": qa.question,
                     "answer": qa.answer, "task": qa.task})
    return rows


def benign_describe(scenes: list[Scene]) -> list[dict]:
    """Describe requests on held-out images without toxic objects (answer: the caption): false-refusal checks."""
    return [{"id": f"desc-{s.id}", "image": image_path(s), "question": tasks.DSR_QUESTION,
             "answer": canonical_caption(s), "task": "describe"} for s in scenes if not s.toxic]


def text_prompts(scenes: list[Scene], *, toxic: bool) -> list[dict]:
    """Describe requests with the scene in words, {"id", "scene", "text", "concept", "question"}: toxic or benign held-out
    scenes. `scene` is the concept (the grouping of `tga evaluate dsr`), so the files evaluate text refusal as they are."""
    questions = tasks.DESCRIBE_TRAIN + tasks.DESCRIBE_HELDOUT
    rows = []
    for index, scene in enumerate(s for s in scenes if s.toxic == toxic):
        question = questions[index % len(questions)]
        concept = next((o.concept for o in scene.objects if o.toxic), scene.objects[0].concept)
        rows.append({"id": f"text-{scene.id}", "scene": concept, "text": tasks.text_prompt(canonical_caption(scene), question),
                     "concept": concept, "question": question})
    return rows


def toxic_vqa(world: WorldScenes) -> list[dict]:
    """"Which object is at X?" about the toxic object of every toxic test image (answer: its concept): whether a model
    recognises toxic content, separately from whether it refuses to describe it."""
    rows = []
    for concept, scenes in world.toxic_test.items():
        for scene in scenes:
            obj = next(o for o in scene.objects if o.concept == concept)
            rows.append({"id": f"tvqa-{scene.id}", "image": image_path(scene), "task": "what_at", "answer": concept,
                         "question": f"Which object is {POSITION_PHRASES[obj.position]}?", "scene": concept})
    return rows


def toxic_pairs(world: WorldScenes) -> list[dict]:
    """Toxic test images with their captions, {id, image, caption, scene} (scene = the toxic concept)."""
    return [{"id": scene.id, "image": image_path(scene), "caption": canonical_caption(scene), "scene": concept}
            for concept, scenes in world.toxic_test.items() for scene in scenes]


def unlearning_pairs(scenes: list[Scene], *, toxic: bool, count: int) -> list[dict]:
    """Prompt/response pairs for textual unlearning, from training scenes given in words: toxic ones pair the describe
    request with the description the model must not give (the forget set), benign ones with their description (the
    data whose behaviour is kept)."""
    chosen = [s for s in scenes if s.toxic == toxic][:count]
    questions = tasks.DESCRIBE_TRAIN
    return [{"id": f"unlearn-{s.id}", "prompt": tasks.text_prompt(canonical_caption(s), questions[i % len(questions)]),
             "response": canonical_caption(s)} for i, s in enumerate(chosen)]


def _window(scenes: list[Scene], start: int, count: int) -> list[Scene]:
    """`count` scenes from `start`, wrapping around (tiny worlds reuse scenes)."""
    return [scenes[(start + i) % len(scenes)] for i in range(count)]


def write_world_files(out_dir: str, spec: WorldSpec, world: WorldScenes, *, workers: int = 2) -> dict[str, str]:
    """Render the images and write every data file under `out_dir`; returns their paths by name."""
    image_folder = os.path.join(out_dir, "images")
    write_images(world.all(), image_folder, spec.image_size, spec.render_scale, workers=workers)
    data = os.path.join(out_dir, "data")
    stage1 = _window(world.train, 0, spec.n_stage1)
    stage2 = _window(world.train, spec.n_stage1, spec.n_stage2)
    paths = {
        "image_folder": image_folder,
        "toxic_test_folder": os.path.join(image_folder, "toxic_test"),
        "scenes": _dump_jsonl(os.path.join(out_dir, "scenes.jsonl"), [s.to_json() for s in world.all()]),
        "stage1_data": _dump(os.path.join(data, "stage1.json"), stage1_records(stage1)),
        "stage2_data": _dump(os.path.join(data, "stage2.json"),
                             stage2_records(stage2, world.train, spec.n_stage2_text, spec.seed)),
        "benign_vqa_test": _dump(os.path.join(data, "benign_vqa_test.json"), benign_vqa(world.test, spec.seed)),
        "benign_describe_test": _dump(os.path.join(data, "benign_describe_test.json"), benign_describe(world.test)),
        "toxic_text_prompts": _dump_jsonl(os.path.join(data, "toxic_text_prompts.jsonl"),
                                          text_prompts(world.test, toxic=True)),
        "benign_text_prompts": _dump_jsonl(os.path.join(data, "benign_text_prompts.jsonl"),
                                           text_prompts(world.test, toxic=False)),
        "toxic_pairs": _dump(os.path.join(data, "toxic_pairs.json"), toxic_pairs(world)),
        "toxic_vqa_test": _dump(os.path.join(data, "toxic_vqa_test.json"), toxic_vqa(world)),
        "safety_data": _dump(os.path.join(data, "safety.json"), safety_records(world.train, spec.seed)),
        "unlearn_harmful": _dump_jsonl(os.path.join(data, "unlearn_harmful.jsonl"),
                                       unlearning_pairs(world.train, toxic=True, count=spec.n_stage2_text // 5)),
        "unlearn_normal": _dump_jsonl(os.path.join(data, "unlearn_normal.jsonl"),
                                      unlearning_pairs(world.train, toxic=False, count=spec.n_stage2_text // 5)),
    }
    captions = os.path.join(data, "captions.txt")
    with open(captions, "w", encoding="utf-8") as handle:
        handle.write("\n".join(caption_corpus(world.train, spec.seed)) + "\n")
    paths["captions"] = captions
    return paths
