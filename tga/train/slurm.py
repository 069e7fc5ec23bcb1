"""tga/train/slurm.py

The launch line of a multi-node run under SLURM, built from SLURM's environment: one DeepSpeed launcher per node
(started by `srun --ntasks-per-node=1`), all pointing at the first node of the allocation as master, each with its
node rank; `--no_ssh` because srun, not pdsh, starts the per-node launchers. Training resumes from the newest complete
checkpoint (`--resume_from_checkpoint auto`), so a requeued job continues where the preempted one stopped.

    python -m tga.train.slurm scripts/finetune.py CONFIG.yaml [--flag value ...]   # prints and runs the line
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from tga.errors import ConfigError

DEFAULT_PORT = 29500


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`gpu[01-03,07],login1`) as host names, like `scontrol show hostnames`."""
    hosts = []
    for name, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?,?", nodelist):
        if not ranges:
            hosts.append(name)
            continue
        for part in ranges.split(","):
            start, _, end = part.partition("-")
            for number in range(int(start), int(end or start) + 1):
                hosts.append(f"{name}{number:0{len(start)}d}")
    return hosts


def hosts_of(env: dict[str, str]) -> list[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("not inside a SLURM allocation: SLURM_JOB_NODELIST is not set")
    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()
    return expand_nodelist(nodelist)


def gpus_per_node(env: dict[str, str]) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key):
            return int(env[key].split(":")[-1].split("(")[0])
    raise ConfigError("SLURM_GPUS_ON_NODE is not set: request GPUs with --gpus-per-node")


def launch_command(env: dict[str, str], script: str, args: list[str], python_bin: str = "deepspeed") -> list[str]:
    """The per-node DeepSpeed launcher command for this node of the allocation."""
    hosts = hosts_of(env)
    node_rank = int(env.get("SLURM_NODEID", "0"))
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    return [python_bin, "--num_nodes", str(len(hosts)), "--num_gpus", str(gpus_per_node(env)),
            "--node_rank", str(node_rank), "--master_addr", hosts[0], "--master_port", str(port), "--no_ssh",
            script, *args, "--resume_from_checkpoint", "auto"]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command = launch_command(dict(os.environ), argv[0], argv[1:])
    print("launch:", " ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
