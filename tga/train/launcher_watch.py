"""tga/train/launcher_watch.py

A rank saves and stops when the DeepSpeed launcher processes that started it go away.

`deepspeed script.py` runs three generations of processes (DeepSpeed 0.19.8): the runner (the `deepspeed` command,
launcher/runner.py) starts `python -m deepspeed.launcher.launch` (launch.py), which starts one process per rank.
Only launch.py passes SIGTERM and SIGINT on: its handler sends SIGTERM to each rank's process tree and SIGKILLs what
is left 30 s later. The runner installs no handler on a single node (only for multi-node pdsh runs), so a SIGTERM to
it, the process a user's `kill PID` or a supervisor that signals one process hits, ends the runner alone, and
launch.py and the ranks run on to the end without saving.

`LauncherWatch` closes that gap from inside the ranks. When it is built it notes the rank's parent if that is
launch.py, and launch.py's parent if that is the runner, each by pid and start time, so that a reused pid is never
taken for the process. From train start a daemon thread checks every `interval` seconds that both still run; once
one has gone (exited, or a zombie not yet reaped) it calls `on_gone`, which asks `GracefulStop` for the stop a
SIGTERM gives: a complete checkpoint at the end of the step, then exit 143. A process that was not started by the
DeepSpeed launcher (plain `python`, `tga finetune`, torchrun) watches nothing. Under `tga.train.slurm` the runner and
launch.py outlive the ranks' SIGUSR1 save, so the watch stays quiet there.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LAUNCH_MODULE = "deepspeed.launcher.launch"
RUNNER_MODULE = "deepspeed.launcher.runner"


@dataclass(frozen=True)
class Watched:
    """One launcher process: its pid and start time (psutil's `create_time`) identify it together."""

    pid: int
    started: float
    role: str


def is_launch(cmdline: list[str]) -> bool:
    """True for DeepSpeed's per-node launcher, `python -u -m deepspeed.launcher.launch ...`."""
    return LAUNCH_MODULE in cmdline or any(arg.endswith("deepspeed/launcher/launch.py") for arg in cmdline)


def is_runner(cmdline: list[str]) -> bool:
    """True for the `deepspeed` command (an entry-point script run by python) or `python -m deepspeed.launcher.runner`."""
    return RUNNER_MODULE in cmdline or any(os.path.basename(arg) == "deepspeed" for arg in cmdline[:2])


def launcher_processes(process: psutil.Process | None = None) -> list[Watched]:
    """launch.py above `process` (default: this one) and the runner above launch.py, as far as they are there."""
    found = []
    try:
        parent = (process or psutil.Process()).parent()
        if parent is None or not is_launch(parent.cmdline()):
            return found
        found.append(Watched(parent.pid, parent.create_time(), LAUNCH_MODULE))
        runner = parent.parent()
        if runner is not None and is_runner(runner.cmdline()):
            found.append(Watched(runner.pid, runner.create_time(), "deepspeed runner"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass  # a launcher that is already gone or unreadable is not watched
    return found


def is_gone(watched: Watched) -> bool:
    """True when the process has exited, is a zombie, or its pid now belongs to a process started at another time."""
    try:
        process = psutil.Process(watched.pid)
        return process.create_time() != watched.started or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # a pid reused by another user's process
        return True


class LauncherWatch(TrainerCallback):
    """Calls `on_gone(reason)` once, from a daemon thread, when a watched launcher process has gone.

    Args:
        on_gone: what to do; `GracefulStop.request` in a training run.
        watched: the processes to watch (default: `launcher_processes()` of this process, read now).
        interval: seconds between checks.
    """

    def __init__(self, on_gone: Callable[[str], None], watched: list[Watched] | None = None, interval: float = 1.0):
        self.on_gone = on_gone
        self.watched = launcher_processes() if watched is None else watched
        self.interval = interval
        self.fired = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """One check; calls `on_gone` and returns True when a watched process has gone."""
        for watched in self.watched:
            if is_gone(watched):
                self.fired = True
                self.on_gone(f"the {watched.role} process (pid {watched.pid}) that started this rank has gone")
                return True
        return False

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            if self.check():
                return

    def start(self) -> None:
        if self.watched and self._thread is None:
            self._done.clear()
            self._thread = threading.Thread(target=self._run, name="tga-launcher-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()
        return control
