"""The shipped sbatch scripts on a real one-node SLURM cluster (tests/slurm_cluster.py), with the tiny CPU recipe on
2 ranks: stage 1 preempted and requeued, stage 2 chained after it with `--dependency=afterok`, and an uninterrupted
stage 1 to compare with.

Only what a user sets differs from a cluster run: sbatch options (`--gpus-per-node 0 --cpus-per-task 1 --output`),
`TGA_NPROC_PER_NODE=2` in the environment, and the training flags (tiny asset paths, batch size, steps).

Preemption: once the run has logged two steps, the test sends the scripts' signal the way `--signal=B:USR1@600`
does before the time limit (`scancel --batch --signal=USR1`). While the ranks write the checkpoint, the test stops
one rank with SIGSTOP for 35 s, so the save takes longer than the 30 s after which the DeepSpeed launcher SIGKILLs
ranks it passed SIGTERM to, and longer than SLURM's default KillWait. The save must still complete, the job be
requeued, and the requeued run resume from it and end with the weights and losses of the uninterrupted run.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from slurm_cluster import SlurmCluster, missing_programs

from tga.train.resilience import COMPLETE_MARKER, list_checkpoints

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
SLOW_SAVE_S = 35.0
TIMEOUT_S = 1800.0


def skip_reason() -> str | None:
    missing = missing_programs()
    if missing:
        return f"SLURM is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "the one-node SLURM cluster runs slurmd, which needs root"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield cluster
    cluster.stop()


class Jobs:
    """Submits the shipped scripts and records each job's state changes (the attempts of a requeued job)."""

    def __init__(self, cluster: SlurmCluster, logs: str, extensions: str):
        self.cluster, self.logs = cluster, logs
        self.history: dict[str, list[tuple[str, float]]] = {}
        # "The environment activated": the virtual environment's bin first. Its ninja may differ from the system's,
        # and two ninja versions rewrite each other's build log, so DeepSpeed's CPU all-reduce op would be rebuilt
        # by every run that alternates between them: the jobs keep their own extension build folder.
        self.env = {"PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": REPO,
                    "OMP_NUM_THREADS": "1", "TGA_NPROC_PER_NODE": "2", "TORCH_EXTENSIONS_DIR": extensions}

    def submit(self, script: str, *args: str, options: tuple[str, ...] = ()) -> str:
        out = self.cluster.run("sbatch", "--parsable", "--gpus-per-node", "0", "--cpus-per-task", "1",
                               "--output", f"{self.logs}/%x-%j.out", *options, script, *args, cwd=REPO, env=self.env)
        job = out.strip().split(";")[0]
        self.history[job] = [("SUBMITTED", time.monotonic())]
        return job

    def poll(self) -> None:
        for job, changes in self.history.items():
            state = self.cluster.job(job).get("JobState")
            if state and state != changes[-1][0]:
                changes.append((state, time.monotonic()))

    def wait(self, job: str, states: set[str], until=None) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while self.history[job][-1][0] not in states and not (until and until()):
            assert self.history[job][-1][0] not in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}, \
                self.log(job)[-4000:]
            assert time.monotonic() < deadline, f"job {job}: {self.history[job]}\n{self.log(job)[-4000:]}"
            time.sleep(0.02 if until else 0.5)
            self.poll()

    def sleep(self, seconds: float) -> None:
        """Wait, still recording state changes."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll()
            time.sleep(0.5)

    def log(self, job: str) -> str:
        paths = glob.glob(f"{self.logs}/*-{job}.out")
        return open(paths[0], encoding="utf-8", errors="replace").read() if paths else ""

    def run_times(self, job: str) -> list[float]:
        """Seconds each attempt of `job` ran (RUNNING until the next state)."""
        changes = self.history[job]
        return [round(changes[i + 1][1] - at, 1) for i, (state, at) in enumerate(changes[:-1]) if state == "RUNNING"]


def rank_processes(job: str) -> dict[int, psutil.Process]:
    """LOCAL_RANK -> process of the training ranks of a running job (found through their environment)."""
    ranks = {}
    for process in psutil.process_iter():
        try:
            env = process.environ()
            if env.get("SLURM_JOB_ID") == job and "LOCAL_RANK" in env and "LOCAL_RANK" not in process.parent().environ():
                ranks[int(env["LOCAL_RANK"])] = process
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            continue
    return ranks


def job_processes(job: str) -> list[psutil.Process]:
    """Every process of a job's attempt (the batch script, srun, launcher, ranks), found through their environment."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SLURM_JOB_ID") == job:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class FirstAttemptEnded:
    """True once no process of the job's first attempt is left and slurmctld has logged its `_job_complete` (or,
    where this SLURM logs none for a requeued job, 5 s after its last process ended)."""

    def __init__(self, cluster: SlurmCluster, job: str):
        self.log, self.job, self.gone_since = os.path.join(cluster.folder, "slurmctld.log"), job, None

    def __call__(self) -> bool:
        if job_processes(self.job):
            return False
        self.gone_since = self.gone_since or time.monotonic()
        with open(self.log, encoding="utf-8", errors="replace") as handle:
            logged = re.search(rf"_job_complete: .*JobId={self.job}\b", handle.read()) is not None
        return logged or time.monotonic() - self.gone_since > 5


