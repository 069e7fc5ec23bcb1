"""SIGTERM to the `deepspeed` command of a run reaches its ranks (tga/train/launcher_watch.py).

DeepSpeed's runner has no SIGTERM handler on a single node: it dies alone, and without the watch its launch.py and
ranks train on to the end. The 2-rank test sends SIGTERM to the runner after the first logged step and checks that
both ranks save a complete checkpoint and exit 143, and that no process of the run is left. The unit tests check
which processes a rank watches and that a reused pid does not pass for the launcher.
"""

import ctypes
import glob
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tga.train.distributed import free_port
from tga.train.launcher_watch import LauncherWatch, Watched, is_gone, is_launch, is_runner, launcher_processes
from tga.train.resilience import COMPLETE_MARKER, is_complete

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_STEPS = 200  # far more than the test lets run: a run that ignores the SIGTERM trains for minutes
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def test_command_lines_of_deepspeeds_launcher_processes():
    python = sys.executable
    assert is_launch([python, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "script.py"])
    assert is_runner([python, "/venv/bin/deepspeed", "--num_gpus", "2", "script.py"])
    assert is_runner([python, "-m", "deepspeed.launcher.runner", "script.py"])
    assert not is_launch([python, "scripts/finetune.py", "config.yaml"])
    assert not is_runner([python, "-m", "tga.train.slurm", "scripts/finetune.py"])  # the SLURM wrapper
    assert not is_runner([python, "scripts/deepspeed_notes.py"])


def test_a_process_not_started_by_deepspeed_watches_nothing():
    assert launcher_processes() == []  # pytest's parent is a shell or make, not launch.py
    watch = LauncherWatch(lambda reason: pytest.fail(reason))
    watch.start()  # nothing to watch: no thread
    assert watch.watched == [] and watch._thread is None
    watch.stop()


def test_the_watch_fires_once_when_a_watched_process_exits():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process = psutil.Process(child.pid)
    reasons = []
    watch = LauncherWatch(reasons.append, [Watched(child.pid, process.create_time(), "test")], interval=0.05)
    watch.start()
    time.sleep(0.3)
    assert reasons == []  # alive: nothing happens
    child.terminate()  # not reaped yet: a zombie counts as gone
    deadline = time.time() + 10
    while not reasons and time.time() < deadline:
        time.sleep(0.05)
    child.wait()
    watch.stop()
    assert len(reasons) == 1 and f"pid {child.pid}" in reasons[0] and watch.fired


def test_a_reused_pid_is_not_the_launcher():
    me = psutil.Process()
    assert not is_gone(Watched(me.pid, me.create_time(), "self"))
    assert is_gone(Watched(me.pid, me.create_time() - 5.0, "an earlier process with this pid"))


def _set_child_subreaper(on: bool) -> None:
    """Orphans of this process's descendants become its children, so the test can read launch.py's exit status
    after its parent, the runner, is gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0, os.strerror(ctypes.get_errno())


def _wait_exit(pid: int, deadline: float) -> int | None:
    """Exit status of a child of this process, waited for until `deadline` (None: still running)."""
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    return None


def _reap_gone(processes: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Waits for `processes` to exit (reaping those adopted by this process); returns those still alive."""
    alive = list(processes)
    while alive and time.time() < deadline:
        for process in list(alive):
            try:
                if os.waitpid(process.pid, os.WNOHANG)[0]:
                    alive.remove(process)
                    continue
            except ChildProcessError:  # not ours: gone once psutil no longer finds it running
                if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                    alive.remove(process)
                    continue
            except psutil.NoSuchProcess:
                alive.remove(process)
        time.sleep(0.1)
    return alive


@pytest.mark.distributed
def test_sigterm_to_the_deepspeed_command_saves_a_checkpoint_and_stops_the_ranks(tiny_assets, tmp_path):
    output, log_path, port = tmp_path / "run", tmp_path / "run.log", free_port()
    command = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
        os.path.join(REPO, "scripts", "finetune.py"), os.path.join(REPO, "configs/finetune/tiny_cpu.yaml"),
        "--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
        "--image_folder", tiny_assets["image_folder"], "--data_path", tiny_assets["stage2"],
        "--pretrain_mm_mlp_adapter", "", "--output_dir", str(output),
        "--deepspeed", os.path.join(REPO, "deepspeed_configs/zero3_fp32.json"), "--per_device_train_batch_size", "2",
        "--max_steps", str(MAX_STEPS), "--save_strategy", "no", "--logging_steps", "1",
    ]
    _set_child_subreaper(True)
    runner = None
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            runner = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
        started = time.time()
        while "'loss'" not in log_path.read_text(encoding="utf-8"):  # the first logged step
            assert runner.poll() is None, log_path.read_text(encoding="utf-8")[-3000:]
            assert time.time() < started + 300, "no logged step within 300 s"
            time.sleep(0.2)
        tree = psutil.Process(runner.pid).children(recursive=True)
        launch = next(process for process in tree if is_launch(process.cmdline()))
        ranks = [process for process in tree if "--local_rank" in " ".join(process.cmdline())]
        assert len(ranks) == 2
        runner.send_signal(signal.SIGTERM)  # what `kill PID` does to the `deepspeed` command
        sent = time.time()
        assert runner.wait(timeout=30) == -signal.SIGTERM  # the runner dies at once, passing nothing on
        launch_status = _wait_exit(launch.pid, sent + 300)  # launch.py was adopted by this process
        left = _reap_gone(tree, sent + 60)
        stopped = time.time() - sent
    finally:
        _set_child_subreaper(False)
        if runner is not None:
            try:
                os.killpg(runner.pid, signal.SIGKILL)  # whatever is left of the run's session
            except ProcessLookupError:
                pass
    text = log_path.read_text(encoding="utf-8")
    saved = sorted(int(name.split("-")[1]) for name in os.listdir(output) if name.startswith("checkpoint-"))
    marked = os.path.getmtime(output / f"checkpoint-{saved[-1]}" / COMPLETE_MARKER) - sent if saved else None
    print(f"SIGTERM to the runner -> checkpoint-{saved[-1] if saved else None} marked complete after {marked:.1f} s, "
          f"launch.py exit {launch_status}, the run's processes gone after {stopped:.1f} s")
    assert launch_status not in (None, 0), text[-3000:]  # not a finished run
    assert launch_status == 143, text[-3000:]  # the ranks' TrainingStopped status, passed on by launch.py
    assert not left, [process.pid for process in left]
    assert "deepspeed runner process" in text and "--resume_from_checkpoint auto" in text
    assert saved and saved[-1] < MAX_STEPS and is_complete(str(output / f"checkpoint-{saved[-1]}")), saved
    assert not (output / "model.safetensors").exists()  # no final model folder
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")  # the ranks exited, not killed
