"""tga/demo/assets.py

`build_assets` makes everything the demo VLM starts from, in one folder: the world (images and data files), the tiny
CLIP and the tiny text LLM, plus `assets.json` describing them. Each step stores the hash of its spec (the world's
spec, plus the step's own) in `demo_spec.json` when it finishes; a step whose folder holds the same hash is skipped,
and a step whose spec changed is rebuilt from scratch, along with the steps that depend on it.

The full world's two models (seed 0) ship with the package in `tga/demo/prebuilt/`, trained by this module
(`make demo-models` rebuilds them): a model step whose key equals the shipped model's key copies it instead of
training for ~12 minutes; `train_models=True` (`tga demo-assets --train_models`) trains them anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict

from tga.demo import tasks
from tga.demo.clip_train import clip_spec, train_clip
from tga.demo.datasets import write_world_files
from tga.demo.text_corpus import TEMPLATE
from tga.demo.text_llm import text_llm_spec, train_text_llm
from tga.demo.training import timed
from tga.demo.world import BENIGN_CONCEPTS, COLOURS, TOXIC_CONCEPTS, Scene, WorldScenes, build_scenes, world_spec

SPEC_FILE = "demo_spec.json"
PREBUILT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prebuilt")
# Bumped when the world's test files or data files change but not its training and held-out scenes (the toxic test
# scenes, a new test file): the world folder is rewritten, while the tiny CLIP and the text LLM, trained and measured
# on the training and held-out scenes only, are kept.
WORLD_FILES_VERSION = 3


def spec_key(*parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _stored(folder: str) -> dict | None:
    path = os.path.join(folder, SPEC_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _copy_prebuilt(source: str, folder: str, shipped: dict) -> dict:
    """Copy a shipped model folder; its spec file goes last (with `prebuilt` set), so a cut copy is not finished."""
    for name in sorted(os.listdir(source)):
        if name != SPEC_FILE:
            copy = shutil.copytree if os.path.isdir(os.path.join(source, name)) else shutil.copy2
            copy(os.path.join(source, name), os.path.join(folder, name))
    record = {**shipped, "prebuilt": True}
    with open(os.path.join(folder, SPEC_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    return record


def cached_step(folder: str, key: str, build: Callable[[], dict], name: str, *, prebuilt: str | None = None,
                train: bool = False) -> dict:
    """Run `build` (which fills `folder`) unless `folder` already holds a finished build with the same `key`.

    Args:
        folder: the step's folder.
        key: the hash of the step's spec.
        build: fills `folder`, returns the step's result (metrics or paths).
        name: the step's name.
        prebuilt: a shipped folder built by this step; copied instead of building when its key equals `key`.
        train: build even when `folder` holds a copy of a shipped build, and do not copy one.

    Returns the step's record: its key, its wall time when it was built, its result, whether this call reused it
    (`cached`) and whether the build is a shipped one (`prebuilt`).
    """
    stored = _stored(folder)
    if stored is not None and stored.get("key") == key and not (train and stored.get("prebuilt")):
        return {"prebuilt": False, **stored, "cached": True}
    if os.path.exists(folder):
        shutil.rmtree(folder)  # a stale or unfinished build: start clean so no old file survives
    os.makedirs(folder)
    shipped = _stored(prebuilt) if prebuilt and not train else None
    if shipped is not None and shipped.get("key") == key:
        return {**_copy_prebuilt(prebuilt, folder, shipped), "cached": True}
    with timed() as clock:
        result = build()
    record = {"step": name, "key": key, "seconds": round(clock(), 1), "result": result}
    with open(os.path.join(folder, SPEC_FILE), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    return {**record, "prebuilt": False, "cached": False}


def step_keys(seed: int, size: str) -> dict[str, str]:
    """The keys of the world, CLIP and LLM steps for a world size and seed (what a shipped model must match)."""
    world_key = spec_key(asdict(world_spec(size, seed)))
    return {"world": spec_key(world_key, {"files": WORLD_FILES_VERSION}),
            "clip": spec_key(world_key, asdict(clip_spec(size))),
            "llm": spec_key(world_key, asdict(text_llm_spec(size)))}


def matching_prebuilt(seed: int, size: str, prebuilt_dir: str = PREBUILT_DIR) -> dict[str, str | None]:
    """{"clip": folder, "llm": folder}: each shipped model whose key matches this world (copied instead of trained),
    None for a model that would be trained."""
    keys = step_keys(seed, size)
    folders = {name: os.path.join(prebuilt_dir, name) for name in ("clip", "llm")}
    return {name: folder if (_stored(folder) or {}).get("key") == keys[name] else None
            for name, folder in folders.items()}


def _load_scenes(path: str) -> WorldScenes:
    world = WorldScenes()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            scene = Scene.from_json(json.loads(line))
            split = scene.id.split("/")[0]
            if split == "toxic_test":
                world.toxic_test.setdefault(scene.id.split("/")[1], []).append(scene)
            else:
                getattr(world, split).append(scene)
    return world


def build_assets(out_dir: str, *, seed: int = 0, size: str = "full", workers: int = 2, train_models: bool = False,
                 prebuilt_dir: str = PREBUILT_DIR) -> dict[str, str]:
    """Build (or reuse) the demo world, its tiny CLIP and its tiny text LLM under `out_dir`.

    Args:
        out_dir: the assets folder (created if needed).
        seed: the world's and both trainings' seed.
        size: "full" (the `make demo` world) or "tiny" (a few seconds, for tests).
        workers: processes that render images.
        train_models: train the CLIP and the LLM even when shipped ones (in `prebuilt_dir`) match their spec.
        prebuilt_dir: where shipped models are looked up (`clip/`, `llm/`).

    Returns:
        Paths by name: `image_folder`, `toxic_test_folder`, `stage1_data`, `stage2_data`, `captions`,
        `benign_vqa_test`, `benign_describe_test`, `toxic_vqa_test`, `toxic_text_prompts`, `benign_text_prompts`, `toxic_pairs`,
        `scenes`, `clip`, `llm` and `assets_json` (which also records specs, metrics and wall times).
    """
    os.makedirs(out_dir, exist_ok=True)
    w_spec, c_spec = world_spec(size, seed), clip_spec(size)
    world_dir, clip_dir, llm_dir = (os.path.join(out_dir, name) for name in ("world", "clip", "llm"))
    keys = step_keys(seed, size)
    scenes: list[WorldScenes] = []

    def world() -> WorldScenes:  # scenes are drawn (or read back) only when a step needs them
        if not scenes:
            path = os.path.join(world_dir, "scenes.jsonl")
            scenes.append(_load_scenes(path) if os.path.exists(path) else build_scenes(w_spec))
        return scenes[0]

    def write_world() -> dict[str, str]:  # paths are kept relative, so a moved assets folder stays valid
        written = write_world_files(world_dir, w_spec, world(), workers=workers)
        return {name: os.path.relpath(path, out_dir) for name, path in written.items()}

    world_step = cached_step(world_dir, keys["world"], write_world, "world")
    paths = {name: os.path.join(out_dir, path) for name, path in world_step["result"].items()}

    def model_step(name: str, build: Callable[[], dict]) -> dict:
        return cached_step(os.path.join(out_dir, name), keys[name], build, name,
                           prebuilt=os.path.join(prebuilt_dir, name), train=train_models)

    clip_step = model_step("clip", lambda: train_clip(paths["image_folder"], world().train, world().test, clip_dir,
                                                      spec=c_spec, image_size=w_spec.image_size, seed=seed))
    llm_step = model_step("llm", lambda: train_text_llm(world().train, world().test, llm_dir,
                                                        spec=text_llm_spec(size), seed=seed))
    paths.update(clip=clip_dir, llm=llm_dir, assets_json=os.path.join(out_dir, "assets.json"))
    summary = {
        "seed": seed, "size": size, "paths": paths,
        "world": {**asdict(w_spec), "benign_concepts": list(BENIGN_CONCEPTS), "toxic_concepts": list(TOXIC_CONCEPTS),
                  "colours": list(COLOURS), "image_tokens": (w_spec.image_size // c_spec.patch_size) ** 2},
        "chat_template": TEMPLATE, "refusal": tasks.REFUSAL, "dsr_question": tasks.DSR_QUESTION,
        "describe_questions": {"train": list(tasks.DESCRIBE_TRAIN), "heldout": list(tasks.DESCRIBE_HELDOUT)},
        "steps": {step["step"]: {k: step[k] for k in ("key", "seconds", "cached", "prebuilt")}
                  for step in (world_step, clip_step, llm_step)},
        "clip_metrics": clip_step["result"], "llm_metrics": llm_step["result"],
    }
    temporary = paths["assets_json"] + ".tmp"  # runs of other seeds may be reading it: replace it whole
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    os.replace(temporary, paths["assets_json"])
    return paths
