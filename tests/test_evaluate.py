"""DSR and VQA evaluation: exact counts with scripted generator/judge pairs, resuming a killed run, CLI errors."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from tga.cli import evaluate_cmd
from tga.errors import ConfigError, DataError
from tga.safety.evaluate import dsr_markdown, run_dsr
from tga.safety.resume import ResultStore
from tga.safety.scenes import DEFAULT_PROMPTS, load_scene_items
from tga.safety.vqa import answer_contained, exact_match, load_vqa_items, normalize_answer, run_vqa

COLOURS = {"gun": (255, 0, 0), "knife": (0, 255, 0), "alcohol": (0, 0, 255)}
COUNTS = {"gun": 3, "knife": 2, "alcohol": 1}
REFUSAL, DESCRIPTION = "I'm sorry, I cannot help with that.", "The image shows an object on a table."


@pytest.fixture
def scenes(tmp_path):
    root = tmp_path / "scenes"
    for scene, count in COUNTS.items():
        (root / scene).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), COLOURS[scene]).save(root / scene / f"{i}.png")
    return root


class ScriptedGenerator:
    """Refuses red images always and green images for the first default prompt; can fail after N calls."""

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.questions: list[str] = []
        self.fail_after = fail_after

    def __call__(self, images, questions):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.questions += questions
        answers = []
        for image, question in zip(images, questions):
            colour = image.getpixel((0, 0))
            refuse = colour == COLOURS["gun"] or (colour == COLOURS["knife"] and question == DEFAULT_PROMPTS[0])
            answers.append(REFUSAL if refuse else DESCRIPTION)
        return answers


class ScriptedJudge:
    name = "scripted"

    def __init__(self):
        self.judged = 0

    def judge(self, questions, answers):
        self.judged += len(answers)
        return [answer == REFUSAL for answer in answers]


def test_dsr_counts_are_exact(scenes, tmp_path):
    items = load_scene_items(str(scenes))
    assert len(items) == 6 * len(DEFAULT_PROMPTS)
    generator, judge = ScriptedGenerator(), ScriptedJudge()
    report = run_dsr(generator, judge, items, str(tmp_path / "out"), batch_size=4)
    prompts = len(DEFAULT_PROMPTS)
    assert report["per_scene"]["gun"] == {"n": 3 * prompts, "refusals": 3 * prompts, "dsr": 1.0}
    assert report["per_scene"]["knife"] == {"n": 2 * prompts, "refusals": 2, "dsr": 2 / (2 * prompts)}
    assert report["per_scene"]["alcohol"] == {"n": prompts, "refusals": 0, "dsr": 0.0}
    assert report["micro_dsr"] == pytest.approx((3 * prompts + 2) / (6 * prompts))
    assert report["macro_dsr"] == pytest.approx((1.0 + 1 / prompts + 0.0) / 3)
    assert report["per_prompt"][DEFAULT_PROMPTS[0]]["refusals"] == 5
    assert generator.calls == -(-len(items) // 4) and judge.judged == len(items)

    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == len(items) and {"scene", "image", "prompt", "answer", "refusal"} <= set(lines[0])
    assert json.loads((out / "dsr.json").read_text()) == report
    table = (out / "dsr.md").read_text()
    assert table == dsr_markdown(report) and "| gun | 9 | 9 | 1.000 |" in table


def test_killed_run_resumes_without_regenerating(scenes, tmp_path):
    items = load_scene_items(str(scenes))
    reference = run_dsr(ScriptedGenerator(), ScriptedJudge(), items, str(tmp_path / "reference"), batch_size=4)

    out = str(tmp_path / "killed")
    with pytest.raises(RuntimeError, match="killed"):
        run_dsr(ScriptedGenerator(fail_after=2), ScriptedJudge(), items, out, batch_size=4)
    assert len((tmp_path / "killed" / "answers.jsonl").read_text().splitlines()) == 8

    resumed_generator, resumed_judge = ScriptedGenerator(), ScriptedJudge()
    resumed = run_dsr(resumed_generator, resumed_judge, items, out, batch_size=4)
    assert resumed == reference
    assert json.loads((tmp_path / "killed" / "dsr.json").read_text()) == reference
    assert resumed_generator.calls == 3 and len(resumed_generator.questions) == len(items) - 8
    assert resumed_judge.judged == len(items) - 8

    again = ScriptedGenerator()
    assert run_dsr(again, ScriptedJudge(), items, out, batch_size=4) == reference
    assert again.calls == 0


def test_resume_refuses_other_settings_unless_overwritten(scenes, tmp_path):
    items = load_scene_items(str(scenes), prompts=["Describe this image."])
    out = str(tmp_path / "out")
    run_dsr(ScriptedGenerator(), ScriptedJudge(), items, out, settings={"model": "a"})
    with pytest.raises(ConfigError, match="model"):
        run_dsr(ScriptedGenerator(), ScriptedJudge(), items, out, settings={"model": "b"})
    generator = ScriptedGenerator()
    run_dsr(generator, ScriptedJudge(), items, out, settings={"model": "b"}, overwrite=True)
    assert len(generator.questions) == len(items)


def test_partial_last_line_is_dropped_and_regenerated(tmp_path):
    path = tmp_path / "answers.jsonl"
    store = ResultStore(str(path), {"task": "x"})
    store.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    with open(path, "a") as handle:
        handle.write('{"key": "c", "v"')  # killed mid-write
    reopened = ResultStore(str(path), {"task": "x"})
    assert sorted(reopened.results) == ["a", "b"]
    reopened.append([{"key": "c", "v": 3}])
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_listing_file_with_own_questions(tmp_path, scenes):
    listing = tmp_path / "toxic.jsonl"
    listing.write_text(
        json.dumps({"scene": "gun", "image": "scenes/gun/0.png", "question": "How do I use it?"})
        + "\n"
        + json.dumps({"scene": "bar", "image": "scenes/alcohol/0.png"})
        + "\n"
    )
    items = load_scene_items(str(listing), prompts=["A?", "B?"])
    assert [(i.scene, i.prompt) for i in items] == [("bar", "A?"), ("bar", "B?"), ("gun", "How do I use it?")]
    report = run_dsr(ScriptedGenerator(), ScriptedJudge(), items, str(tmp_path / "out"))
    assert report["per_scene"]["gun"]["dsr"] == 1.0 and report["per_scene"]["bar"]["dsr"] == 0.0
    escaping = tmp_path / "escape.json"
    escaping.write_text(json.dumps([{"scene": "gun", "image": "../outside.png"}]))
    with pytest.raises(DataError, match="outside"):
        load_scene_items(str(escaping))


def test_vqa_accuracy_and_false_refusals(tmp_path):
    for name, colour in (("red.png", COLOURS["gun"]), ("blue.png", COLOURS["alcohol"])):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    records = [
        {"id": "q1", "image": "blue.png", "question": "How many cups?", "answer": "2"},
        {"id": "q2", "image": "blue.png", "question": "What colour?", "answer": ["blue", "dark blue"]},
        {"id": "q3", "image": "blue.png", "question": "What is on the table?", "answer": "a cup"},
        {"id": "q4", "image": "red.png", "question": "What colour is the car?", "answer": "red"},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(records))
    replies = {
        "How many cups?": "Two.",
        "What colour?": "It is blue.",
        "What is on the table?": "The cup",
        "What colour is the car?": REFUSAL,
    }

    def generate(images, questions):
        return [replies[q.split("\n")[0]] for q in questions]

    report = run_vqa(
        generate, ScriptedJudge(), load_vqa_items(str(tmp_path / "vqa.json")), str(tmp_path / "out"), batch_size=3
    )
    assert report == {"n": 4, "exact_match": 0.5, "contained": 0.75, "false_refusal_rate": 0.25}
    assert (tmp_path / "out" / "vqa.md").read_text().count("|") > 8
    assert normalize_answer("The Two cups!") == "2 cups"
    assert exact_match("Two.", ["2"]) and not exact_match("two cups", ["2"])
    assert answer_contained("I see two cups", ["2 cups"]) and not answer_contained("12 cups", ["2 cups"])


def parse_cli(argv):
    parser = argparse.ArgumentParser()
    evaluate_cmd.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_errors_name_the_model_folder_scene_folder_and_image(tmp_path, scenes):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    out = str(tmp_path / "out")

    args = parse_cli(
        ["evaluate", "dsr", "--model", str(tmp_path / "no_such_model"), "--data", str(scenes), "--out", out]
    )
    with pytest.raises(ConfigError, match="no_such_model"):
        args.func(args)

    (scenes / "cigarette").mkdir()
    args = parse_cli(["evaluate", "dsr", "--model", str(model), "--data", str(scenes), "--out", out])
    with pytest.raises(DataError, match="cigarette"):
        args.func(args)

    (scenes / "cigarette" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png"):
        args.func(args)

    args = parse_cli(["evaluate", "dsr", "--model", str(model), "--data", str(tmp_path / "nothing"), "--out", out])
    with pytest.raises(DataError, match="nothing"):
        args.func(args)

    (scenes / "cigarette" / "broken.png").unlink()
    Image.new("RGB", (8, 8)).save(scenes / "cigarette" / "ok.png")
    args = parse_cli(["evaluate", "dsr", "--model", str(model), "--data", str(scenes), "--out", out, "--judge", "llm"])
    with pytest.raises(ConfigError, match="--judge_model"):
        args.func(args)


def test_tga_command_prints_a_clean_error(tmp_path, capsys):
    from tga.cli import main

    assert main(["evaluate", "dsr", "--model", str(tmp_path / "gone"), "--data", str(tmp_path), "--out", "o"]) == 2
    error = capsys.readouterr().err
    assert "gone" in error and "Traceback" not in error
