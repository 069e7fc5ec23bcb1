"""tga/demo/parallel.py

Runs the phases of a demo or sweep side by side (`tga demo --jobs N`): a phase starts as soon as the phases it reads
from are finished and fewer than N are running. The commands of a phase run in one child process
(`python -m tga.demo.phase_commands`, the same `tga` commands) with cores / N threads, its output (progress bars
included) going to the phase folder's `log.txt`. The tiny demo models are too small for two cores to speed one step
up much, so two phases at once finish sooner than one after the other (docs/demo.md, *Time*); the results do not
depend on the number of threads.

A failed phase lets the running ones finish (their work is kept) and then raises its error; an interrupt or a
SIGTERM stops every running process, so a rerun redoes only the phases that were cut.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from tqdm.auto import tqdm

from tga.demo.phases import BatchRunner, Phase, PhaseError, finished
from tga.errors import TrainingStopped

LOG_FILE = "log.txt"
RunOne = Callable[[Phase, BatchRunner], dict]  # runs one phase with the given runner of its commands, returns its record


def threads_per_job(jobs: int) -> int:
    """The threads each of `jobs` processes gets: the cores this process may use, shared evenly (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


class ChildProcesses:
    """Starts the commands of phases as child processes and remembers the running ones, so that they can be stopped."""

    def __init__(self, threads: int):
        self.threads = threads
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def runner(self, log_path: str) -> BatchRunner:
        """A runner of one phase's commands: one child process, its output appended to `log_path`."""

        def run(commands: list[list[str]]) -> int:
            environment = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
            with open(log_path, "a", encoding="utf-8") as log:
                process = subprocess.Popen([sys.executable, "-m", "tga.demo.phase_commands", json.dumps(commands)],
                                           stdout=log, stderr=subprocess.STDOUT, env=environment)
                with self._lock:
                    self._running.add(process)
                try:
                    return process.wait()
                finally:
                    with self._lock:
                        self._running.discard(process)

        return run

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM every running child (training saves and stops on it), then kill what is left after `grace_s`."""
        with self._lock:
            running = list(self._running)
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()


def _raise_on_sigterm(signum: int, frame) -> None:
    raise TrainingStopped(f"stopped by signal {signum}; finished phases are kept and a rerun continues")


def run_parallel(phases: Sequence[Phase], jobs: int, run_one: RunOne, progress: Callable[[str], None] = print,
                 keys: dict[str, str] | None = None) -> dict[str, dict]:
    """Run `phases` (in dependency order) at most `jobs` at a time; returns {phase name: record}.

    Args:
        phases: the phases; a name in `after` that is not among them counts as finished.
        jobs: how many phases run at once.
        run_one: runs one phase with a command runner (normally `run_phase` with the phase's key).
        progress: where start and end lines go (a bar of finished phases, naming the running ones, goes to stderr).
        keys: the phases' keys, to say "started" only of phases that are not finished already.

    Raises:
        PhaseError: the first phase that failed (after the others running with it finished).
    """
    names = {phase.name for phase in phases}
    children = ChildProcesses(threads_per_job(jobs))
    pending, done = list(phases), {}
    running: dict[Future, Phase] = {}
    failure: PhaseError | None = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread else None
    bar = tqdm(total=len(phases), desc=f"phases ({jobs} at a time)", unit="phase")
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            try:
                while running or (pending and failure is None):
                    ready = [p for p in pending if all(a in done or a not in names for a in p.after)]
                    for phase in ready[:jobs - len(running)] if failure is None else []:
                        pending.remove(phase)
                        if keys is None or (finished(phase) or {}).get("key") != keys[phase.name]:
                            progress(f"{phase.name}: started (output in {os.path.join(phase.folder, LOG_FILE)})")
                        runner = children.runner(os.path.join(phase.folder, LOG_FILE))
                        running[pool.submit(run_one, phase, runner)] = phase
                    bar.set_postfix_str(", ".join(phase.name for phase in running.values()))
                    if not running:
                        raise PhaseError(f"phases {[p.name for p in pending]} wait for phases that never run")
                    completed, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in completed:
                        phase = running.pop(future)
                        try:
                            done[phase.name] = future.result()
                        except PhaseError as error:
                            failure = failure or PhaseError(f"{error} (log: {os.path.join(phase.folder, LOG_FILE)})")
                            continue
                        bar.update()
                        record = done[phase.name]
                        state = "reused" if record["cached"] else f"done in {record['seconds']:.0f} s"
                        progress(f"[{len(done)}/{len(phases)}] {phase.name}: {state}")
            except BaseException:
                children.stop()
                raise
    finally:
        bar.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if failure is not None:
        raise failure
    return done
