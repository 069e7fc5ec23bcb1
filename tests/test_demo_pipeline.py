"""The demo pipeline end to end on the tiny world (`tga sweep` with a reduced plan): every phase runs through the real
`tga` commands, the report has every method x seed x stage, each number lies in [0, 1] and equals what the saved
answers give, finished phases are reused, a run is deterministic, and plans are checked before anything runs."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from tga.cli import main
from tga.demo.pipeline import run_plan
from tga.demo.plan import load_plan, parse_plan
from tga.errors import ConfigError

RATES = ("image_dsr", "describes_toxic", "recognises_toxic", "text_refusal", "benign_vqa_accuracy",
         "benign_describe_accuracy", "benign_describe_concepts", "false_refusal")


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tga", "demo", "configs")


def plan_file(folder, methods, seeds=(0,)) -> str:
    plan = {"assets": {"size": "tiny", "seed": 0}, "seeds": list(seeds),
            "configs": {stage: os.path.join(SHIPPED, f"{name}.yaml")
                        for stage, name in (("stage1", "pretrain"), ("stage2", "finetune"), ("unlearn", "unlearn"))},
            "evaluation": {"max_new_tokens": 6, "batch_size": 32}, "methods": methods}
    path = os.path.join(folder, "plan.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(plan, handle)
    return path


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    guide = {"tga": True, "tga_layers": "1-2"}  # the untrained tiny LLM has no activation layer for `auto`
    defenses = {"ecso": {"ecso_mode": "always", "ecso_caption_prompt": "Describe the image.",
                         "ecso_answer_prompt": "{caption}\n{request}"},
                "cmrm": {"calibration_samples": 4, "cmrm_layers": "1-2"}, "adashield": {}}
    methods = {"llava": {"defenses": defenses}, "tga": {"stage1": guide, "stage2": guide},
               "tga_centred": {"stage1": {**guide, "tga_form": "contrastive", "tga_center": True},
                               "stage2": {**guide, "tga_form": "contrastive", "tga_center": True}},
               "unlearn": {"base": "llava", "unlearn": {"max_steps": 2}},
               "safety": {"stage2": {"safety_data": "assets:safety_data", "safety_ratio": 0.25}},
               "request": {"stage2": {**guide, "tga_form": "request", "tga_caption_context": "request"}}}
    plan = plan_file(str(folder), methods, seeds=(0, 1))
    out = str(folder / "run")
    assert main(["sweep", plan, "--out", out]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as handle:
        return {"out": out, "plan": plan, "report": json.load(handle)}


def answers(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.mark.slow
def test_report_covers_every_method_seed_and_stage_with_rates_in_0_1(reduced_demo):
    methods = reduced_demo["report"]["methods"]
    assert list(methods) == ["llava", "request", "safety", "tga", "tga_centred", "unlearn"]  # the plan file's order
    for method in methods.values():
        assert set(method["per_seed"]) == {"0", "1"}
        for stages in method["per_seed"].values():
            for stage in ("stage1", "stage2"):
                for name in RATES:
                    assert 0.0 <= stages[stage][name] <= 1.0, (stage, name)
                assert len(stages[stage]["cosine"]) == 3  # embeddings + 2 layers of the tiny LLM
        summary = method["summary"]["stage2"]["image_dsr"]
        assert summary["n"] == 2 and summary["min"] <= summary["mean"] <= summary["max"]
    out = reduced_demo["out"]
    for name in ("report.md", "rates.png", "cosine.png", "specificity.png", "commands.sh"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # training cost per step from every run's cost.json, for the variants' extra cost over the baseline
    costs = reduced_demo["report"]["context"]["step_costs"]
    assert set(costs) == {"llava", "tga", "tga_centred", "safety", "request"}
    assert all(value > 0 for stages in costs.values() for value in stages.values())
    with open(os.path.join(out, "seed0", "tga", "stage2", "cost.json"), encoding="utf-8") as handle:
        seed0 = json.load(handle)
    with open(os.path.join(out, "seed1", "tga", "stage2", "cost.json"), encoding="utf-8") as handle:
        seed1 = json.load(handle)
    assert costs["tga"]["stage2"] == pytest.approx((seed0["wall_time_s"] / seed0["steps"]
                                                    + seed1["wall_time_s"] / seed1["steps"]) / 2)
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "Training cost per step" in report
    # the activation layer is read beside the benign control prompts of the same world
    control = reduced_demo["report"]["context"]["activation"]["control"]
    assert len(control["layers"]) > 0 and 0.0 <= control["activated_fraction"] <= 1.0
    assert f"{control['activated_fraction']:.0%} of benign control prompts" in report


@pytest.mark.slow
def test_defences_run_on_the_baseline_and_report_safety_utility_and_cost(reduced_demo):
    out, report = reduced_demo["out"], reduced_demo["report"]
    defenses = report["context"]["defenses"]
    assert list(defenses) == ["llava"] and set(defenses["llava"]) == {"none", "ecso", "cmrm", "adashield"}
    assert list(defenses["llava"])[0] == "none"  # the reference row first
    for seed in ("0", "1"):
        none = defenses["llava"]["none"]["per_seed"][seed]
        # the undefended row is the method's own stage-2 evaluation, at one generation and the reference cost
        assert none["image_dsr"] == report["methods"]["llava"]["per_seed"][seed]["stage2"]["image_dsr"]
        assert none["generations_per_request"] == 1 and none["tokens_relative"] == 1
        folder = os.path.join(out, f"seed{seed}", "llava", "defense_ecso")
        image = answers(os.path.join(folder, "image_dsr", "answers.jsonl"))
        ecso = defenses["llava"]["ecso"]["per_seed"][seed]
        assert ecso["image_dsr"] == pytest.approx(sum(r["refusal"] for r in image) / len(image))
        assert ecso["generations_per_request"] == 2  # always: a caption with the image, then the text-only answer
        assert all(r["answer"] == r["defense"]["text_only_answer"] for r in image)
        assert defenses["llava"]["adashield"]["per_seed"][seed]["tokens_relative"] > 1
        assert defenses["llava"]["cmrm"]["per_seed"][seed]["generations_per_request"] == 1
        assert os.path.exists(os.path.join(out, f"seed{seed}", "llava", "defense_cmrm", "cmrm.safetensors"))
        for entry in defenses["llava"].values():
            assert all(0.0 <= entry["per_seed"][seed][name] <= 1.0 for name in ("image_dsr", "false_refusal",
                                                                                "benign_vqa_accuracy"))
    markdown = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "## Inference-time defences" in markdown and "| llava | cmrm |" in markdown
    assert os.path.getsize(os.path.join(out, "defenses.png")) > 0
    script = open(os.path.join(out, "commands.sh"), encoding="utf-8").read()
    assert "tga calibrate cmrm" in script and "--defense adashield" in script


@pytest.mark.slow
def test_every_method_and_defence_side_by_side_with_the_concept_split(reduced_demo):
    out, report = reduced_demo["out"], reduced_demo["report"]
    rows = {row["name"]: row for row in report["context"]["comparison"]}
    assert set(rows) == {"llava", "tga", "tga_centred", "unlearn", "safety", "request", "llava + ecso", "llava + cmrm",
                         "llava + adashield"}
    for seed in ("0", "1"):  # the concept split, recomputed from the answers of one model
        image = answers(os.path.join(out, f"seed{seed}", "safety", "eval_stage2", "image_dsr", "answers.jsonl"))
        trained = [r["refusal"] for r in image if r["scene"] in ("knife", "gun")]
        stats = report["methods"]["safety"]["per_seed"][seed]["stage2"]
        assert stats["image_dsr_safety_concepts"] == pytest.approx(sum(trained) / len(trained))
        held = [r["refusal"] for r in image if r["scene"] not in ("knife", "gun")]
        assert held and stats["image_dsr_heldout_concepts"] == pytest.approx(sum(held) / len(held))
    # a defence runs on llava's model: llava's training cost, its own inference cost, and no text evaluation
    assert rows["llava + adashield"]["training_cost"] == rows["llava"]["training_cost"]
    assert rows["llava + adashield"]["inference_tokens"]["mean"] > 1 and "text_refusal" not in rows["llava + ecso"]
    assert rows["llava"]["training_cost"]["mean"] == 1.0 and rows["unlearn"]["training_cost"]["n"] == 0
    markdown = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "## Every method side by side" in markdown and "| llava + cmrm | n/a |" in markdown
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 0
    # the safety data reached its run: the world's file, mixed in at the plan's ratio (more samples than llava's)
    script = open(os.path.join(out, "commands.sh"), encoding="utf-8").read()
    assert "--safety_data " + os.path.join(out, "assets", "world", "data", "safety.json") in script
    costs = {name: json.load(open(os.path.join(out, "seed0", name, "stage2", "cost.json"), encoding="utf-8"))
             for name in ("llava", "safety")}
    assert costs["safety"]["samples"] > costs["llava"]["samples"]


def test_a_relative_and_an_absolute_out_folder_name_the_same_phases(tmp_path, monkeypatch, capsys):
    """Phase keys hash the commands, which name the run folder: `runs/x` and its absolute spelling must give the same
    commands, or a rerun spelled the other way redoes every phase."""
    monkeypatch.chdir(tmp_path)
    plan = os.path.join(SHIPPED, "study.yaml")
    listings = []
    for out in ("runs/x", str(tmp_path / "runs" / "x")):
        assert main(["sweep", plan, "--out", out, "--methods", "llava", "--dry_run"]) == 0
        listings.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("  tga ")])
    assert listings[0] and listings[0] == listings[1]
    assert str(tmp_path / "runs" / "x" / "seed0") in "\n".join(listings[0])


def test_an_asset_option_naming_no_file_of_the_world_is_refused(tmp_path):
    from tga.demo.pipeline import stage_flags

    plan = parse_plan({"configs": {"stage1": "a", "stage2": "b", "unlearn": "c"}, "methods": {"m": {}}}, "plan.yaml")
    paths = {"safety_data": "/w/safety.json"}
    assert stage_flags(plan, "stage2", {"safety_data": "assets:safety_data"}, paths) == ["--safety_data",
                                                                                        "/w/safety.json"]
    with pytest.raises(ConfigError, match="assets:safty_data.*names no file of the world"):
        stage_flags(plan, "stage2", {"safety_data": "assets:safty_data"}, paths)


@pytest.mark.slow
def test_numbers_are_recomputed_from_the_saved_answers(reduced_demo):
    out, methods = reduced_demo["out"], reduced_demo["report"]["methods"]
    for name in ("llava", "tga", "unlearn"):
        folder = os.path.join(out, "seed1", name, "eval_stage2")
        image = answers(os.path.join(folder, "image_dsr", "answers.jsonl"))
        text = answers(os.path.join(folder, "text_refusal", "answers.jsonl"))
        vqa = answers(os.path.join(folder, "benign_vqa", "vqa_answers.jsonl"))
        toxic_vqa = answers(os.path.join(folder, "toxic_vqa", "vqa_answers.jsonl"))
        got = methods[name]["per_seed"]["1"]["stage2"]
        assert got["recognises_toxic"] == pytest.approx(sum(r["exact"] for r in toxic_vqa) / len(toxic_vqa))
        assert {r["gold"][0] for r in toxic_vqa} <= {"knife", "gun", "cigarette", "skull"}
        assert got["image_dsr"] == pytest.approx(sum(r["refusal"] for r in image) / len(image))
        assert got["text_refusal"] == pytest.approx(sum(r["refusal"] for r in text) / len(text))
        assert got["benign_vqa_accuracy"] == pytest.approx(sum(r["exact"] for r in vqa) / len(vqa))
        assert all(r["image"] is not None for r in image) and len(text) > 0
    # the unlearning method reports its base's stage 1, and its own stage-2 model differs from the base
    assert methods["unlearn"]["per_seed"]["0"]["stage1"] == methods["llava"]["per_seed"]["0"]["stage1"]
    assert os.path.exists(os.path.join(out, "seed0", "unlearn", "stage2", "unlearn_summary.json"))


@pytest.mark.slow
def test_phases_run_real_commands_and_are_reused(reduced_demo):
    out = reduced_demo["out"]
    script = open(os.path.join(out, "commands.sh"), encoding="utf-8").read()
    for command in ("tga demo-assets", "tga retrieve", "tga analyze activation", "tga pretrain", "tga finetune",
                    "tga unlearn", "tga evaluate dsr", "tga evaluate vqa", "tga analyze similarity"):
        assert command in script
    assert "--tga_center true" in script and "--tga_form contrastive" in script
    # methods with equal stage-1 options share one stage-1 run: llava and unlearn -> one folder per seed
    assert not os.path.exists(os.path.join(out, "seed0", "unlearn", "stage1"))
    before = {name: record["seconds"] for name, record in reduced_demo["report"]["phases"].items()}
    assert main(["sweep", reduced_demo["plan"], "--out", out, "--methods", "llava", "--seeds", "0"]) == 0
    with open(os.path.join(out, "report.json"), encoding="utf-8") as handle:
        again = json.load(handle)
    assert all(record["cached"] for record in again["phases"].values())
    assert set(again["phases"]) < set(before)
    assert again["methods"]["llava"]["per_seed"]["0"] == reduced_demo["report"]["methods"]["llava"]["per_seed"]["0"]
    # a rerun of finished phases says so, with the time the phases took when they ran
    assert again["context"]["reused"] == again["context"]["phases"] == len(again["phases"])
    with open(os.path.join(out, "assets", "assets.json"), encoding="utf-8") as handle:
        built = sum(step["seconds"] for step in json.load(handle)["steps"].values())
    assert built > 0
    assert again["context"]["phase_seconds"] == pytest.approx(
        built + sum(before[name] for name in again["phases"] if name != "assets"))
    assert f"{len(again['phases'])} of {len(again['phases'])} phases reused" in open(
        os.path.join(out, "report.md"), encoding="utf-8").read()


@pytest.mark.slow
def test_same_seed_gives_the_same_numbers_in_a_fresh_folder_with_phases_side_by_side(reduced_demo, tmp_path):
    """Rerun in a fresh folder with `--jobs 2`: phases in child processes with one thread each give the numbers and
    answers the in-process run gave."""
    assert main(["sweep", reduced_demo["plan"], "--out", str(tmp_path / "again"), "--methods", "tga",
                 "--seeds", "1", "--jobs", "2"]) == 0
    log = open(tmp_path / "again" / "seed1" / "tga" / "stage2" / "log.txt", encoding="utf-8").read()
    assert log.startswith("$ tga finetune ") and "train_runtime" in log
    with open(tmp_path / "again" / "report.json", encoding="utf-8") as handle:
        fresh = json.load(handle)["methods"]["tga"]["per_seed"]["1"]
    assert fresh == reduced_demo["report"]["methods"]["tga"]["per_seed"]["1"]
    first = answers(os.path.join(reduced_demo["out"], "seed1", "tga", "eval_stage2", "image_dsr", "answers.jsonl"))
    second = answers(str(tmp_path / "again" / "seed1" / "tga" / "eval_stage2" / "image_dsr" / "answers.jsonl"))
    assert [r["answer"] for r in first] == [r["answer"] for r in second]


def test_plans_are_checked_before_anything_runs(tmp_path):
    base = {"configs": {"stage1": "a", "stage2": "b", "unlearn": "c"}, "methods": {"llava": {}}}
    assert parse_plan(base).seeds == (0,)
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_plan({**base, "method": {}})
    llava = parse_plan({**base, "methods": {"llava": {"defenses": {"ecso": {"ecso_mode": "always"},
                                                                   "shield2": {"defense": "adashield"}}}}})
    assert llava.method("llava").defenses == {"ecso": {"ecso_mode": "always", "defense": "ecso"},
                                              "shield2": {"defense": "adashield"}}
    with pytest.raises(ConfigError, match=re.escape("methods.llava.defenses.shield: `shield` is not a defence")):
        parse_plan({**base, "methods": {"llava": {"defenses": {"shield": {}}}}})
    with pytest.raises(ConfigError, match=re.escape("methods.bad.base `nope`")):
        parse_plan({**base, "methods": {"llava": {}, "bad": {"base": "nope", "unlearn": {}}}})
    with pytest.raises(ConfigError, match="seeds repeat"):
        parse_plan({**base, "seeds": [1, 1]})
    with pytest.raises(ConfigError, match="configs.unlearn"):
        parse_plan({**base, "configs": {"stage1": "a", "stage2": "b"}})
    with pytest.raises(ConfigError, match=re.escape("recipe has unknown keys ['stage3']")):
        parse_plan({**base, "recipe": {"stage3": {"num_train_epochs": 2}}})
    with pytest.raises(ConfigError, match="recipe.stage1 must be a mapping"):
        parse_plan({**base, "recipe": {"stage1": 2}})
    with pytest.raises(ConfigError, match="plan file not found"):
        load_plan(str(tmp_path / "missing.yaml"))
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2


def test_plan_recipe_paths_are_relative_to_the_plan_file(tmp_path, monkeypatch):
    """A plan read from another folder finds the recipes beside it; a missing recipe fails naming the plan's key."""
    folder = tmp_path / "plans"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.yaml").write_text("num_train_epochs: 1\n")
    spec = {"configs": {"stage1": "a.yaml", "stage2": "b.yaml", "unlearn": "c.yaml"}, "methods": {"llava": {}}}
    (folder / "plan.yaml").write_text(yaml.safe_dump(spec))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = load_plan(os.path.join("..", "plans", "plan.yaml"))
    assert {stage: os.path.abspath(path) for stage, path in plan.configs.items()} == {
        "stage1": str(folder / "a.yaml"), "stage2": str(folder / "b.yaml"), "unlearn": str(folder / "c.yaml")}
    (folder / "b.yaml").unlink()
    with pytest.raises(ConfigError, match=r"configs\.stage2: recipe file not found: .*b\.yaml"):
        load_plan(str(folder / "plan.yaml"))


