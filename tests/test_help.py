"""`--help` answers at once: `tga`, every subcommand and the three training scripts print their help without
importing torch or transformers, and the scripts' stored help pages are the ones their parsers would print."""

import os
import subprocess
import sys

import pytest

from tga.cli.script_help import SCRIPTS, generate_help, help_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers")


def imported_modules(command: list[str]) -> set[str]:
    """Top-level modules a command imports (from `python -X importtime`), after checking it exits 0."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:"), result.stdout[:500]
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_stored_help_page_of_a_script_is_current(script):
    with open(help_path(script), encoding="utf-8") as handle:
        stored = handle.read()
    assert stored == generate_help(script), (
        f"{help_path(script)} is out of date with the options of scripts/{script}.py: run "
        "`python -m tga.cli.script_help` and commit the pages")


@pytest.mark.parametrize("command", [
    [os.path.join(os.path.dirname(sys.executable), "tga"), "--help"],
    *[[f"scripts/{script}.py", "--help"] for script in SCRIPTS],
    ["scripts/finetune.py", "configs/finetune/tiny_cpu.yaml", "-h"],
], ids=lambda command: " ".join(os.path.basename(part) for part in command))
def test_help_imports_neither_torch_nor_transformers(command):
    heavy = imported_modules(command) & set(HEAVY)
    assert not heavy, f"{' '.join(command)} imported {sorted(heavy)}"


def test_every_subcommand_help_imports_neither_torch_nor_transformers():
    """Every subcommand's help page (nested ones too) is formatted in one process that then reports what it loaded."""
    probe = (
        "import argparse, sys\n"
        "from tga.cli import build_parser\n"
        "def pages(parser):\n"
        "    yield parser.format_help()\n"
        "    for action in parser._actions:\n"
        "        if isinstance(action, argparse._SubParsersAction):\n"
        "            for sub in action.choices.values():\n"
        "                yield from pages(sub)\n"
        "count = sum(1 for page in pages(build_parser()) if page.startswith('usage:'))\n"
        f"print(count, [name for name in {HEAVY!r} if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    count, heavy = result.stdout.split(" ", 1)
    assert int(count) > 20  # tga, its commands and their own subcommands
    assert heavy.strip() == "[]", f"building the subcommands' help imported {heavy.strip()}"
