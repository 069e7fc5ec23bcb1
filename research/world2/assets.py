"""research/world2/assets.py

Demo world 2's steps, cached the way world 1's are (`tga.demo.assets`: a step whose folder holds the hash of its spec
is skipped): the text world (vocabulary, training corpus, test prompts) and the text LLM trained on it. World 2's
images and CLIP are not built, and no world-2 model ships, so its LLM is always trained. From a checkout:

    python -m research.world2.assets --out runs/w2 [--seed 0] [--size full|tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from research.world2.corpus import write_world2_files
from research.world2.llm import train_world2_llm, world2_llm_spec
from research.world2.world import CATEGORIES, HARMFUL_CATEGORIES, world2_spec
from tga.demo import tasks
from tga.demo.assets import cached_step, spec_key
from tga.demo.text_corpus import TEMPLATE

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


def report(paths: dict[str, str]) -> None:
    """Print what was built or reused and the LLM's refusal per prompt group."""
    with open(paths["assets_json"], encoding="utf-8") as handle:
        summary = json.load(handle)
    for name, step in summary["steps"].items():
        print(f"{name:6s} {'reused' if step['cached'] else 'built':7s} ({step['seconds']:.1f} s when built)")
    llm = summary["llm_metrics"]
    for group in ("heldout_toxic", "heldout_benign", "trained_toxic", "trained_benign"):
        g = llm[group]
        print(f"LLM refusal, {group}: {g['refusal']:.3f} (train wording {g['refusal_train_wording']:.3f}, held-out "
              f"request {g['refusal_heldout_question']:.3f}, held-out description {g['refusal_heldout_description']:.3f})")
    print(f"assets: {paths['assets_json']}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Build (or reuse) demo world 2's text world and text LLM.")
    parser.add_argument("--out", required=True, help="assets folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of the training")
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full world 2 or a tiny test one")
    args = parser.parse_args(argv)
    report(build_world2_assets(args.out, seed=args.seed, size=args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
