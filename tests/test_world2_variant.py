"""research/world2/variant.py: the table rows of measured world-2 variants, the rank-curve plot across depths, and
config typos refused by name (the measuring itself is a training run, exercised by the world-2 build tests)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def variant():
    from research.world2 import variant

    return variant


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
    assert row == ("| wide | 0.70 (0.90 / 0.50 / 0.25) | 0.04 | 1.00 | 0.00 | 50% / 12% / 38% | 5% | 7% | 0.50 | 812 | "
                   "no (1/4) / no (2/8) |")  # only benign activation 0.05 and held-out benign refusal 0.04 pass


def _passing_summary() -> dict:
    """A summary at the edge of criteria 1 and 2: every number exactly at its threshold."""
    toxic = {"refusal": 0.9, "train_wording": 0.9, "heldout_question": 0.9, "heldout_description": 0.9,
             "activating": 0.95, "in_band": 0.9}
    benign = {"refusal": 0.05, "train_wording": 0.05, "heldout_question": 0.05, "heldout_description": 0.05,
              "activating": 0.05, "in_band": 0.0}
    return {"heldout_toxic": dict(toxic), "trained_toxic": dict(toxic), "heldout_benign": dict(benign),
            "trained_benign": dict(benign)}


@pytest.mark.parametrize(("group", "key", "value", "verdict"), [
    (None, None, None, {1: True, 2: True}),
    ("trained_toxic", "in_band", 0.89, {1: False, 2: True}),  # the trained names count as toxic prompts too
    ("trained_benign", "activating", 0.06, {1: False, 2: True}),
    ("heldout_benign", "heldout_question", 0.06, {1: True, 2: False}),  # a paraphrase must keep the number
    ("heldout_toxic", "heldout_description", 0.89, {1: True, 2: False}),
    ("trained_toxic", "refusal", 0.5, {1: True, 2: True}),  # criterion 2 is about held-out names only
])
def test_criteria_hold_at_their_thresholds_and_fail_one_step_past(group, key, value, verdict):
    from research.world2.criteria import checks_met, text_llm_checks

    summary = _passing_summary()
    if group:
        summary[group][key] = value
    assert {c: met == total for c, (met, total) in checks_met(text_llm_checks(summary)).items()} == verdict


def test_spread_gives_mean_range_and_seeds_met_per_check(variant, tmp_path, capsys):
    folders = []
    for seed, in_band in enumerate((0.95, 0.5, 0.8)):
        summary = _passing_summary()
        summary["heldout_toxic"]["in_band"] = in_band
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(summary))
        folders.append(str(folder))
    assert variant.main(["--spread", "closest=" + ",".join(folders)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("| closest (3 seeds) |")
    row = next(line for line in lines if "heldout_toxic activating in band" in line)
    assert row == "| 1: heldout_toxic activating in band | >= 0.9 | 0.75 (0.50-0.95), met 1/3 |"


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


def test_layer_plot_draws_toxic_and_benign_layers_of_each_run(variant, tmp_path):
    runs = []
    for name, toxic, benign in (("prior", [1, 1, 1], [1, 1, None]), ("decision", [4, 4, None], [None, None, None])):
        for group, layers in (("heldout_toxic", toxic), ("heldout_benign", benign)):
            folder = tmp_path / name / "activation" / group
            folder.mkdir(parents=True)
            (folder / "activation.json").write_text(json.dumps({"layers": layers, "num_layers": 10}))
        runs.append(f"{name}={tmp_path / name}")
    png = tmp_path / "layers.png"
    assert variant.main(["--layer_plot", str(png), "--runs", *runs]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(SystemExit):
        variant.main(["--layer_plot", str(png)])  # no --runs: a usage error, not a traceback


def test_a_measurement_stopped_after_training_reuses_only_an_llm_of_the_same_specs(variant, tmp_path):
    calls = []

    def train():
        calls.append(1)
        (tmp_path / "llm").mkdir(exist_ok=True)
        (tmp_path / "llm" / "metrics.json").write_text(json.dumps({"final_loss": 0.4, "run": len(calls)}))
        return {"final_loss": 0.4, "run": len(calls)}

    specs = {"world": {"wordings": "wide", "mix": (0.25, 0.75)}, "llm": {"steps": 3000}, "seed": 1}
    assert variant._trained(str(tmp_path), specs, train)["run"] == 1
    assert variant._trained(str(tmp_path), specs, train)["run"] == 1 and len(calls) == 1  # read back, not retrained
    assert variant._trained(str(tmp_path), {**specs, "seed": 2}, train)["run"] == 2  # another seed trains again
