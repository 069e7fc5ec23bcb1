"""SLURM launch: the sbatch scripts parse, and the per-node launch line built from a faked allocation is exact."""

import subprocess

import pytest

from tga.errors import ConfigError
from tga.train.slurm import expand_nodelist, launch_command


@pytest.mark.parametrize("script", ["scripts/slurm/pretrain.sbatch", "scripts/slurm/finetune.sbatch"])
def test_sbatch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "--signal=B:USR1@" in text and "scontrol requeue" in text and "--requeue" in text


def test_nodelist_expansion():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("a1,b2") == ["a1", "b2"]


@pytest.mark.parametrize("node_id", ["0", "1"])
def test_launch_line_for_two_nodes_with_two_gpus(node_id):
    env = {"SLURM_JOB_NODELIST": "node[07-08]", "SLURM_NODEID": node_id, "SLURM_GPUS_ON_NODE": "2",
           "MASTER_PORT": "31234"}
    command = launch_command(env, "scripts/finetune.py", ["configs/finetune/mistral7b_tga.yaml", "--seed", "1"])
    assert command == [
        "deepspeed", "--num_nodes", "2", "--num_gpus", "2", "--node_rank", node_id, "--master_addr", "node07",
        "--master_port", "31234", "--no_ssh", "scripts/finetune.py", "configs/finetune/mistral7b_tga.yaml",
        "--seed", "1", "--resume_from_checkpoint", "auto",
    ]


def test_outside_slurm_is_a_clear_error():
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        launch_command({}, "scripts/finetune.py", [])
    with pytest.raises(ConfigError, match="gpus-per-node"):
        launch_command({"SLURM_JOB_NODELIST": "n1"}, "scripts/finetune.py", [])
