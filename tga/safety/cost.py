"""tga/safety/cost.py

The inference cost of a defence in the evaluation reports: per-request means of the costs stored with every answer
(generations, prompt tokens, generated tokens) and their ratios to answering without a defence. Kept free of model
imports, so the evaluation code reads costs without loading torch models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def total(values: Sequence[int | None]) -> int | None:
    """The sum of token counts, None if any is unknown."""
    return None if any(value is None for value in values) else sum(values)


def cost_summary(costs: Sequence[dict[str, int | None]]) -> dict[str, Any] | None:
    """Per-request means of a run's costs and the ratios to no defence.

    Ratios: generations over the one generation an undefended request takes; prompt tokens over the undefended
    prompts' tokens (both exact). Generated tokens are reported as a mean only: the undefended answer's length is
    known only where the defence generated it (compare with a run without a defence on the same data).

    Returns:
        {"requests", "generations_per_request", "prompt_tokens_per_request", "new_tokens_per_request",
         "relative": {"generations", "prompt_tokens"}}, or None when no record has a cost.
    """
    costs = [c for c in costs if c]
    if not costs:
        return None
    n = len(costs)

    def mean(name: str) -> float | None:
        values = total([c.get(name) for c in costs])
        return None if values is None else values / n

    prompt, plain = total([c["prompt_tokens"] for c in costs]), total([c["plain_prompt_tokens"] for c in costs])
    return {
        "requests": n,
        "generations_per_request": mean("generations"),
        "prompt_tokens_per_request": mean("prompt_tokens"),
        "new_tokens_per_request": mean("new_tokens"),
        "relative": {"generations": mean("generations"),
                     "prompt_tokens": prompt / plain if prompt is not None and plain else None},
    }


def cost_line(summary: dict[str, Any] | None) -> str:
    """One markdown line for the reports; empty without costs."""
    if not summary:
        return ""

    def fmt(value: float | None, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:.2f}{unit}"

    relative = summary["relative"]
    return (f"\nInference cost per request: {fmt(summary['generations_per_request'])} generations "
            f"({fmt(relative['generations'], '×')} no defence), {fmt(summary['prompt_tokens_per_request'])} prompt "
            f"tokens ({fmt(relative['prompt_tokens'], '×')} the undefended prompt), "
            f"{fmt(summary['new_tokens_per_request'])} generated tokens.\n")