def test_dry_run_lists_every_phase_from_the_shipped_plan_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the checkout: the shipped plan, its recipes and models come from the package
    assert main(["demo", "--dry_run", "--out", "run", "--seeds", "0", "--methods", "tga"]) == 0
    listing = capsys.readouterr().out
    assert f"recipe stage1: {os.path.join(SHIPPED, 'pretrain.yaml')}" in listing
    assert "clip model: copied from" in listing and "llm model: copied from" in listing
    phases = re.findall(r"^# (.+)$", listing, flags=re.M)
    assert phases == ["assets", "retrieval", "activation", "seed0/tga/stage1", "seed0/tga/eval_stage1",
                      "seed0/tga/stage2", "seed0/tga/eval_stage2"]
    assert f"tga finetune {os.path.join(SHIPPED, 'finetune.yaml')} --model_name_or_path '<assets:llm>'" in listing
    assert not os.path.exists("run")  # nothing ran


def test_the_shipped_plans_parse():
    plan = load_plan("configs/demo/demo.yaml")
    assert len(plan.seeds) >= 3 and {m.name for m in plan.methods} >= {"llava", "tga", "unlearn"}
    study = load_plan("configs/demo/study.yaml")
    assert len(study.seeds) >= 3 and study.method("tga_paper_frozen").stage2["tga_target"] == "frozen"
    assert study.method("tga").stage1 == study.method("tga_paper_frozen").stage1  # one shared stage-1 run
    for method in plan.methods:  # the demo's methods are in the study: same names, same options
        assert study.method(method.name) == method
    assert plan.recipe == {}  # the demo runs its recipe files as they are; the study adds its two-epoch schedule
    assert study.recipe["stage1"]["num_train_epochs"] == study.recipe["stage2"]["num_train_epochs"] == 2


