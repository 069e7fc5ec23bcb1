"""SLURM launch without a cluster: the sbatch scripts parse, the per-node launch line built from a faked allocation
is exact, the preemption signal reaches the ranks and not the launcher, and orphaned DeepSpeed segments go.

The scripts on a real SLURM cluster: tests/test_slurm_cluster.py."""

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tga.errors import ConfigError
from tga.train.distributed import remove_orphaned_comm_buffers
from tga.train.slurm import launch_command
from tga.train.slurm_allocation import expand_hostlist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["scripts/slurm/pretrain.sbatch", "scripts/slurm/finetune.sbatch"])
def test_sbatch_scripts_parse(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "--signal=B:USR1@" in text and "scontrol requeue" in text and "--requeue" in text


def test_nodelist_expansion():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("a1,b2") == ["a1", "b2"]


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


def test_cpu_nodes_take_the_rank_count_from_tga_nproc_per_node():
    # `sbatch --gpus-per-node 0` sets SLURM_GPUS_PER_NODE=0 (measured on SLURM 22.05)
    env = {"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_PER_NODE": "0", "TGA_NPROC_PER_NODE": "2"}
    assert launch_command(env, "s.py", [])[:5] == ["deepspeed", "--num_nodes", "1", "--num_gpus", "2"]
    with pytest.raises(ConfigError, match="TGA_NPROC_PER_NODE"):
        launch_command({"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_PER_NODE": "0"}, "s.py", [])
    with pytest.raises(ConfigError, match="TGA_NPROC_PER_NODE='two'"):
        launch_command({**env, "TGA_NPROC_PER_NODE": "two"}, "s.py", [])


def test_outside_slurm_is_a_clear_error():
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        launch_command({}, "scripts/finetune.py", [])
    with pytest.raises(ConfigError, match="gpus-per-node"):
        launch_command({"SLURM_JOB_NODELIST": "n1"}, "scripts/finetune.py", [])


# A stand-in for the DeepSpeed launcher: starts two "ranks" (LOCAL_RANK set) and exits with their worst status,
# like deepspeed.launcher.launch. Each rank answers SIGUSR1 by "saving" for 2 s, then exits 143.
LAUNCHER = textwrap.dedent("""
    import os, subprocess, sys
    rank = '''
    import signal, sys, time
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
    open(sys.argv[1] + ".ready", "w").close()
    while not stop:
        time.sleep(0.05)
    time.sleep(2)
    open(sys.argv[1], "w").write("saved")
    sys.exit(143)
    '''
    ranks = [subprocess.Popen([sys.executable, "-c", rank, f"{sys.argv[1]}/rank{i}"],
                              env={**os.environ, "LOCAL_RANK": str(i)}) for i in range(2)]
    sys.exit(max(r.wait() for r in ranks))
""")


def test_preemption_signal_reaches_the_ranks_and_the_launcher_outlives_their_save(tmp_path):
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    code = f"import sys; from tga.train.slurm import run; sys.exit(run([sys.executable, {str(launcher)!r}, {str(tmp_path)!r}]))"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all((tmp_path / f"rank{i}.ready").exists() for i in range(2)):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    # SLURM signals every process of the step (srun forwarding, scancel --signal): the group stands in for it.
    os.killpg(process.pid, signal.SIGUSR1)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143  # the launcher was not killed by USR1: it exited with its ranks' status
    assert all((tmp_path / f"rank{i}").read_text() == "saved" for i in range(2))
    assert "asking 2 rank(s) to save" in output


def _hold_segment(path, ready):
    """A child that creates and maps a segment the way DeepSpeed's shm.cpp does, then waits to be killed."""
    script = (f"import mmap, os, time\nfd = os.open({path!r}, os.O_CREAT | os.O_RDWR, 0o600)\nos.ftruncate(fd, 4096)\n"
              f"m = mmap.mmap(fd, 4096)\nos.close(fd)\nopen({ready!r}, 'w').close()\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not os.path.exists(ready):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    return process


def test_a_starting_run_removes_segments_of_killed_ranks_only(tmp_path):
    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{os.getpid()}"
    killed, alive, young = f"{prefix}1_0", f"{prefix}2_0", f"{prefix}3_0"
    holders = [_hold_segment(killed, str(tmp_path / "a")), _hold_segment(alive, str(tmp_path / "b"))]
    try:
        holders[0].send_signal(signal.SIGKILL)  # no exit cleanup: the segment stays behind
        holders[0].wait()
        with open(young, "wb") as handle:  # being created right now: nobody has mapped it yet
            handle.write(b"\0" * 4096)
        old = time.time() - 600
        for path in (killed, alive):
            os.utime(path, (old, old))
        assert os.path.exists(killed)
        removed = remove_orphaned_comm_buffers()
        assert killed in removed and not os.path.exists(killed)
        assert os.path.exists(alive) and os.path.exists(young)  # in use by a live process; too young
        with open(alive, "r+b") as handle:  # and still usable by its owner
            assert len(mmap.mmap(handle.fileno(), 4096)) == 4096
    finally:
        holders[1].kill()
        holders[1].wait()
        for path in (killed, alive, young):
            if os.path.exists(path):
                os.unlink(path)


def test_ranks_stop_on_the_preemption_signal_and_restore_its_handler():
    from tga.train.resilience import GracefulStop

    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # what a rank inherits from tga.train.slurm
    try:
        stop = GracefulStop()
        stop.on_train_begin(None, None, None)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 10
        while not stop.requested and time.time() < deadline:
            time.sleep(0.01)
        assert stop.requested
        assert stop.release() == signal.SIGUSR1  # arrived before any step end: held, handed back to the caller
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)
