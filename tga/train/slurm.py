"""tga/train/slurm.py

The per-node process of a SLURM job: it builds the DeepSpeed launch line from SLURM's environment and runs it, and
passes the job's preemption signal (SIGUSR1) straight to the training ranks.

Launch line: one DeepSpeed launcher per node (started by `srun --ntasks-per-node=1`), all pointing at the first node
of the allocation as master, each with its node rank; `--no_ssh` because srun, not pdsh, starts the per-node
launchers. Ranks per node: `TGA_NPROC_PER_NODE` if set (CPU nodes), else the node's GPUs. Training resumes from the
newest complete checkpoint (`--resume_from_checkpoint auto`), so a requeued job continues where it stopped.

Preemption: SIGUSR1 asks the ranks to save a checkpoint and stop (`tga.train.resilience.GracefulStop`). The DeepSpeed
launcher and its runner are started with SIGUSR1 ignored, so a signal SLURM sends to every process of the step leaves
them running, and this process also sends it to the ranks itself (every few seconds until they exit, so that a rank
still loading the model gets it once it trains). The ranks then take as long as the save needs: SIGTERM would instead
reach the launcher, which SIGKILLs its ranks 30 s after passing SIGTERM on (a fixed timeout in DeepSpeed).

    python -m tga.train.slurm scripts/finetune.py CONFIG.yaml [--flag value ...]   # prints and runs the line
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

from tga.errors import ConfigError
from tga.train.slurm_allocation import check_one_launcher_per_node, check_same_gpus_on_every_node, expand_hostlist

DEFAULT_PORT = 29500
PREEMPT_SIGNAL = signal.SIGUSR1
RESEND_S = 5.0  # how often the preemption signal is passed on again until the ranks have exited


def hosts_of(env: dict[str, str]) -> list[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("not inside a SLURM allocation: SLURM_JOB_NODELIST is not set")
    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()
    return expand_hostlist(nodelist)


def procs_per_node(env: dict[str, str]) -> int:
    """Training ranks on each node: TGA_NPROC_PER_NODE, else the GPUs SLURM gave the node."""
    if env.get("TGA_NPROC_PER_NODE"):
        value = env["TGA_NPROC_PER_NODE"]
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"TGA_NPROC_PER_NODE={value!r}: expected a positive number of ranks per node")
        return int(value)
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key):
            count = int(env[key].split(":")[-1].split("(")[0])
            if count > 0:
                return count
    raise ConfigError("no GPUs in this allocation: request them with --gpus-per-node, or set TGA_NPROC_PER_NODE "
                      "to the number of CPU ranks per node")


def launch_command(env: dict[str, str], script: str, args: list[str], python_bin: str = "deepspeed") -> list[str]:
    """The per-node DeepSpeed launcher command for this node of the allocation."""
    hosts = hosts_of(env)
    check_one_launcher_per_node(env, hosts)
    ranks = procs_per_node(env)
    if not env.get("TGA_NPROC_PER_NODE"):
        check_same_gpus_on_every_node(env, hosts, ranks)
    node_rank = int(env.get("SLURM_NODEID", "0"))
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    return [python_bin, "--num_nodes", str(len(hosts)), "--num_gpus", str(ranks),
            "--node_rank", str(node_rank), "--master_addr", hosts[0], "--master_port", str(port), "--no_ssh",
            script, *args, "--resume_from_checkpoint", "auto"]


def rank_processes(root: psutil.Process) -> list[psutil.Process]:
    """The training ranks below `root`: the top-most descendants with LOCAL_RANK in their environment (the launcher
    sets it for each rank; a rank's own children inherit it and are left out)."""
    ranks = []
    for process in root.children(recursive=True):
        try:
            if "LOCAL_RANK" in process.environ() and "LOCAL_RANK" not in process.parent().environ():
                ranks.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ranks


def _ignore_preempt_signal() -> None:  # runs in the child before exec: SIG_IGN survives exec, handlers do not
    signal.signal(PREEMPT_SIGNAL, signal.SIG_IGN)


def run(command: list[str]) -> int:
    """Run the launcher; on SIGUSR1 pass it to the ranks until they exit. Returns the launcher's exit status."""
    requested = []
    signal.signal(PREEMPT_SIGNAL, lambda signum, frame: requested.append(time.time()))
    launcher = subprocess.Popen(command, preexec_fn=_ignore_preempt_signal)  # noqa: PLW1509 -- no threads here
    me = psutil.Process()
    sent = 0.0
    while launcher.poll() is None:
        if requested and time.monotonic() - sent >= RESEND_S:
            ranks = rank_processes(me)
            if not sent:
                print(f"preemption signal: asking {len(ranks)} rank(s) to save a checkpoint and stop", flush=True)
            for process in ranks:
                try:
                    process.send_signal(PREEMPT_SIGNAL)
                except psutil.NoSuchProcess:
                    pass
            sent = time.monotonic()
        time.sleep(0.2)
    return launcher.returncode


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        command = launch_command(dict(os.environ), argv[0], argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("launch:", " ".join(command), flush=True)
    return run(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