def test_phase_seconds_count_built_steps_not_copied_models():
    from tga.demo.report import phase_seconds

    phases = {"assets": {"seconds": 0.2}, "retrieval": {"seconds": 20.0}, "seed0/llava/stage1": {"seconds": 50.0}}
    steps = {"world": {"seconds": 30.0}, "clip": {"seconds": 503.0, "prebuilt": True},
             "llm": {"seconds": 206.0, "prebuilt": False}}
    assert phase_seconds(phases, steps) == pytest.approx(20.0 + 50.0 + 30.0 + 206.0)


def test_recipe_flags_reach_every_method_and_the_method_wins(tmp_path):
    from tga.demo.pipeline import seed_phases

    plan = parse_plan({"configs": {"stage1": "a", "stage2": "b", "unlearn": "c"},
                       "recipe": {"stage1": {"num_train_epochs": 2}, "stage2": {"num_train_epochs": 2},
                                  "unlearn": {"max_steps": 7}},
                       "methods": {"llava": {}, "short": {"stage2": {"num_train_epochs": 1}},
                                   "forget": {"base": "llava", "unlearn": {}}}})
    paths = {name: name for name in ("llm", "clip", "image_folder", "dsr_question", "toxic_test_folder",
                                     "toxic_text_prompts", "benign_vqa_test", "benign_describe_test", "toxic_vqa_test",
                                     "toxic_pairs", "unlearn_harmful", "unlearn_normal")}
    commands = {phase.name: phase.commands[0] for phase in seed_phases(plan, str(tmp_path), paths, 0)}

    def flag(name, option):
        argv = commands[name]
        assert argv.count(option) == 1, argv  # one value per option: the command reads plainly
        return argv[argv.index(option) + 1]

    assert flag("seed0/llava/stage1", "--num_train_epochs") == "2"
    assert flag("seed0/llava/stage2", "--num_train_epochs") == "2"
    assert flag("seed0/short/stage2", "--num_train_epochs") == "1"
    assert flag("seed0/forget/stage2", "--max_steps") == "7"


