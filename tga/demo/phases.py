"""tga/demo/phases.py

A phase of a demo or sweep run: a folder and the `tga` commands that fill it. A phase is skipped when its folder
holds a `phase.json` with the same key (a hash of its commands, of the recipe YAMLs they read and of the keys of the
phases it reads from), so a rerun reuses finished work and a killed run redoes only the phase it was in; a phase whose
key changed (an edited recipe included) starts from an empty folder, so no stale file survives. Commands run in this
process through the `tga` CLI entry point, which makes each one exactly the command a user can paste to rerun that
phase alone (they are listed in `commands.sh`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tga.errors import TGAError
from tga.options import config_chain

PHASE_FILE = "phase.json"
Runner = Callable[[list[str]], int]  # runs one `tga` argv, returns its exit status
BatchRunner = Callable[[list[list[str]]], int]  # runs a phase's argvs in order, returns the first failure's status


class PhaseError(TGAError):
    """A phase's command failed; the message names the phase and the command."""


@dataclass(frozen=True)
class Phase:
    """One step of the run.

    Attributes:
        name: a readable name, e.g. "seed0/tga/stage1".
        folder: the folder the commands write into (its `phase.json` marks the phase finished).
        commands: `tga` argv lists, run in order.
        after: names of the phases whose outputs these commands read (their keys enter this phase's key).
        kind: what the phase does ("assets", "retrieval", "activation", "stage1", "stage2", "unlearn", "evaluate").
    """

    name: str
    folder: str
    commands: tuple[tuple[str, ...], ...]
    after: tuple[str, ...] = ()
    kind: str = ""
    meta: dict = field(default_factory=dict, compare=False)


def shell_line(argv: Sequence[str]) -> str:
    return "tga " + shlex.join(argv)


def recipe_files(phase: Phase) -> dict[str, str]:
    """{path: sha256 of its text} of the recipe YAMLs the phase's commands read (with their `base:` chains): an edited
    recipe changes the key."""
    paths = sorted({path for argv in phase.commands for token in argv
                    if token.endswith((".yaml", ".yml")) and os.path.isfile(token) for path in config_chain(token)})
    digests = {}
    for path in paths:
        with open(path, "rb") as handle:
            digests[path] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def phase_key(phase: Phase, upstream: Sequence[str]) -> str:
    payload = {"commands": phase.commands, "upstream": list(upstream)}
    recipes = recipe_files(phase)
    if recipes:  # absent when no recipe file is read, so such a phase's key stays what it was
        payload["recipes"] = recipes
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def finished(phase: Phase) -> dict | None:
    """The stored record of a finished phase, or None."""
    path = os.path.join(phase.folder, PHASE_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_atomic(path: str, payload: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(temporary, path)


def run_phase(phase: Phase, key: str, runner: Runner | None = None, *, batch: BatchRunner | None = None,
              clear: bool = True, always: bool = False) -> dict:
    """Run `phase` unless it already finished with `key`; returns its record (with `cached`).

    Args:
        phase: the phase.
        key: its key (see `phase_key`).
        runner: runs one `tga` argv and returns its exit status (normally `tga.cli.main`).
        batch: instead of `runner`, runs all the phase's commands (stopping at the first failure) and returns the
            exit status (`tga.demo.parallel`: one child process per phase).
        clear: empty the folder before running (False for phases that cache inside their folder themselves).
        always: run even when finished with `key` (a phase whose command checks its own cache, cheaply).

    Raises:
        PhaseError: a command returned a non-zero status.
    """
    stored = finished(phase)
    if stored is not None and stored.get("key") == key and not always:
        return {**stored, "cached": True}
    if clear and os.path.exists(phase.folder):
        shutil.rmtree(phase.folder)
    os.makedirs(phase.folder, exist_ok=True)
    started = time.time()
    if batch is not None:
        status = batch([list(argv) for argv in phase.commands])
        if status != 0:
            raise PhaseError(f"phase {phase.name} failed (exit status {status})")
    else:
        for argv in phase.commands:
            status = runner(list(argv))
            if status != 0:
                raise PhaseError(f"phase {phase.name} failed (exit status {status}) running: {shell_line(argv)}")
    record = {"name": phase.name, "kind": phase.kind, "key": key, "seconds": round(time.time() - started, 1),
              "commands": [shell_line(argv) for argv in phase.commands]}
    _write_atomic(os.path.join(phase.folder, PHASE_FILE), record)
    return {**record, "cached": False}


def write_commands(phases: Sequence[Phase], path: str) -> None:
    """Every phase's commands, in run order, as a shell script a user can read or run piece by piece."""
    lines = ["#!/usr/bin/env bash", "# The commands of this run, phase by phase (each phase can be rerun alone).",
             "set -euo pipefail", ""]
    for phase in phases:
        lines.append(f"# {phase.name}")
        lines += [shell_line(argv) for argv in phase.commands]
        lines.append("")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
