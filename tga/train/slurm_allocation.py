"""tga/train/slurm_allocation.py

The allocation of a SLURM job step as its environment describes it, read the way SLURM writes it: host lists in
their compressed form (`gpu[01-03,07]`, `rack[1-2]-n[01-02]`, what `scontrol show hostnames` expands), per-node
counts in their run-length form (`2(x3),1`, as in SLURM_STEP_TASKS_PER_NODE), and the checks a multi-node launch
needs before any rank starts: one launcher task per node, the same number of ranks on every node (DeepSpeed numbers
the ranks of node k from k x ranks-per-node), and a node count that matches the host list.
"""

from __future__ import annotations

import itertools
import re

from tga.errors import ConfigError


def split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets (`a[1,3],b` -> `a[1,3]`, `b`)."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise ConfigError(f"host list {text!r}: `]` without `[`")
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth:
        raise ConfigError(f"host list {text!r}: `[` without `]`")
    parts.append(text[start:])
    return [part for part in parts if part]


def expand_range_group(group: str, source: str) -> list[str]:
    """The numbers of one bracket group (`01-03,07`), zero-padded to the width of each range's start."""
    numbers = []
    for item in group.split(","):
        first, _, last = item.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ConfigError(f"host list {source!r}: `[{group}]` holds {item!r}, not a number or a range a-b")
        if last and int(last) < int(first):
            raise ConfigError(f"host list {source!r}: range {item!r} runs backwards")
        numbers += [f"{n:0{len(first)}d}" for n in range(int(first), int(last or first) + 1)]
    return numbers


def expand_hostlist(text: str) -> list[str]:
    """Host names of a SLURM host list, in SLURM's order (with several bracket groups in one name, the last varies
    fastest: `rack[1-2]-n[1-2]` -> rack1-n1, rack1-n2, rack2-n1, rack2-n2)."""
    hosts = []
    for item in split_top_level(text.strip()):
        pieces = re.split(r"\[([^\]]*)\]", item)  # literal, group, literal, group, ..., literal
        choices = [[piece] if i % 2 == 0 else expand_range_group(piece, text) for i, piece in enumerate(pieces)]
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    return hosts


def expand_counts(text: str, variable: str) -> list[int]:
    """Per-node counts of SLURM's run-length form: `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise ConfigError(f"{variable}={text!r}: expected counts such as 2(x3),1")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def check_one_launcher_per_node(env: dict[str, str], hosts: list[str]) -> None:
    """The per-node launcher must be the step's only task on each node (srun --ntasks-per-node=1), on every host
    of the allocation; a second task per node would start a second set of ranks with the same rank numbers."""
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if tasks and any(count != 1 for count in expand_counts(tasks, "SLURM_STEP_TASKS_PER_NODE")):
        raise ConfigError(f"one launcher per node is needed, but this step runs {tasks} task(s) per node "
                          "(SLURM_STEP_TASKS_PER_NODE): start it with `srun --ntasks-per-node=1` as "
                          "scripts/slurm/*.sbatch do; the ranks per node are the node's GPUs or TGA_NPROC_PER_NODE")
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if nodes and nodes.isdigit() and int(nodes) != len(hosts):
        raise ConfigError(f"the step runs on {nodes} node(s) but its host list names {len(hosts)}: {hosts}; start "
                          "the launcher on every node of the allocation (srun without --nodes)")


def check_same_gpus_on_every_node(env: dict[str, str], hosts: list[str], on_this_node: int) -> None:
    """Refuse an allocation whose nodes hold different GPU counts: `--gpus N` spreads N over the nodes as SLURM likes,
    while DeepSpeed gives every node the same number of ranks."""
    total = env.get("SLURM_GPUS")
    if total and total.split(":")[-1].isdigit() and not env.get("SLURM_GPUS_PER_NODE"):
        count = int(total.split(":")[-1])
        if count != on_this_node * len(hosts):
            raise ConfigError(f"SLURM_GPUS={total} over {len(hosts)} nodes is not the same number on each (this node "
                              f"has {on_this_node}): request GPUs with --gpus-per-node so that every node has as many")
