"""scripts/world2_variant.py: the table rows of measured world-2 variants, the rank-curve plot across depths, and
config typos refused by name (the measuring itself is a training run, exercised by the world-2 build tests)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "world2_variant.py")


@pytest.fixture(scope="module")
def variant():
    spec = importlib.util.spec_from_file_location("world2_variant", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _group(refusal: float, activating: float) -> dict:
    return {"refusal": refusal, "train_wording": 0.9, "heldout_question": 0.5, "heldout_description": 0.25,
            "describe_acc": 0.5, "activating": activating, "in_band": 0.125, "early": 0.375, "layers": {},
            "median_rank_per_layer": [3, 1, 9]}


def test_table_row_reads_every_group_of_a_summary(variant, tmp_path, capsys):
    summary = {"world": {}, "llm": {}, "seed": 0, "train_seconds": 812.4, "final_loss": 0.4,
               "heldout_toxic": _group(0.7, 0.5), "heldout_benign": _group(0.04, 0.05),
               "trained_toxic": _group(1.0, 0.6), "trained_benign": _group(0.0, 0.07)}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert variant.main(["--table", f"wide={tmp_path}"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row == ("| wide | 0.70 (0.90 / 0.50 / 0.25) | 0.04 | 1.00 | 0.00 | 50% / 12% / 38% | 5% | 7% | 0.50 | 812 |")


def test_rank_plot_puts_models_of_different_depths_on_one_png(variant, tmp_path):
    for name, ranks in (("w1", [1, 4, 9, 20, 30, 40]), ("w2", [5, 3, 2, 1, 4, 9, 12, 30, 50, 60])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"median_rank_per_layer": ranks}))
    png = tmp_path / "ranks.png"
    assert variant.main(["--rank_plot", str(png), "--curves", f"world 1={tmp_path / 'w1.json'}",
                         f"world 2={tmp_path / 'w2.json'}"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--world", '{"wording": "wide"}', "--world: World2Spec has no field wording"),
    ("--llm", "steps=2000", "--llm is not JSON"),
    ("--llm", "[2000]", "--llm must be a JSON object"),
])
def test_config_typos_are_refused_by_name(variant, tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        variant.main(["--out", str(tmp_path / "v"), flag, value])
    assert not (tmp_path / "v").exists()
