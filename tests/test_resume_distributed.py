"""2-rank DeepSpeed ZeRO-3 (CPU) runs of stage 2 with TGA: a run killed with SIGKILL and resumed with
`--resume_from_checkpoint auto` reproduces the losses of an uninterrupted run exactly, a half-written checkpoint
is set aside, SIGTERM saves a complete checkpoint and exits as stopped, bad records are skipped and reported, a resume
on one rank of a 2-rank checkpoint is refused by name, and a diverged run stops both ranks with nothing non-finite
marked complete.

Six launches (about 40 s each on an idle machine)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file

from tga.model.tokenizer import load_tokenizer
from tga.train.distributed import free_port
from tga.train.resilience import COMPLETE_MARKER, is_complete

pytestmark = pytest.mark.distributed
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STEPS = 8


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    from tga.model.vlm import build_vlm

    torch.manual_seed(0)
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], load_tokenizer(tiny_assets["llm"]))
    projector = str(root / "projector.safetensors")
    save_file({k: v.contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}, projector)
    # The tiny stage-2 data plus one record whose image does not decode and one whose image is missing.
    records = json.loads(open(tiny_assets["stage2"]).read())
    image = next(r for r in records if "image" in r)
    images = root / "images"
    shutil.copytree(tiny_assets["image_folder"], images)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    records.append({**image, "id": "bad-decode", "image": "corrupt.png"})
    records.append({**image, "id": "bad-missing", "image": "nowhere.png"})
    data = root / "stage2_bad.json"
    data.write_text(json.dumps(records))
    return {"root": root, "projector": projector, "data": str(data), "images": str(images), "assets": tiny_assets}


def command(setup, output_dir, *flags):
    assets = setup["assets"]
    return [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        os.path.join(REPO, "scripts", "finetune.py"), os.path.join(REPO, "configs/finetune/tiny_cpu_tga.yaml"),
        "--model_name_or_path", assets["llm"], "--vision_tower", assets["vision"], "--image_folder", setup["images"],
        "--data_path", setup["data"], "--pretrain_mm_mlp_adapter", setup["projector"], "--output_dir", str(output_dir),
        "--deepspeed", os.path.join(REPO, "deepspeed_configs/zero3_fp32.json"), "--per_device_train_batch_size", "2",
        "--max_steps", str(MAX_STEPS), "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2",
        "--skip_bad_records", "true", "--logging_steps", "1", *flags,
    ]


def start(setup, output_dir, *flags):
    return subprocess.Popen(command(setup, output_dir, *flags), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def wait_for_marker(process, folder, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(folder, COMPLETE_MARKER)):
        assert process.poll() is None, finish(process)[1][-3000:]
        assert time.time() < deadline, f"no {folder} within {timeout} s"
        time.sleep(0.2)


def losses(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.fixture(scope="module")
def reference(setup):
    output = setup["root"] / "reference"
    code, log = finish(start(setup, output))
    assert code == 0, log[-3000:]
    return output


def test_reference_run_skips_and_reports_bad_records(reference):
    report = json.loads((reference / "bad_records.json").read_text())
    assert sorted(entry["id"] for entry in report["skipped"]) == ["bad-decode", "bad-missing"]
    stages = {entry["id"]: entry["stage"] for entry in report["skipped"]}
    assert stages == {"bad-decode": "skipped", "bad-missing": "load"}
    checkpoints = sorted(name for name in os.listdir(reference) if name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-6", "checkpoint-8"]  # save_total_limit 2, applied to complete ones
    assert all(is_complete(str(reference / name)) for name in checkpoints)
    assert sorted(losses(reference)) == list(range(1, MAX_STEPS + 1))


def test_sigkill_then_auto_resume_reproduces_losses_exactly(setup, reference):
    output = setup["root"] / "killed"
    process = start(setup, output)
    try:
        wait_for_marker(process, output / "checkpoint-4")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, with no chance to clean up
        process.wait()
    # Simulate a kill half-way through writing a later checkpoint: files present, one cut short, no marker.
    partial = output / "checkpoint-7"
    shutil.copytree(output / "checkpoint-4", partial)
    os.remove(partial / COMPLETE_MARKER)
    weights = next(p for p in partial.rglob("*") if p.is_file() and p.stat().st_size > 1000)
    weights.write_bytes(weights.read_bytes()[:100])
    code, log = finish(start(setup, output, "--resume_from_checkpoint", "auto"))
    assert code == 0, log[-3000:]
    assert (output / "incomplete-checkpoint-7").is_dir() and not partial.exists()
    resumed, expected = losses(output), losses(reference)
    assert sorted(resumed) == list(range(1, MAX_STEPS + 1))
    differences = {step: abs(resumed[step] - expected[step]) for step in expected}
    print("max |loss difference| after SIGKILL + resume:", max(differences.values()))
    assert resumed == expected  # bit-identical


def test_sigterm_saves_a_complete_checkpoint_and_exits_as_stopped(setup):
    output = setup["root"] / "terminated"
    process = start(setup, output)
    try:
        wait_for_marker(process, output / "checkpoint-2")
        ranks = [child for child in psutil.Process(process.pid).children(recursive=True)
                 if "--local_rank" in " ".join(child.cmdline())]
        assert len(ranks) == 2
        for rank in ranks:  # what SLURM does to every task of a job step before killing it
            rank.send_signal(signal.SIGTERM)
        code, log = finish(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code != 0, log[-3000:]  # not a finished run: callers must not go on as if it were
    assert "stopped by a signal" in log and "--resume_from_checkpoint auto" in log
    saved = sorted(int(name.split("-")[1]) for name in os.listdir(output) if name.startswith("checkpoint-"))
    assert saved and 2 <= saved[-1] < MAX_STEPS and is_complete(str(output / f"checkpoint-{saved[-1]}"))
    assert not (output / "model.safetensors").exists()  # not a finished run: no final model folder
    state = json.loads((output / f"checkpoint-{saved[-1]}" / "trainer_state.json").read_text())
    assert state["global_step"] == saved[-1]


def test_a_resume_on_another_number_of_ranks_is_refused_by_name(setup, reference):
    output = setup["root"] / "one_rank"
    shutil.copytree(reference, output)
    one_process = [sys.executable, *command(setup, output, "--resume_from_checkpoint", "auto",
                                            "--max_steps", str(MAX_STEPS + 2))[5:]]  # no launcher: one rank
    result = subprocess.run(one_process, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "world_size: the checkpoint was written by 2 rank(s), this run has 1" in result.stderr


def test_non_finite_training_stops_both_ranks_and_marks_nothing_non_finite(setup):
    output = setup["root"] / "diverged"
    code, log = finish(start(setup, output, "--learning_rate", "1e30", "--save_steps", "1"))
    assert code != 0 and "finetune: error: training diverged at step" in log, log[-3000:]
    assert not (output / "model.safetensors").exists()
    for name in os.listdir(output):
        if name.startswith("checkpoint-") and is_complete(str(output / name)):
            state = get_fp32_state_dict_from_zero_checkpoint(str(output / name))  # the ranks' partitions, joined
            assert state and all(torch.isfinite(tensor).all() for tensor in state.values()), name
