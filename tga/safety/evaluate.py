"""tga/safety/evaluate.py

Defence success rate (DSR) on toxic scenes, as in the paper's experiments: every image of every scene is
asked each prompt, the answer is judged (True = refusal, i.e. the defence succeeded), and DSR is the share
of refusals per scene, with the macro average over scenes and the micro average over all answers. Answers
are generated in batches through any generator callable (`ChatModel.generate`, an inference-time defence from
`tga.defense`, whose replies carry their cost, or a stand-in) and appended to `answers.jsonl` as each batch finishes, so a killed run resumes without regenerating them; `dsr.json`
and `dsr.md` are written from the full set at the end.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from tga.image_io import open_image
from tga.safety.cost import cost_line, cost_summary
from tga.safety.io import write_json
from tga.safety.judge import Judge
from tga.safety.resume import ResultStore, run_resumable
from tga.safety.scenes import EvalItem

# answers as strings, or as replies with `text`, `cost` and `trace` (tga.defense.base.Reply)
Generator = Callable[[list[Image.Image | None], list[str]], list[Any]]


def load_batch_images(paths: Sequence[str | None]) -> list[Image.Image | None]:
    """Load the images of a batch, decoding each distinct file once; a None path (a text-only item) stays None."""
    cache: dict[str, Image.Image] = {}
    for path in paths:
        if path is not None and path not in cache:
            cache[path] = open_image(path, os.path.basename(path))
    return [None if path is None else cache[path] for path in paths]


def answer_and_judge(
    generate: Generator,
    judge: Judge,
    images: list[Image.Image | None],
    questions: list[str],
    extras: list[dict[str, Any]] | None = None,
) -> tuple[list[str], list[bool]]:
    """Generate one answer per (image, question) and judge each; checks the generator's output length.

    Args:
        extras: when given, receives per answer what a defence's reply adds to the answer record (`cost`, and the
            `defense` trace), or {} for a plain string answer.
    """
    replies = generate(images, questions)
    if len(replies) != len(questions):
        raise RuntimeError(f"generator returned {len(replies)} answers for {len(questions)} questions")
    answers = [getattr(reply, "text", reply) for reply in replies]
    if extras is not None:
        extras += [reply_extra(reply) for reply in replies]
    return answers, judge.judge(questions, answers)


def reply_extra(reply: Any) -> dict[str, Any]:
    """The fields a defence's reply adds to its answer record: its cost, and the trace of a defence that did more
    than answer once."""
    if isinstance(reply, str):
        return {}
    extra = {"cost": reply.cost.to_dict()}
    if reply.trace:
        extra["defense"] = reply.trace
    return extra


def dsr_report(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate judged answers into DSR per scene, per prompt, macro and micro averages.

    Args:
        results: records with `scene`, `prompt` and `refusal` (bool).

    Returns:
        {"n", "refusals", "micro_dsr", "macro_dsr", "per_scene": {scene: {n, refusals, dsr}},
        "per_prompt": {prompt: {n, refusals, dsr}}}.
    """

    def summarise(groups: dict[str, list[bool]]) -> dict[str, dict[str, Any]]:
        return {name: {"n": len(v), "refusals": sum(v), "dsr": sum(v) / len(v)} for name, v in sorted(groups.items())}

    by_scene: dict[str, list[bool]] = defaultdict(list)
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for record in results:
        by_scene[record["scene"]].append(bool(record["refusal"]))
        by_prompt[record["prompt"]].append(bool(record["refusal"]))
    per_scene = summarise(by_scene)
    total = sum(s["n"] for s in per_scene.values())
    refusals = sum(s["refusals"] for s in per_scene.values())
    report = {
        "n": total,
        "refusals": refusals,
        "micro_dsr": refusals / total if total else None,
        "macro_dsr": sum(s["dsr"] for s in per_scene.values()) / len(per_scene) if per_scene else None,
        "per_scene": per_scene,
        "per_prompt": summarise(by_prompt),
    }
    cost = cost_summary([record.get("cost") for record in results])
    if cost is not None:
        report["cost"] = cost
    return report


def dsr_markdown(report: dict[str, Any]) -> str:
    """A markdown table of the DSR report (one row per scene, then the averages)."""
    lines = ["| scene | n | refusals | DSR |", "|---|---:|---:|---:|"]
    for scene, s in report["per_scene"].items():
        lines.append(f"| {scene} | {s['n']} | {s['refusals']} | {s['dsr']:.3f} |")
    if report["n"]:
        lines.append(f"| **macro average** | {report['n']} | {report['refusals']} | {report['macro_dsr']:.3f} |")
        lines.append(f"| **micro average** | {report['n']} | {report['refusals']} | {report['micro_dsr']:.3f} |")
    return "\n".join(lines) + "\n" + cost_line(report.get("cost"))


def run_dsr(
    generate: Generator,
    judge: Judge,
    items: Sequence[EvalItem],
    out_dir: str,
    *,
    batch_size: int = 8,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate DSR, resumably; writes answers.jsonl, dsr.json and dsr.md into `out_dir`.

    Args:
        generate: maps (images, questions) to answers, batched.
        judge: classifies answers (True = refusal).
        items: the (scene, image, prompt) items (see `load_scene_items`).
        out_dir: output folder; an existing answers.jsonl from the same settings is resumed.
        batch_size: items per generation call.
        settings: what produces the answers (model, judge, generation options); a rerun with different
            settings refuses to mix results unless `overwrite`.
        overwrite: discard existing answers.

    Returns:
        The DSR report (also in dsr.json).
    """
    store = ResultStore(
        os.path.join(out_dir, "answers.jsonl"),
        {"task": "dsr", "judge": judge.name, **(settings or {})},
        overwrite=overwrite,
    )

    def process(batch: list[EvalItem]) -> list[dict[str, Any]]:
        images = load_batch_images([item.image for item in batch])
        extras: list[dict[str, Any]] = []
        answers, verdicts = answer_and_judge(generate, judge, images, [item.prompt for item in batch], extras)
        return [
            {
                "scene": item.scene,
                "image": item.image_id,
                "prompt": item.prompt,
                "answer": answer,
                "refusal": bool(verdict),
                **extra,
            }
            for item, answer, verdict, extra in zip(batch, answers, verdicts, extras)
        ]

    results = run_resumable(
        items, [item.key for item in items], store, process, batch_size=batch_size, desc="DSR evaluation"
    )
    report = dsr_report(results)
    write_json(os.path.join(out_dir, "dsr.json"), report)
    with open(os.path.join(out_dir, "dsr.md"), "w", encoding="utf-8") as handle:
        handle.write(dsr_markdown(report))
    return report
