"""tga/demo/world2_assets.py

`build_assets(..., world=2)`: demo world 2's steps, cached the way world 1's are (a step whose folder holds the hash of
its spec is skipped): the text world (vocabulary, training corpus, test prompts) and the text LLM trained on it.
World 2's images and CLIP are not built yet, and no world-2 model ships, so its LLM is always trained.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from tga.demo import tasks
from tga.demo.assets import cached_step, spec_key
from tga.demo.text_corpus import TEMPLATE
from tga.demo.world2 import CATEGORIES, HARMFUL_CATEGORIES, world2_spec
from tga.demo.world2_corpus import write_world2_files
from tga.demo.world2_llm import train_world2_llm, world2_llm_spec

WORLD2_FILES_VERSION = 1


def world2_step_keys(seed: int, size: str) -> dict[str, str]:
    """The keys of world 2's world and LLM steps (they name world 2, so no world-1 key can equal them)."""
    world_key = spec_key({"world": 2, **asdict(world2_spec(size, seed))})
    return {"world": spec_key(world_key, {"files": WORLD2_FILES_VERSION}),
            "llm": spec_key(world_key, asdict(world2_llm_spec(size)))}


def build_world2_assets(out_dir: str, *, seed: int = 0, size: str = "full") -> dict[str, str]:
    """Build (or reuse) world 2's text world and text LLM under `out_dir`; returns their paths by name, with
    `assets_json` (specs, metrics and wall times)."""
    os.makedirs(out_dir, exist_ok=True)
    spec, keys = world2_spec(size, seed), world2_step_keys(seed, size)
    world_dir, llm_dir = os.path.join(out_dir, "world"), os.path.join(out_dir, "llm")

    def write_world() -> dict[str, str]:  # relative paths: a moved assets folder stays valid
        return {name: os.path.relpath(path, out_dir) for name, path in write_world2_files(world_dir, spec).items()}

    world_step = cached_step(world_dir, keys["world"], write_world, "world")
    paths = {name: os.path.join(out_dir, path) for name, path in world_step["result"].items()}
    llm_step = cached_step(llm_dir, keys["llm"], lambda: train_world2_llm(
        paths, llm_dir, spec=world2_llm_spec(size), seed=seed), "llm")
    paths.update(llm=llm_dir, assets_json=os.path.join(out_dir, "assets.json"))
    summary = {
        "world_version": 2, "seed": seed, "size": size, "paths": paths,
        "world": {**asdict(spec), "categories": list(CATEGORIES), "harmful_categories": list(HARMFUL_CATEGORIES)},
        "chat_template": TEMPLATE, "refusal": tasks.REFUSAL,
        "steps": {step["step"]: {k: step[k] for k in ("key", "seconds", "cached", "prebuilt")}
                  for step in (world_step, llm_step)},
        "llm_metrics": llm_step["result"],
    }
    temporary = paths["assets_json"] + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    os.replace(temporary, paths["assets_json"])
    return paths
