"""The launcher's view of a SLURM allocation (tga/train/slurm_allocation.py): host lists expanded as `scontrol show
hostnames` expands them (checked against scontrol itself where SLURM is installed), run-length per-node counts, and
the allocations a multi-node launch refuses before any rank starts."""

import shutil
import subprocess

import pytest

from tga.errors import ConfigError
from tga.train.slurm import launch_command
from tga.train.slurm_allocation import expand_counts, expand_hostlist

HOST_LISTS = [
    "node[07-08]",
    "gpu[01-03,07],login1",
    "rack[1-2]-n[01-02]",
    "x-[8-10],y[098-101]",
    "a[1,3-4]b[2-3],c",
    "solo",
]


@pytest.mark.parametrize("text, hosts", [
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x-[8-10]", ["x-8", "x-9", "x-10"]),
    ("y[098-101]", ["y098", "y099", "y100", "y101"]),
    ("a1,b2", ["a1", "b2"]),
])
def test_host_lists_expand_in_slurms_order(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("gpu[01-03", "`\\[` without `\\]`"),
    ("gpu01-03]", "`\\]` without `\\[`"),
    ("gpu[05-03]", "runs backwards"),
    ("gpu[a-b]", "not a number"),
])
def test_malformed_host_lists_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        expand_hostlist(text)


def test_host_lists_match_scontrol_show_hostnames(tmp_path):
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed (CI installs slurm-wlm)")
    config = tmp_path / "slurm.conf"  # scontrol reads a configuration even to expand a host list
    config.write_text("ClusterName=hostlists\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1 State=UNKNOWN\n"
                      "PartitionName=p Nodes=localhost Default=YES\n")
    for text in HOST_LISTS:
        result = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=30,
                                env={"SLURM_CONF": str(config), "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        assert expand_hostlist(text) == result.stdout.split(), text


def test_run_length_counts_expand_and_bad_ones_name_the_variable():
    assert expand_counts("2(x3),1", "SLURM_STEP_TASKS_PER_NODE") == [2, 2, 2, 1]
    assert expand_counts("4", "SLURM_STEP_TASKS_PER_NODE") == [4]
    with pytest.raises(ConfigError, match="SLURM_STEP_TASKS_PER_NODE='2x3'"):
        expand_counts("2x3", "SLURM_STEP_TASKS_PER_NODE")


TWO_NODES = {"SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4"}


def test_a_launch_on_two_nodes_with_one_task_each_is_built():
    env = {**TWO_NODES, "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS": "8"}
    command = launch_command(env, "scripts/finetune.py", [])
    assert command[:8] == ["deepspeed", "--num_nodes", "2", "--num_gpus", "4", "--node_rank", "1", "--master_addr"]
    assert command[8] == "node07"


@pytest.mark.parametrize("extra, message", [
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, "srun --ntasks-per-node=1"),
    ({"SLURM_STEP_TASKS_PER_NODE": "1,2"}, "runs 1,2 task"),
    ({"SLURM_STEP_NUM_NODES": "3"}, "runs on 3 node\\(s\\) but its host list names 2"),
    ({"SLURM_GPUS": "6"}, "SLURM_GPUS=6 over 2 nodes"),
])
def test_allocations_a_multi_node_launch_cannot_use_are_refused_by_name(extra, message):
    with pytest.raises(ConfigError, match=message):
        launch_command({**TWO_NODES, **extra}, "scripts/finetune.py", [])
