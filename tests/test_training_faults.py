"""Faults during training at the tiny configuration (one process): a diverged run, a changed configuration on
resume, a corrupt or truncated checkpoint, a fresh run into a folder with checkpoints, a full disk and a signal during
the final save. Each is named and nothing that is not intact is ever marked complete (docs/reliability.md).

The runs without DeepSpeed call `run_stage` in this process; the ones that need an exit status, a signal, a file-size
limit or DeepSpeed run `scripts/finetune.py` in a subprocess."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tga.errors import ConfigError, TrainingDiverged
from tga.tiny import save_tiny_llm
from tga.train.integrity import COMPLETE_MARKER, is_complete, verify
from tga.train.resume_check import HISTORY_FILE
from tga.train.run import run_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


@pytest.fixture(scope="module")
def config(tiny_assets, tmp_path_factory):
    """configs/finetune/tiny_cpu.yaml in one process with a fresh projector, checkpoints every 2 steps."""
    recipe = yaml.safe_load(open(os.path.join(REPO, "configs/finetune/tiny_cpu.yaml"), encoding="utf-8"))
    for key in ("deepspeed", "pretrain_mm_mlp_adapter"):
        recipe.pop(key)
    recipe.update(model_name_or_path=tiny_assets["llm"], vision_tower=tiny_assets["vision"],
                  data_path=tiny_assets["stage2"], image_folder=tiny_assets["image_folder"], save_strategy="steps",
                  save_steps=2, max_steps=6, per_device_train_batch_size=2)
    path = tmp_path_factory.mktemp("faults") / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def run(config, output_dir, *flags):
    return run_stage("finetune", [config, "--output_dir", str(output_dir), *flags])


def history(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return json.load(handle)["log_history"]


def checkpoint_weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def finished(config, tmp_path_factory):
    """A finished 6-step run with checkpoints 2, 4 and 6."""
    output = tmp_path_factory.mktemp("finished") / "run"
    run(config, output)
    return output


# ---- 1. non-finite training ----

def test_a_diverged_run_stops_and_never_marks_non_finite_weights_complete(config, tmp_path, caplog):
    output = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: .*last finite loss was [\d.]+ at step \d+"):
        run(config, output, "--learning_rate", "1e30", "--save_steps", "1", "--max_steps", "12")
    assert not (output / "model.safetensors").exists() and not (output / COMPLETE_MARKER).exists()
    complete = [output / name for name in os.listdir(output) if name.startswith("checkpoint-")
                and is_complete(str(output / name))]
    for folder in complete:  # whatever was marked complete holds finite weights only
        assert all(torch.isfinite(tensor).all() for tensor in checkpoint_weights(folder).values()), folder


def test_skipped_non_finite_steps_leave_the_weights_as_they_were(config, tmp_path, caplog):
    output = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="tga.train.divergence"):
        run(config, output, "--learning_rate", "1e30", "--max_nonfinite_steps", "100", "--save_steps", "1")
    skipped = [int(record.getMessage().split()[1].rstrip(":")) for record in caplog.records
               if "update was skipped" in record.getMessage()]
    assert skipped and skipped[0] > 1
    # A skipped step leaves the weights as they were, so the same weights give a non-finite loss again: every later
    # step is skipped, and the final weights are those of the last finite step's checkpoint.
    assert skipped == list(range(skipped[0], 7))
    final = load_file(str(output / "model.safetensors"))
    last_finite = checkpoint_weights(output / f"checkpoint-{skipped[0] - 1}")
    assert set(final) == set(last_finite) and all(torch.equal(final[name], last_finite[name]) for name in final)
    assert all(torch.isfinite(tensor).all() for tensor in final.values())


def test_a_loss_stuck_at_ln_vocabulary_is_warned_about(config, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tga.train.divergence"):
        run(config, tmp_path / "run", "--learning_rate", "1e6", "--max_steps", "24", "--save_strategy", "no")
    assert any("ln(vocabulary size)" in record.getMessage() for record in caplog.records)


# ---- 2 (the lock is in test_run_lock.py) and 3. a resume continues the run that wrote the checkpoint ----

def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(config, finished):
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run .*--resume_from_checkpoint auto"):
        run(config, finished)


def test_a_resume_refuses_fields_that_change_what_is_trained_by_name(config, finished, tmp_path):
    resume = ["--resume_from_checkpoint", "auto", "--max_steps", "8"]
    with pytest.raises(ConfigError, match=r"tga: False in the checkpoint, True now; tga_layers: '10-18' .* '1-3' now"):
        run(config, finished, *resume, "--tga", "true", "--tga_layers", "1-3")
    other_llm = save_tiny_llm(str(tmp_path / "llm"), seed=0, hidden_size=32)
    with pytest.raises(ConfigError, match=r"model_name_or_path: .*model parameters: \d+ differ"):
        run(config, finished, *resume, "--model_name_or_path", other_llm)
    with pytest.raises(ConfigError, match=r"--allow_config_change: unknown field\(s\) \['no_such_field'\]"):
        run(config, finished, *resume, "--allow_config_change", "no_such_field")


def test_a_resume_applies_and_records_a_changed_learning_rate(config, finished, tmp_path):
    output = tmp_path / "run"
    run(config, output)  # the same 6 steps as `finished`, in a folder of its own
    original = (output / "tga_config.json").read_text()
    uninterrupted = {entry["step"]: entry["learning_rate"] for entry in history(output) if "learning_rate" in entry}
    run(config, output, "--resume_from_checkpoint", str(output / "checkpoint-4"), "--learning_rate", "1e-4",
        "--seed", "1", "--allow_config_change", "seed")
    resumed = {entry["step"]: entry["learning_rate"] for entry in history(output) if "learning_rate" in entry}
    for step in (5, 6):  # the schedule goes on from step 4, at the new peak rate (tiny_cpu.yaml: 2e-4)
        assert resumed[step] == pytest.approx(uninterrupted[step] * 1e-4 / 2e-4, rel=1e-6)
    assert (output / "tga_config.json").read_text() == original  # the run's first record is kept
    lines = [json.loads(line) for line in (output / HISTORY_FILE).read_text().splitlines()]
    assert [line["event"] for line in lines] == ["start", "resume"]
    assert lines[1]["step"] == 4 and lines[1]["allowed"] == ["seed"]
    assert lines[1]["changes"]["learning_rate"] == {"from": 2e-4, "to": 1e-4}
    assert lines[1]["changes"]["seed"] == {"from": 0, "to": 1}


# ---- 4. corrupt and truncated checkpoints ----

def copy_run(source, target):
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)
    return target


def test_same_size_corruption_falls_back_to_the_previous_checkpoint(config, finished, tmp_path, caplog):
    output = copy_run(finished, tmp_path / "run")
    optimizer = output / "checkpoint-6" / "optimizer.pt"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as handle:  # 16 KB overwritten in place: same size, other bytes
        handle.seek(size // 3)
        handle.write(b"\x7f" * 16384)
    assert optimizer.stat().st_size == size
    with pytest.raises(ConfigError, match="checkpoint-6: optimizer.pt does not match its checksum"):
        run(config, output, "--resume_from_checkpoint", str(output / "checkpoint-6"), "--max_steps", "8")
    with caplog.at_level(logging.WARNING, logger="tga.train.resilience"):
        run(config, output, "--resume_from_checkpoint", "auto", "--max_steps", "8")
    assert any("checkpoint-6 is not resumed from: optimizer.pt does not match its checksum" in record.getMessage()
               for record in caplog.records)
    assert (output / "corrupt-checkpoint-6").is_dir()
    lines = [json.loads(line) for line in (output / HISTORY_FILE).read_text().splitlines()]
    assert lines[-1]["checkpoint"].endswith("checkpoint-4")  # it went on from the newest intact checkpoint


def test_a_truncated_checkpoint_given_by_path_is_one_named_error(config, finished, tmp_path):
    output = copy_run(finished, tmp_path / "run")
    weights = output / "checkpoint-4" / "model.safetensors"
    os.truncate(weights, 1000)
    with pytest.raises(ConfigError, match=r"checkpoint-4: model.safetensors has 1000 bytes, the marker lists \d+"):
        run(config, output, "--resume_from_checkpoint", str(output / "checkpoint-4"))
    os.remove(output / "checkpoint-4" / COMPLETE_MARKER)  # as if another tool had written it: nothing to verify
    with pytest.raises(ConfigError, match=r"checkpoint-4: cannot be loaded \(SafetensorError"):
        run(config, output, "--resume_from_checkpoint", str(output / "checkpoint-4"))


# ---- 5. the final save ----

def finetune_command(config, output_dir, *flags):
    return [PYTHON, os.path.join(REPO, "scripts", "finetune.py"), config, "--output_dir", str(output_dir), *flags]


def limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_at_the_final_save_is_a_named_error_and_leaves_nothing_half_written(config, tmp_path):
    output = tmp_path / "run"
    # the model file (17 MB) does not fit; the run's small files do
    result = subprocess.run(finetune_command(config, output, "--save_strategy", "no", "--max_steps", "2"),
                            capture_output=True, text=True, preexec_fn=limit_file_size(10_000_000), timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"finetune: error: cannot write the final model to {output}" in result.stderr
    assert "no checkpoint was saved during the run" in result.stderr
    leftovers = set(os.listdir(output))
    assert not leftovers & {"model.safetensors", COMPLETE_MARKER, ".tga-final.tmp", "config.json"}, leftovers


def test_a_signal_during_the_final_save_waits_for_it(config, tmp_path):
    output = tmp_path / "run"
    process = subprocess.Popen(finetune_command(config, output, "--save_strategy", "no", "--max_steps", "2"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    staging = output / ".tga-final.tmp"
    deadline = time.time() + 300
    while not staging.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert staging.exists(), "the final save was not seen"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGTERM, stderr[-2000:]  # the signal took effect after the save
    assert "arrived during the final save, which was completed first" in stderr
    assert verify(str(output)) is None  # marker, weights, processor and trainer state, all intact
    assert {"model.safetensors", "processor_config.json", "trainer_state.json"} <= set(os.listdir(output))


def test_deepspeed_overflow_skips_are_counted_as_non_finite_steps(config, tmp_path):
    output = tmp_path / "run"
    result = subprocess.run(
        finetune_command(config, output, "--deepspeed", os.path.join(REPO, "deepspeed_configs/zero3_fp32.json"),
                         "--learning_rate", "1e30", "--max_steps", "8"),
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 3, result.stderr[-2000:]
    assert "finetune: error: training diverged at step" in result.stderr
    assert not (output / "model.safetensors").exists()
