"""tga/bench/readers.py

The registry of benchmark readers: `--benchmark NAME` maps to the function that reads that benchmark's released
files from `--data`. Reader options (image types, subsets, steps, prompts) are passed as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tga.bench.figstep import read_figstep
from tga.bench.hades import read_hades
from tga.bench.items import BenchItem
from tga.bench.jailbreakv import read_jailbreakv
from tga.bench.mmsafetybench import read_mm_safetybench
from tga.bench.project import read_demo, read_scenes
from tga.bench.siuo import read_siuo
from tga.bench.spavl import read_spavl
from tga.bench.vlguard import read_vlguard
from tga.errors import ConfigError

BENCHMARKS: dict[str, Callable[..., list[BenchItem]]] = {
    "mm-safetybench": read_mm_safetybench,
    "figstep": lambda data, **kw: read_figstep(data, "figstep"),
    "safebench-tiny": lambda data, **kw: read_figstep(data, "safebench-tiny"),
    "vlguard": read_vlguard,
    "hades": read_hades,
    "siuo": read_siuo,
    "jailbreakv-mini": lambda data, **kw: read_jailbreakv(data, "jailbreakv-mini"),
    "jailbreakv": lambda data, **kw: read_jailbreakv(data, "jailbreakv"),
    "spa-vl-harm": lambda data, **kw: read_spavl(data, "spa-vl-harm"),
    "spa-vl-help": lambda data, **kw: read_spavl(data, "spa-vl-help"),
    "scenes": read_scenes,
    "demo": read_demo,
}


def read_benchmark(name: str, data: str, **options: Any) -> list[BenchItem]:
    """Read benchmark `name` from `data`; `options` holds only the options that benchmark takes (None = default)."""
    if name not in BENCHMARKS:
        raise ConfigError(f"--benchmark: `{name}` is not supported (choose from {', '.join(BENCHMARKS)})")
    options = {k: v for k, v in options.items() if v is not None}
    return BENCHMARKS[name](data, **options)
