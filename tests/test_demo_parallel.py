"""Phases side by side (`tga demo --jobs N`, tga/demo/parallel.py): a phase never starts before the phases it reads
from, at most N run at once, a failure lets the running phases finish and names the phase's log, and each command
runs as a real `python -m tga` process whose output lands in the log."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tga.demo.parallel import LOG_FILE, ChildProcesses, run_parallel, threads_per_job
from tga.demo.phases import Phase, PhaseError, run_phase


def _phases(folder) -> list[Phase]:
    def phase(name: str, *after: str) -> Phase:
        return Phase(name, str(folder / name), ((name,),), after)

    # a little DAG like a demo seed: two stage-1 runs, their evaluations and the stage-2 runs that read them
    return [phase("a1"), phase("b1"), phase("a1_eval", "a1"), phase("a2", "a1"), phase("b2", "b1"),
            phase("a2_eval", "a2"), phase("b2_eval", "b2", "assets")]  # `assets` is not among the phases: finished


class Recorder:
    def __init__(self, fail: str | None = None):
        self.fail, self.spans, self.lock, self.now = fail, {}, threading.Lock(), 0
        self.running = self.most = 0

    def __call__(self, phase: Phase, runner) -> dict:
        os.makedirs(phase.folder, exist_ok=True)
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        start = time.monotonic()
        time.sleep(0.0 if phase.name == self.fail else 0.2)  # the failure is known while the others still run
        with self.lock:
            self.running -= 1
            self.spans[phase.name] = (start, time.monotonic())
        if phase.name == self.fail:
            raise PhaseError(f"phase {phase.name} failed (exit status 1)")
        return {"name": phase.name, "seconds": 0.05, "cached": False}


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_phases_wait_for_what_they_read_and_at_most_jobs_run(tmp_path, jobs):
    phases, recorder = _phases(tmp_path), Recorder()
    records = run_parallel(phases, jobs, recorder, progress=lambda _: None)
    assert set(records) == {phase.name for phase in phases}
    for phase in phases:
        for before in phase.after:
            if before in recorder.spans:
                assert recorder.spans[before][1] <= recorder.spans[phase.name][0], (before, phase.name)
    assert recorder.most <= jobs and (recorder.most >= 2 if jobs > 1 else recorder.most == 1)


def test_a_failed_phase_lets_the_running_one_finish_and_stops_its_dependents(tmp_path):
    recorder = Recorder(fail="a1")
    with pytest.raises(PhaseError, match=rf"phase a1 failed .*{LOG_FILE}"):
        run_parallel(_phases(tmp_path), 2, recorder, progress=lambda _: None)
    assert "b1" in recorder.spans  # started beside a1 and finished
    assert not {"a1_eval", "a2", "a2_eval"} & set(recorder.spans)  # they read a1's output
    assert not {"b2", "b2_eval"} & set(recorder.spans)  # nothing new starts after a failure


@pytest.mark.slow
def test_a_phase_runs_in_one_tga_process_with_its_output_in_the_log(tmp_path):
    children = ChildProcesses(threads=1)
    log = str(tmp_path / LOG_FILE)
    run = children.runner(log)
    assert run([["demo-assets", "--help"], ["demo", "--help"]]) == 0
    assert run([["demo", "--help"], ["no-such-command"], ["demo-assets", "--help"]]) == 2  # stops at the failure
    text = open(log, encoding="utf-8").read()
    assert text.startswith("$ tga demo-assets --help\n") and "--train_models" in text and "$ tga demo --help" in text
    assert "invalid choice" in text and "failed with exit status 2: tga no-such-command" in text
    assert text.count("$ tga demo-assets --help") == 1  # nothing ran after the failed command
    assert threads_per_job(1) >= threads_per_job(2) >= 1 and threads_per_job(10_000) == 1


def test_a_batch_runner_gets_all_commands_and_its_failure_leaves_the_phase_unfinished(tmp_path):
    phase = Phase("p", str(tmp_path / "p"), (("a", "1"), ("b",)))
    seen: list = []
    with pytest.raises(PhaseError, match="phase p failed .exit status 3"):
        run_phase(phase, "k", batch=lambda commands: seen.append(commands) or 3)
    assert seen == [[["a", "1"], ["b"]]] and not os.path.exists(tmp_path / "p" / "phase.json")
    record = run_phase(phase, "k", batch=lambda commands: 0)
    assert not record["cached"] and record["commands"] == ["tga a 1", "tga b"]
    assert run_phase(phase, "k", batch=lambda commands: 1)["cached"]  # finished with this key: not run again
