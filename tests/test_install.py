"""The package as a user installs it (`pip install .`, not editable): the wheel built from the checkout holds the demo's
plans, recipes and shipped models, and the installed `tga` finds them from a folder outside the checkout.

The virtual environment reuses the test interpreter's installed packages through a `.pth` line (torch and the rest
are not reinstalled); the package itself is installed from the wheel, and the commands run with no PYTHONPATH from an
empty folder, so nothing can come from the checkout.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_FOLDERS = ("tga/demo/configs", "tga/demo/prebuilt")  # what `tga demo` reads besides the code


def _environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}


def _run(command: list[str], cwd: str, timeout: int = 600) -> str:
    result = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """A wheel built from a copy of the checkout (the build writes `build/` and `*.egg-info` where it runs)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "tga"), source / "tga", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(out), str(source)], cwd=str(out))
    (path,) = glob.glob(str(out / "tga-*.whl"))
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> str:
    """A fresh virtual environment with the wheel installed; returns its folder."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=str(venv))
    python = str(venv / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=str(venv)).strip()
    with open(os.path.join(purelib, "shared_packages.pth"), "w", encoding="utf-8") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")  # a path line only: this folder's own .pth files stay off
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed", "--no-compile",
          wheel], cwd=str(venv))
    return str(venv)


def _files(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(path, name), REPO) for path, _, files in os.walk(os.path.join(REPO, folder))
            if "__pycache__" not in path for name in files}


def test_the_wheel_holds_every_module_and_the_demo_plans_recipes_and_shipped_models(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = set().union(*(_files(folder) for folder in DATA_FOLDERS))
    assert {"tga/demo/configs/demo.yaml", "tga/demo/prebuilt/clip/model.safetensors"} <= data
    assert data - names == set()
    modules = {name for name in _files("tga") if name.endswith(".py")}  # a folder without __init__.py is left out
    assert "tga/train/run.py" in modules and modules - names == set()


def test_the_installed_demo_runs_from_outside_the_checkout(installed, tmp_path):
    """`tga demo --dry_run` builds the whole CLI (every subcommand's module is imported) and resolves the plan, its
    recipes and the shipped models, all from the installed copy."""
    site = glob.glob(os.path.join(installed, "lib", "python*", "site-packages"))[0]
    tga = os.path.join(installed, "bin", "tga")
    located = _run([os.path.join(installed, "bin", "python"), "-c", "import tga; print(tga.__file__)"], str(tmp_path))
    assert located.strip() == os.path.join(site, "tga", "__init__.py")
    listing = _run([tga, "demo", "--dry_run", "--out", "run", "--seeds", "0", "--methods", "llava"], str(tmp_path))
    shipped = os.path.join(site, "tga", "demo")
    assert f"plan: {os.path.join(shipped, 'configs', 'demo.yaml')}" in listing
    for stage, name in (("stage1", "pretrain"), ("stage2", "finetune"), ("unlearn", "unlearn")):
        assert f"recipe {stage}: {os.path.join(shipped, 'configs', name + '.yaml')}" in listing
    for model in ("clip", "llm"):  # the shipped models match the demo world, so they are copied, not trained
        assert f"{model} model: copied from {os.path.join(shipped, 'prebuilt', model)}" in listing
    assert "# seed0/llava/eval_stage2" in listing
    assert os.listdir(tmp_path) == []  # a dry run writes nothing
