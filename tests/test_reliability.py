"""Reliability: complete-checkpoint markers, resume choice, rotation, SIGTERM stop, output-folder checks, the
bad-record guard and `tga data check` (single process; the 2-rank kill/resume runs are in test_resume_distributed.py)."""

import errno
import json
import os
import signal

import pytest
import torch
from tiny_parts import Regression
from transformers import Trainer, TrainerCallback
from transformers import TrainingArguments as HFTrainingArguments

from tga.cli import main as tga_main
from tga.data.guard import REPORT_FILE, BadRecordLog, GuardedDataset, load_training_records
from tga.errors import ConfigError, DataError
from tga.train.integrity import COMPLETE_MARKER, is_complete, latest_complete_checkpoint, mark_complete
from tga.train.preflight import CheckpointError, check_free_space, check_output_dir, storage_error
from tga.train.resilience import resolve_resume_checkpoint, rotate_complete, run_guards


def fake_checkpoint(root, step, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "global_step").mkdir()
    (folder / "global_step" / "optim_states.pt").write_bytes(b"y" * 50)
    if complete:
        mark_complete(str(folder), step)
    return folder


def test_marker_detects_missing_and_truncated_files(tmp_path):
    folder = fake_checkpoint(tmp_path, 4)
    assert is_complete(str(folder))
    (folder / "global_step" / "optim_states.pt").write_bytes(b"y" * 10)  # cut short after marking
    assert not is_complete(str(folder))
    folder = fake_checkpoint(tmp_path, 7)
    (folder / "model.safetensors").write_bytes(b"z" * 100)  # same size, other bytes (another run's file, corruption)
    assert is_complete(str(folder), checksum=False) and not is_complete(str(folder))
    assert not is_complete(str(fake_checkpoint(tmp_path, 5, complete=False)))
    (fake_checkpoint(tmp_path, 6) / COMPLETE_MARKER).write_text("{not json")
    assert not is_complete(str(tmp_path / "checkpoint-6"))


def test_auto_resume_picks_newest_complete_and_sets_incomplete_aside(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # killed while saving
    assert resolve_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists() and (tmp_path / "incomplete-checkpoint-6").is_dir()
    assert resolve_resume_checkpoint("auto", str(tmp_path / "empty")) is None
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_rotation_never_deletes_the_last_complete_checkpoint(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 8, complete=False)
    removed = rotate_complete(str(tmp_path), keep=1, protected=set())
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint-2", "checkpoint-4"]
    assert latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-6")
    assert rotate_complete(str(tmp_path), keep=0, protected=set()) == []  # keep <= 0 still keeps the newest


class SignalAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step `self.step`


def train(output_dir, *, max_steps=6, resume=None, callbacks=(), keep=None):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(4, generator=generator), "labels": torch.randn((), generator=generator)}
            for _ in range(24)]
    args = HFTrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                               learning_rate=0.05, save_strategy="steps", save_steps=2, logging_steps=1,
                               report_to=[], seed=0, dataloader_num_workers=0)
    args.save_total_limit = keep
    guards = run_guards(args, BadRecordLog(None))
    trainer = Trainer(model=Regression(), args=args, train_dataset=data, callbacks=[*guards.callbacks, *callbacks])
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as error:
        failure = guards.failure(error, str(output_dir))
        if failure is None:
            raise
        raise failure from error
    finally:
        guards.stop.release()  # what run_stage does after the final save
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    return trainer, guards.stop, losses


def test_sigterm_saves_a_complete_checkpoint_and_resume_reproduces_losses(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    _, _, reference = train(tmp_path / "reference")
    trainer, stop, first = train(tmp_path / "run", callbacks=[SignalAtStep(3)], keep=1)
    assert stop.stopped and trainer.state.global_step == 3
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-3"]  # keep=1 removed checkpoint-2 after marking 3
    assert is_complete(str(tmp_path / "run" / "checkpoint-3"))
    fake_checkpoint(tmp_path / "run", 5, complete=False)  # a later save that was killed half-way
    resume = resolve_resume_checkpoint("auto", str(tmp_path / "run"))
    assert resume == str(tmp_path / "run" / "checkpoint-3")
    _, stop, resumed = train(tmp_path / "run", resume=resume)
    assert not stop.stopped
    combined = {**first, **resumed}
    assert sorted(combined) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert combined == reference  # exactly equal, not approximately


def test_failed_save_names_the_checkpoint_and_keeps_the_previous_one(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "checkpoint-4").write_text("a file where the checkpoint folder must go")
    with pytest.raises(CheckpointError, match="cannot write .*checkpoint-4"):
        train(output, keep=1)
    assert latest_complete_checkpoint(str(output)) == str(output / "checkpoint-2")


def test_output_dir_checks(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="--output_dir .*file/run is not writable"):
        check_output_dir(str(blocker / "run"))
    check_output_dir(str(tmp_path / "ok" / "run"))
    assert os.listdir(tmp_path / "ok" / "run") == []  # the probe is removed
    with pytest.raises(ConfigError, match="GiB free, but one checkpoint needs"):
        check_free_space(str(tmp_path), 1 << 60)
    error = storage_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ck" / "x.bin")), "out")
    assert isinstance(error, CheckpointError) and "ck/x.bin" in str(error) and "No space left" in str(error)
    assert storage_error(OSError(errno.EINTR, "interrupted"), "out") is None


def write_records(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def image_record(record_id, image, answer="A shape."):
    return {"id": record_id, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer}]}