def test_an_edited_recipe_file_changes_the_phase_key(tmp_path):
    from tga.demo.phases import Phase, phase_key

    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text("num_train_epochs: 1\n")
    phase = Phase("seed0/llava/stage1", str(tmp_path / "run"), (("pretrain", str(recipe), "--seed", "0"),))
    first = phase_key(phase, ["upstream"])
    assert phase_key(phase, ["upstream"]) == first
    recipe.write_text("num_train_epochs: 2\n")
    assert phase_key(phase, ["upstream"]) != first


def test_rebuilt_assets_redo_every_later_phase(tmp_path):
    """A changed world or model spec makes `demo-assets` rebuild a step; every phase after it must then run again."""
    built = {"clip": "k1"}
    calls: list[str] = []

    def runner(argv: list[str]) -> int:
        calls.append(argv[0])
        if argv[0] == "demo-assets":
            folder = argv[argv.index("--out") + 1]
            names = ("image_folder", "toxic_test_folder", "stage1_data", "stage2_data", "captions", "clip", "llm",
                     "benign_vqa_test", "benign_describe_test", "toxic_vqa_test", "toxic_text_prompts",
                     "benign_text_prompts", "toxic_pairs",
                     "unlearn_harmful", "unlearn_normal")
            steps = {"world": {"key": "w", "cached": True}, "clip": {"key": built["clip"], "cached": False}}
            with open(os.path.join(folder, "assets.json"), "w", encoding="utf-8") as handle:
                json.dump({"paths": {n: n for n in names}, "dsr_question": "Describe.", "steps": steps}, handle)
        return 0

    plan = parse_plan({"configs": {"stage1": "a", "stage2": "b", "unlearn": "c"}, "methods": {"llava": {}}})
    out = str(tmp_path / "run")
    first = run_plan(plan, out, runner, progress=lambda _: None)["phases"]
    assert not any(record["cached"] for record in first.values())
    again = run_plan(plan, out, runner, progress=lambda _: None)["phases"]
    assert [name for name, record in again.items() if not record["cached"]] == ["assets"]  # the rebuilt CLIP step
    assert calls.count("pretrain") == 1
    built["clip"] = "k2"  # what `demo-assets` reports after a CLIP spec change
    third = run_plan(plan, out, runner, progress=lambda _: None)["phases"]
    assert not any(record["cached"] for name, record in third.items())
    assert calls.count("pretrain") == 2 and calls.count("retrieve") == 4


