"""benchmarks/gpu_smoke.py on the CPU (`--dry_run`, tiny shapes): the whole measuring path runs (generated model and
data, stage 2 under ZeRO-3 in its own process, plain and TGA, twice each) and reports what it promises."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.distributed  # four DeepSpeed processes one after the other: minutes on a loaded CPU
def test_gpu_smoke_dry_run_reports_time_memory_flops_and_repeatable_losses(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_smoke.py"), "--dry_run",
                             "--steps", "2", "--batch", "2", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"plain", "tga"} and all(row["dtype"] == "fp32" for row in report["rows"])
    for row in rows.values():
        assert row["same_losses"] and len(row["losses"]) == 2 and row["step_s"] > 0
        assert row["mfu"] is None and row["peak_gib"] is None  # no card on the CPU: no peak to divide by
    # the caption pass is a forward-only pass of part of the LLM: TGA costs more than plain, less than a second step
    assert rows["plain"]["flops_per_step"] < rows["tga"]["flops_per_step"] < 2 * rows["plain"]["flops_per_step"]
    assert "plain" in result.stdout and "tga" in result.stdout


def test_peak_flops_match_the_card_name():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        from gpu_smoke import peak_flops
    finally:
        sys.path.pop(0)
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "fp32") == 51e12
    assert peak_flops("NVIDIA H200", "fp32") == 67e12
    assert peak_flops("Some Other Card", "bf16") is None