def losses(output_dir: str) -> dict[int, float]:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return {entry["step"]: entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def runs(cluster, tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_runs")
    jobs = Jobs(cluster, str(root), str(tmp_path_factory.getbasetemp().parent / "torch_extensions_slurm"))
    assets = tiny_assets
    stage1 = ("configs/pretrain/tiny_cpu.yaml", "--model_name_or_path", assets["llm"], "--vision_tower", assets["vision"],
              "--data_path", assets["stage1"], "--image_folder", assets["image_folder"],
              "--per_device_train_batch_size", "2", "--max_steps", str(STEPS))
    out = {name: str(root / name) for name in ("preempted", "reference", "finetune")}
    preempted = jobs.submit("scripts/slurm/pretrain.sbatch", *stage1, "--output_dir", out["preempted"])
    reference = jobs.submit("scripts/slurm/pretrain.sbatch", *stage1, "--output_dir", out["reference"])
    finetune = jobs.submit(
        "scripts/slurm/finetune.sbatch", "configs/finetune/tiny_cpu.yaml", "--model_name_or_path", assets["llm"],
        "--vision_tower", assets["vision"], "--data_path", assets["stage2"], "--image_folder", assets["image_folder"],
        "--pretrain_mm_mlp_adapter", f"{out['preempted']}/mm_projector.safetensors", "--output_dir", out["finetune"],
        "--per_device_train_batch_size", "2", "--max_steps", "2", options=(f"--dependency=afterok:{preempted}",))

    # Preempt stage 1 after its second step: freeze the ranks, send the signal, let them go on.
    jobs.wait(preempted, set(), until=lambda: jobs.log(preempted).count("'loss'") >= 2)
    ranks = rank_processes(preempted)
    assert sorted(ranks) == [0, 1], jobs.log(preempted)[-3000:]
    for process in ranks.values():
        process.suspend()
    signalled = time.monotonic()
    cluster.run("scancel", "--batch", "--signal=USR1", preempted)
    for process in ranks.values():
        process.resume()
    # Slow the save down: stop rank 1 as soon as the checkpoint folder appears, for longer than 30 s.
    jobs.wait(preempted, set(), until=lambda: list_checkpoints(out["preempted"]))
    ranks[1].suspend()
    save_started = time.monotonic()
    marker_seen_while_stopped = bool(glob.glob(f"{out['preempted']}/checkpoint-*/{COMPLETE_MARKER}"))
    jobs.sleep(SLOW_SAVE_S)
    ranks[1].resume()
    stop_checkpoint = list_checkpoints(out["preempted"])[0][1]
    jobs.wait(preempted, set(), until=lambda: os.path.exists(os.path.join(stop_checkpoint, COMPLETE_MARKER)))
    save_s = time.monotonic() - save_started
    signal_to_saved_s = time.monotonic() - signalled
    stop_step = int(stop_checkpoint.rsplit("-", 1)[1])  # read before the requeued run finishes
    # SLURM holds a requeued job for two minutes (Reason=BeginTime); move its start to now rather than wait, but only
    # once the first attempt's batch script has exited and slurmctld has recorded it: an attempt started before that
    # is charged with the old script's exit status (seen once: the requeued job ended FAILED).
    jobs.wait(preempted, {"PENDING"})
    first_attempt_ended = FirstAttemptEnded(cluster, preempted)
    jobs.wait(preempted, set(), until=first_attempt_ended)
    cluster.run("scontrol", "update", f"JobId={preempted}", "StartTime=now")

    for job in (preempted, reference, finetune):
        jobs.wait(job, {"COMPLETED"})
    info = {name: cluster.job(job) for name, job in
            (("preempted", preempted), ("reference", reference), ("finetune", finetune))}
    summary = {
        "cluster_startup_s": round(cluster.startup_s, 1),
        "wall_s": {name: jobs.run_times(job) for name, job in
                   (("preempted", preempted), ("reference", reference), ("finetune", finetune))},
        "signal_to_saved_s": round(signal_to_saved_s, 1), "save_s": round(save_s, 1), "stop_step": stop_step,
        "losses": {"preempted": losses(out["preempted"]), "reference": losses(out["reference"])},
    }
    print("SLURM run summary:", json.dumps(summary))
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return {"jobs": jobs, "out": out, "info": info, "summary": summary, "ids": (preempted, reference, finetune),
            "marker_seen_while_stopped": marker_seen_while_stopped, "save_s": save_s, "stop_step": stop_step}


def test_preempted_job_saved_a_slow_checkpoint_was_requeued_and_resumed(runs):
    preempted = runs["ids"][0]
    assert not runs["marker_seen_while_stopped"]  # the rank was stopped inside the save, not after it
    assert runs["save_s"] > 30.0
    assert 0 < runs["stop_step"] < STEPS
    assert runs["info"]["preempted"]["Restarts"] == "1"
    assert len(runs["summary"]["wall_s"]["preempted"]) == 2  # two attempts: stopped, then resumed to the end
    log = runs["jobs"].log(preempted)  # both attempts, --open-mode=append
    assert "preemption signal" in log and f"checkpoint-{runs['stop_step']}" in log
    # resumed, not restarted: the steps before the stop were logged once, by the first attempt
    assert log.count("'loss'") == STEPS


def test_preempted_and_requeued_run_equals_the_uninterrupted_run(runs):
    out = runs["out"]
    assert losses(out["preempted"]) == losses(out["reference"])
    assert sorted(losses(out["reference"])) == list(range(1, STEPS + 1))
    resumed = load_file(f"{out['preempted']}/mm_projector.safetensors")
    uninterrupted = load_file(f"{out['reference']}/mm_projector.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def test_stage_two_ran_after_stage_one_and_loads_with_plain_transformers(runs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    info = runs["info"]
    assert info["finetune"]["StartTime"] >= info["preempted"]["EndTime"]  # ISO times compare as strings
    model = LlavaForConditionalGeneration.from_pretrained(runs["out"]["finetune"])
    processor = AutoProcessor.from_pretrained(runs["out"]["finetune"])
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_no_shared_memory_segment_is_left_by_the_jobs(runs):
    for job in runs["ids"]:
        port = 20000 + int(job) % 20000  # the scripts' MASTER_PORT
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def test_cluster_came_up_quickly(cluster):
    assert cluster.node_state() in {"idle", "mixed", "allocated"}
    assert cluster.startup_s < 30.0
    assert SlurmCluster(cluster.folder).start().startup_s == 0.0  # idempotent: the running cluster is reused