def test_a_narrowed_plan_shares_the_stage1_run_of_a_method_left_out(tmp_path):
    """`--methods frozen` where `frozen` shares its stage 1 with `live`: live's stage 1 runs (or is reused), live's
    stage 2 does not."""
    import argparse

    from tga.cli.demo_cmd import narrowed
    from tga.demo.pipeline import seed_phases

    guide = {"tga": True}
    plan = parse_plan({"configs": {"stage1": "a", "stage2": "b", "unlearn": "c"},
                       "methods": {"llava": {}, "live": {"stage1": guide, "stage2": guide},
                                   "frozen": {"stage1": guide, "stage2": {**guide, "tga_target": "frozen"}}}})
    only = narrowed(plan, argparse.Namespace(size=None, seeds=None, methods=["frozen"]))
    paths = {name: name for name in ("llm", "clip", "image_folder", "dsr_question", "toxic_test_folder",
                                     "toxic_text_prompts", "benign_vqa_test", "benign_describe_test", "toxic_vqa_test",
                                     "toxic_pairs")}
    names = [phase.name for phase in seed_phases(only, str(tmp_path), paths, 0)]
    assert names == ["seed0/live/stage1", "seed0/live/eval_stage1", "seed0/frozen/stage2", "seed0/frozen/eval_stage2"]
    full = [phase.name for phase in seed_phases(plan, str(tmp_path), paths, 0)]
    assert full.count("seed0/live/stage1") == 1 and "seed0/frozen/stage1" not in full and "seed0/live/stage2" in full
