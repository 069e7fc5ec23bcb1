"""The output-folder lock (tga/train/run_lock.py): a second run is refused naming the owner, stale locks (dead pid,
reused pid, silent other host, earlier incarnation of a SLURM job) are taken over, only the owner releases, racing
claimers on one stale lock leave exactly one winner; end to end, a second `scripts/finetune.py` into a running
run's folder exits at once, 2 DeepSpeed ranks are both refused, and a SIGKILLed run's lock does not block the next."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tga.errors import ConfigError
from tga.train.run_lock import LOCK_FILE, Owner, RunLock, claim_output_dir, encode, read_owner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()


def write_lock(folder, **fields):
    """A lock record as another run would have left it (this host, this process, fresh, unless `fields` say)."""
    now = time.time()
    owner = Owner(**{"host": HOST, "pid": os.getpid(), "process_start": psutil.Process().create_time(),
                     "started_at": now, "heartbeat": now, "slurm_job_id": None, "slurm_restart_count": None,
                     "token": "old", **fields})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_bytes(encode(owner))
    return owner


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)


def test_a_second_claim_is_refused_naming_the_owner_until_it_releases(tmp_path, no_slurm):
    with claim_output_dir(str(tmp_path / "out")) as lock:
        assert read_owner(lock.path).pid == os.getpid()
        with pytest.raises(ConfigError) as refused, claim_output_dir(str(tmp_path / "out")):
            pass
        message = str(refused.value)
        assert f"--output_dir {tmp_path / 'out'} is in use" in message
        assert f"host {HOST}, pid {os.getpid()}, started " in message and "choose another --output_dir" in message
        assert read_owner(lock.path).token == lock.owner.token  # the refused claim left the owner's lock alone
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    with claim_output_dir(str(tmp_path / "out")):  # free again
        pass
    assert os.listdir(tmp_path / "out") == []  # no temporary or set-aside files left


def test_released_on_an_exception_and_the_heartbeat_rewrites_the_record_in_place(tmp_path, no_slurm):
    with pytest.raises(KeyError), claim_output_dir(str(tmp_path), heartbeat_s=0.05) as lock:
        first = read_owner(lock.path)
        size = os.path.getsize(lock.path)
        time.sleep(0.4)
        assert read_owner(lock.path).heartbeat > first.heartbeat and os.path.getsize(lock.path) == size
        raise KeyError("boom")
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("reused", [False, True], ids=["dead pid", "reused pid"])
def test_a_lock_of_a_process_that_is_gone_on_this_host_is_taken_over(tmp_path, caplog, no_slurm, reused):
    old = write_lock(tmp_path, process_start=12345.0) if reused else write_lock(tmp_path, pid=dead_pid())
    with caplog.at_level("WARNING"), claim_output_dir(str(tmp_path)) as lock:
        assert read_owner(lock.path).token == lock.owner.token
    assert f"taking over the lock of a run that is gone (host {HOST}, pid {old.pid}, " in caplog.text
    assert ("now belongs to another process" if reused else "is gone") in caplog.text


def test_another_host_is_trusted_while_its_heartbeat_is_fresh(tmp_path, caplog, no_slurm):
    write_lock(tmp_path, host="gpu-node-7", pid=4242, heartbeat=time.time() - 60)
    with pytest.raises(ConfigError, match="host gpu-node-7, pid 4242, .*last heartbeat 6\\d s ago"):
        RunLock(str(tmp_path), stale_after_s=300).acquire()
    write_lock(tmp_path, host="gpu-node-7", pid=4242, heartbeat=time.time() - 400)
    with caplog.at_level("WARNING"), claim_output_dir(str(tmp_path), stale_after_s=300) as lock:
        assert read_owner(lock.path).host == HOST
    assert "host gpu-node-7, pid 4242" in caplog.text and "no heartbeat for 40" in caplog.text


def test_an_earlier_incarnation_of_the_same_slurm_job_is_stale(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, slurm_job_id="777", slurm_restart_count="1")  # a live run of this incarnation: refused
    with pytest.raises(ConfigError, match="SLURM job 777"):
        RunLock(str(tmp_path)).acquire()
    write_lock(tmp_path, host="gpu-node-7", heartbeat=time.time(), slurm_job_id="777")  # before the requeue
    with caplog.at_level("WARNING"), claim_output_dir(str(tmp_path)):
        pass
    assert "requeued SLURM job 777" in caplog.text


def test_only_the_owner_releases(tmp_path, no_slurm):
    owner = RunLock(str(tmp_path))
    owner.acquire()
    RunLock(str(tmp_path)).release()  # never acquired: does nothing
    assert read_owner(owner.path).token == owner.owner.token
    # the owner's lock replaced by another run's (taken over while this one was thought gone): left in place
    (tmp_path / LOCK_FILE).unlink()
    write_lock(tmp_path, host="gpu-node-7", token="newer")
    owner.release()
    assert read_owner(owner.path).token == "newer"


def claim_together(locks):
    """Every lock's acquire at the same moment, each in its own thread; returns "won" or the refusal per lock."""
    start, results = threading.Barrier(len(locks)), {}

    def claim(lock):
        start.wait()
        try:
            lock.acquire()
            results[id(lock)] = "won"
        except ConfigError as error:
            results[id(lock)] = str(error)

    threads = [threading.Thread(target=claim, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [results[id(lock)] for lock in locks]


def test_racing_claimers_on_one_stale_lock_leave_exactly_one_winner(tmp_path, no_slurm):
    for round_ in range(15):
        folder = tmp_path / str(round_)
        write_lock(folder, pid=dead_pid() if round_ == 0 else os.getpid(), process_start=1.0)
        locks = [RunLock(str(folder)) for _ in range(4)]
        results = claim_together(locks)
        winners = [lock for lock, result in zip(locks, results) if result == "won"]
        assert len(winners) == 1, results
        assert read_owner(winners[0].path).token == winners[0].owner.token
        assert all("is in use" in result for result in results if result != "won")
        winners[0].release()
        assert os.listdir(folder) == []


def test_unlearn_is_refused_in_a_claimed_folder(tiny_assets, tmp_path, no_slurm):
    from tga.unlearn.run import run_unlearn

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with claim_output_dir(str(tmp_path / "out")):
        with pytest.raises(ConfigError, match=f"--output_dir .* in use .*pid {os.getpid()}"):
            run_unlearn(["--model", tiny_assets["llm"], "--harmful", str(pairs), "--normal", str(pairs),
                         "--output_dir", str(tmp_path / "out")])
        assert not (tmp_path / "out" / "tga_config.json").exists()


def finetune(tiny_assets, output_dir, learning_rate, *flags):
    command = [sys.executable, os.path.join(REPO, "scripts", "finetune.py"),
               os.path.join(REPO, "configs/finetune/tiny_cpu.yaml"), "--deepspeed", "", "--pretrain_mm_mlp_adapter", "",
               "--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
               "--data_path", tiny_assets["stage2"], "--image_folder", tiny_assets["image_folder"],
               "--output_dir", str(output_dir), "--max_steps", "2", "--learning_rate", learning_rate, *flags]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_lock(processes, output_dir, timeout=300):
    """The lock's owner, once one of `processes` (none of which may exit before) has claimed `output_dir`."""
    deadline = time.time() + timeout
    while read_owner(str(output_dir / LOCK_FILE)) is None:
        for process in processes:
            assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, f"no lock in {output_dir} within {timeout} s"
        time.sleep(0.05)
    return read_owner(str(output_dir / LOCK_FILE))


def learning_rate_in(output_dir):
    return json.loads((output_dir / "tga_config.json").read_text())["TrainingArguments"]["learning_rate"]


@pytest.mark.slow
def test_a_second_run_into_a_running_runs_folder_is_refused_and_a_killed_run_does_not_block(tiny_assets, tmp_path):
    out = tmp_path / "out"
    runs = {rate: finetune(tiny_assets, out, rate) for rate in ("1e-4", "3e-4")}  # the same command, started together
    owner = wait_for_lock(runs.values(), out)
    rate = next(rate for rate, process in runs.items() if process.pid == owner.pid)
    first, second = runs.pop(rate), runs.popitem()[1]
    first.send_signal(signal.SIGSTOP)  # the owner holds the lock for as long as the other run needs to reach it
    try:
        _, stderr = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, stderr[-3000:]
    assert f"--output_dir {out} is in use by another run (host {HOST}, pid {first.pid}, started " in stderr
    assert "'loss'" not in stderr  # refused before training
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert learning_rate_in(out) == float(rate) and (out / "model.safetensors").exists()
    assert not (out / LOCK_FILE).exists()

    killed = finetune(tiny_assets, out, "5e-4")
    wait_for_lock([killed], out)
    killed.kill()
    killed.communicate()
    assert read_owner(str(out / LOCK_FILE)).pid == killed.pid  # SIGKILL left the lock behind
    after = finetune(tiny_assets, out, "7e-4")
    _, stderr = after.communicate(timeout=300)
    assert after.returncode == 0, stderr[-3000:]
    assert f"taking over the lock of a run that is gone (host {HOST}, pid {killed.pid}, " in stderr
    assert learning_rate_in(out) == 7e-4 and not (out / LOCK_FILE).exists()


@pytest.mark.distributed
def test_both_deepspeed_ranks_are_refused_without_hanging(tiny_assets, tmp_path, no_slurm):
    from tga.train.distributed import free_port

    out = tmp_path / "out"
    command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
               str(free_port()), os.path.join(REPO, "scripts", "finetune.py"),
               os.path.join(REPO, "configs/finetune/tiny_cpu.yaml"), "--pretrain_mm_mlp_adapter", "",
               "--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
               "--data_path", tiny_assets["stage2"], "--image_folder", tiny_assets["image_folder"],
               "--output_dir", str(out), "--deepspeed", os.path.join(REPO, "deepspeed_configs/zero3_fp32.json")]
    with claim_output_dir(str(out)):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    refusal = f"finetune: error: --output_dir {out} is in use by another run (host {HOST}, pid {os.getpid()}, "
    assert output.count(refusal) == 2, output[-3000:]  # each rank raised it (their lines may interleave)
    assert not (out / "tga_config.json").exists()