def test_startup_checks_fail_or_skip_and_count(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"not decoded at start")
    data = write_records(tmp_path / "d.json", [
        image_record("good", "a.png"), image_record("missing", "b.png"), image_record("escape", "../d.json"),
        {"id": "schema", "conversations": []},
    ])
    with pytest.raises(DataError, match="'missing'"):
        load_training_records(data, str(tmp_path / "img"), skip_bad=False)
    records, rejected = load_training_records(data, str(tmp_path / "img"), skip_bad=True)
    assert [r.id for r in records] == ["good"]
    assert [r["id"] for r in rejected] == ["missing", "escape", "schema"]


class FakeBuilt:
    """A dataset whose records fail or truncate by id, like LazySupervisedDataset would."""

    def __init__(self, ids, bad, long, images=None):
        images = images or {}
        self.records = [type("R", (), {"id": i, "image": images.get(i)})() for i in ids]
        self.bad, self.long = bad, long
        self.modality_lengths = [1] * len(ids)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record_id = self.records[index].id
        if record_id in self.bad:
            raise DataError(f"record {record_id!r}: cannot read image")
        return {"id": record_id, "truncated": record_id in self.long}


def test_guarded_dataset_replaces_deterministically_and_reports(tmp_path):
    inner = FakeBuilt(["a", "b", "c", "d"], bad={"b", "c"}, long={"d"})
    log = BadRecordLog(str(tmp_path), rejected=[{"id": "z", "source": "f", "stage": "load", "error": "schema"}])
    dataset = GuardedDataset(inner, log, skip_bad=True)
    assert [dataset[i]["id"] for i in range(4)] * 2 == ["a", "d", "d", "d"] * 2
    report_path = log.write()
    report = json.loads(open(report_path).read())
    assert report_path.endswith(REPORT_FILE)
    assert report["num_skipped"] == 3 and sorted(e["id"] for e in report["skipped"]) == ["b", "c", "z"]
    assert report["truncated"] == ["d"]
    strict = GuardedDataset(FakeBuilt(["a", "b"], bad={"b"}, long=set()), BadRecordLog(None), skip_bad=False)
    with pytest.raises(DataError, match="'b'"):
        strict[1]
    with pytest.raises(DataError, match="no record"):
        GuardedDataset(FakeBuilt(["a"], bad={"a"}, long=set()), BadRecordLog(None), skip_bad=True)[0]


def test_a_replacement_keeps_the_modality_of_the_failed_record(tmp_path):
    """With grouping, a batch holds one modality: an image record that fails is replaced by the next image record
    that builds (text-only records in between are passed over), and by any record when no image record is left."""
    images = {"i1": "a.png", "i2": "b.png", "i3": "c.png"}
    dataset = GuardedDataset(FakeBuilt(["i1", "t1", "t2", "i2", "i3"], bad={"i1"}, long=set(), images=images),
                             BadRecordLog(None), skip_bad=True)
    assert [dataset[i]["id"] for i in range(5)] == ["i2", "t1", "t2", "i2", "i3"]
    only_text_left = GuardedDataset(FakeBuilt(["i1", "t1", "i2"], bad={"i1", "i2"}, long=set(), images=images),
                                    BadRecordLog(None), skip_bad=True)
    assert only_text_left[2]["id"] == "t1" and only_text_left[0]["id"] == "t1"


def test_data_check_command(tiny_assets, tmp_path, capsys):
    good = ["data", "check", tiny_assets["stage2"], "--image_folder", tiny_assets["image_folder"],
            "--tokenizer", tiny_assets["llm"], "--num_image_tokens", "16", "--model_max_length", "512", "--tga",
            "--use_retrieved_in_prompt"]
    assert tga_main(good) == 0
    assert " 0 bad" in capsys.readouterr().out
    records = [r for r in json.loads(open(tiny_assets["stage2"]).read()) if "image" in r][:3]
    records[1]["image"] = "../escape.png"
    records[2]["conversations"][0]["value"] += " <image>"
    broken = tmp_path / "images"
    broken.mkdir()
    for record in records:
        if record.get("image") and not record["image"].startswith(".."):
            (broken / record["image"]).parent.mkdir(parents=True, exist_ok=True)
            (broken / record["image"]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = write_records(tmp_path / "bad.json", records)
    assert tga_main(["data", "check", data, "--image_folder", str(broken), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 3 and report["num_bad"] == 3
    assert [bad["id"] for bad in report["bad"]] == [r["id"] for r in records]
    assert "cannot read image" in report["bad"][0]["error"] and "outside the image folder" in report["bad"][1]["error"]
