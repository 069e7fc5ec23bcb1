"""tga/cli/bench_cmd.py

`tga evaluate bench`: a published safety benchmark read from its own released files (`--benchmark`, `--data`),
answered by a checkpoint, through an inference-time defence if asked (`--defense`, the option of `tga evaluate dsr`),
judged by a keyword preset or an LLM judge, with `answers.jsonl` (resumable),
`report.json`, `report.md` and `report.png` in `--out`. The benchmark files are read and checked before any model
is loaded. Thin: the work is in `tga.bench`.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from tga.bench.keywords import JUDGES, PRESETS
from tga.bench.mmsafetybench import IMAGE_TYPES, QUESTION_FOR_TYPE
from tga.bench.readers import BENCHMARKS
from tga.bench.vlguard import SUBSETS
from tga.defense.dispatch import add_defense_args, check_flags
from tga.safety.scenes import DEFAULT_PROMPTS


def resolve_device(device: str) -> str:
    """`auto` is the GPU when there is one, else the CPU; anything else is passed to torch as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _reader_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "mm-safetybench": {"image_types": args.image_types},
        "vlguard": {"subsets": args.subsets},
        "hades": {"steps": args.hades_steps},
        "scenes": {"prompts": args.prompts},
    }.get(args.benchmark, {})


def _bench(args: argparse.Namespace) -> int:
    from tga.bench.answer import ModelBundle
    from tga.bench.guards import get_bench_judge
    from tga.bench.readers import read_benchmark
    from tga.bench.report import report_markdown
    from tga.bench.runner import run_bench
    from tga.defense.dispatch import build_defense
    from tga.errors import ConfigError
    from tga.safety.io import ensure_model_dir
    from tga.safety.loading import load_chat

    ensure_model_dir(args.model)
    check_flags(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    items = read_benchmark(args.benchmark, args.data, **_reader_options(args))
    items = items[: args.limit] if args.limit else items
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else None)
    judge = get_bench_judge(args.judge, args.judge_model, device=device, dtype=dtype, batch_size=args.batch_size)
    chat = load_chat(args.model, device=device, dtype=dtype, template=args.template)
    defense = build_defense(args, chat=chat)
    settings = {
        "benchmark": args.benchmark, "data": os.path.abspath(args.data), "model": os.path.abspath(args.model),
        "max_new_tokens": args.max_new_tokens, "dtype": dtype, "template": args.template,
        "judge_model": os.path.abspath(args.judge_model) if args.judge_model else None,
        **{k: v for k, v in _reader_options(args).items()},
        **defense.settings(),  # the defence and its options (nothing without one, so earlier answers resume)
    }
    refusal_keywords = args.refusal_keywords or (
        args.judge.removeprefix("keyword-") if args.judge.startswith("keyword-") else "project")
    bundle = ModelBundle(chat, args.max_new_tokens, os.path.basename(os.path.abspath(args.model)), defense)
    report = run_bench(bundle, judge, items, args.out, refusal_keywords=refusal_keywords, batch_size=args.batch_size,
                       settings=settings, overwrite=args.overwrite)
    print(report_markdown(report), end="")
    print(f"results in {args.out}")
    return 0


def add_parser(kinds: argparse._SubParsersAction) -> None:
    """Add `bench` under `tga evaluate`."""
    bench = kinds.add_parser("bench", help="published safety benchmarks (MM-SafetyBench, FigStep, VLGuard, ...)")
    bench.add_argument("--benchmark", required=True, choices=list(BENCHMARKS), help="which benchmark --data holds")
    bench.add_argument("--data", required=True, help="the benchmark's folder as released (or its main file)")
    bench.add_argument("--model", required=True, help="checkpoint folder (HF Llava)")
    bench.add_argument("--out", required=True, help="output folder (resumed if it holds earlier answers)")
    bench.add_argument("--judge", choices=list(JUDGES), default="keyword-project",
                       help="who decides whether an answer is unsafe (keyword presets or an LLM judge)")
    bench.add_argument("--judge_model", default=None, help="local HF folder of the LLM judge (llama-guard-3*, md-judge)")
    bench.add_argument("--refusal_keywords", choices=list(PRESETS), default=None,
                       help="keyword preset that decides refusals (over-refusal on benign items); default: the "
                            "keyword judge's own preset, or project with an LLM judge")
    bench.add_argument("--image_types", nargs="+", choices=list(QUESTION_FOR_TYPE), default=list(IMAGE_TYPES),
                       help="MM-SafetyBench image types to ask (text_only: the original question, no image)")
    bench.add_argument("--subsets", nargs="+", choices=list(SUBSETS), default=list(SUBSETS),
                       help="VLGuard subsets to ask")
    bench.add_argument("--hades_steps", choices=["last", "all"], default="last",
                       help="HADES: the final optimisation step's images only, or every step's")
    bench.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS),
                       help="questions asked about every image of a scenes folder (--benchmark scenes)")
    bench.add_argument("--limit", type=int, default=None, help="answer only the first N items (a quick check)")
    bench.add_argument("--batch_size", type=int, default=8, help="requests per generate call")
    bench.add_argument("--max_new_tokens", type=int, default=128, help="answer length limit")
    bench.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    bench.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    bench.add_argument("--template", default=None, help="conversation template instead of the model's own")
    bench.add_argument("--overwrite", action="store_true", help="discard earlier answers in --out")
    add_defense_args(bench)
    bench.set_defaults(func=_bench)
