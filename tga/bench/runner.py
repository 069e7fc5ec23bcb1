"""tga/bench/runner.py

Runs a benchmark: items are answered in batches through `answer.answer_requests`, each answer is judged by the
chosen judge and checked for refusal keywords (an answer from a defence also keeps its cost and the defence's trace),
and every finished batch is appended to `answers.jsonl` through the project's resumable result store
(`tga.safety.resume`), so a killed run continues where it stopped and a rerun with other settings refuses to mix
results. The report is then recomputed from the saved answers alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from tga.bench.answer import ModelBundle, answer_requests
from tga.bench.items import BenchItem, ParquetImage
from tga.bench.keywords import RefusalKeywords
from tga.bench.metrics import bench_report
from tga.bench.parquet import ParquetImageLoader
from tga.bench.report import write_report
from tga.image_io import open_image
from tga.safety.evaluate import reply_extra
from tga.safety.resume import ResultStore, run_resumable

# answers as strings, or as replies with `text`, `cost` and `trace` (a defence, tga.defense.base.Reply)
Answerer = Callable[[Sequence[Image.Image | None], Sequence[str]], list[Any]]


class ImageSource:
    """Loads the images of a batch: files decoded once per batch, parquet cells through one loader."""

    def __init__(self) -> None:
        self.parquet = ParquetImageLoader()

    def load(self, refs: Sequence[str | ParquetImage | None]) -> list[Image.Image | None]:
        cache: dict[Any, Image.Image] = {}
        images: list[Image.Image | None] = []
        for ref in refs:
            if ref is None:
                images.append(None)
                continue
            if ref not in cache:
                cache[ref] = self.parquet.load(ref) if isinstance(ref, ParquetImage) else open_image(ref, os.path.basename(ref))
            images.append(cache[ref])
        return images


def item_record(item: BenchItem) -> dict[str, Any]:
    """The item's fields that go into its saved line."""
    return {"benchmark": item.benchmark, "id": item.id, "subset": item.subset, "category": item.category,
            "image_type": item.image_type, "harmful": item.harmful, "request": item.request,
            "judged_request": item.judge_text}


def run_bench(
    model: ModelBundle | Answerer,
    judge: Any,
    items: Sequence[BenchItem],
    out_dir: str,
    *,
    refusal_keywords: str = "project",
    batch_size: int = 8,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Answer, judge and report a benchmark; writes answers.jsonl, report.json, report.md and report.png.

    Args:
        model: a `ModelBundle` (answered through `answer_requests`, with its defence) or any batched
            (images, requests) -> answers (strings, or replies of a defence, named by its `name`).
        judge: a benchmark judge (`keywords.KeywordBenchJudge` or one of `guards`).
        items: the benchmark's items (see `readers.read_benchmark`).
        out_dir: output folder; earlier answers from the same settings are resumed.
        refusal_keywords: the keyword preset that decides refusals (over-refusal on benign items).
        batch_size: items per generation call.
        settings: what produces the answers (model, data, generation options); compared on resuming.
        overwrite: discard earlier answers.

    Returns:
        The report (also in report.json).
    """
    if isinstance(model, ModelBundle):
        answer, defense = (lambda images, requests: answer_requests(model, images, requests)), model.defense_name
    else:
        answer, defense = model, getattr(model, "name", "none")
    refusals = RefusalKeywords(refusal_keywords)
    store = ResultStore(os.path.join(out_dir, "answers.jsonl"),
                        {"task": "bench", "judge": judge.name, "refusal_keywords": refusal_keywords, **(settings or {})},
                        overwrite=overwrite)
    source = ImageSource()

    def process(batch: list[BenchItem]) -> list[dict[str, Any]]:
        images = source.load([item.image for item in batch])
        replies = answer(images, [item.request for item in batch])
        if len(replies) != len(batch):
            raise RuntimeError(f"got {len(replies)} answers for {len(batch)} requests")
        answers = [getattr(reply, "text", reply) for reply in replies]
        verdicts = judge.judge(batch, images, answers)
        return [{**item_record(item), "answer": text, "unsafe": verdict.unsafe, "judge_output": verdict.output,
                 "refused": refusals.refusal(text) is not None, **reply_extra(reply)}
                for item, text, reply, verdict in zip(batch, answers, replies, verdicts)]

    results = run_resumable(items, [item.key for item in items], store, process, batch_size=batch_size,
                            desc="benchmark")
    report = bench_report(results, judge=judge.name, refusal_keywords=refusal_keywords, defense=defense)
    write_report(report, out_dir)
    return report
