"""How the entry-point scripts end (`tga.train.distributed.run_entry_point`): with a process group the rank leaves
through `os._exit`, so the tests check what a normal exit would have done still happens (exit status, atexit
handlers, buffered output) and that the group is gone first after a run that finished."""

import os
import subprocess
import sys
import textwrap

import pytest

RANK_SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    import torch
    from tga.errors import ConfigError, TrainingDiverged
    from tga.train.distributed import run_entry_point

    mode, marker, store = sys.argv[1:4]
    if store != "none":
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)

    def on_exit():
        with open(marker, "w") as handle:
            handle.write("group alive at exit: %s" % torch.distributed.is_initialized())

    atexit.register(on_exit)

    def run(argv):
        print("trained on", argv)  # stdout is a pipe: block-buffered until flushed
        if mode == "config":
            raise ConfigError("--learning_rate: not a number")
        if mode == "diverged":
            raise TrainingDiverged("training diverged at step 3")

    run_entry_point("finetune", run, ["--flag", "value"])
    print("not reached")
""")


@pytest.mark.parametrize("with_group", [True, False], ids=["process-group", "single-process"])
@pytest.mark.parametrize("mode, code", [("ok", 0), ("config", 2), ("diverged", 3)])
def test_a_rank_ends_with_its_status_its_output_and_its_exit_handlers(tmp_path, mode, code, with_group):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    marker = tmp_path / "atexit.txt"
    store = str(tmp_path / "store") if with_group else "none"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # output is buffered
    result = subprocess.run([sys.executable, str(script), mode, str(marker), store], capture_output=True, text=True,
                            timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == code, result.stderr[-2000:]
    assert "trained on ['--flag', 'value']" in result.stdout
    assert "not reached" not in result.stdout
    assert "Traceback" not in result.stderr
    if code:
        assert result.stderr.strip().splitlines()[-1].startswith("finetune: error: ")
    # the atexit handlers ran; after a finished run the process group was torn down before them
    assert marker.read_text() == f"group alive at exit: {with_group and code != 0}"
