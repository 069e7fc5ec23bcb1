"""Security: a scan of the whole source tree for unsafe loading and remote code, plus behaviour checks (a pickled
projector with code is refused, YAML tags that build Python objects are refused, image paths stay in the folder)."""

import ast
import os
import pickle
import subprocess

import pytest

from tga.errors import ConfigError, DataError
from tga.image_io import resolve_image_path
from tga.options import yaml_to_argv
from tga.train.checkpoint import read_projector_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Attention maps are allowed only in analysis code (they force eager attention and store L x L maps).
ATTENTION_ALLOWED = ("tga/safety/", "benchmarks/", "tests/")


def tracked_python_files():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
    return sorted(set((listed + untracked).split()))


def dotted(node):
    """`a.b.c` of a Name/Attribute chain, or ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def is_true(node):
    return isinstance(node, ast.Constant) and node.value is True


def violations_in(path, source):
    """Unsafe patterns in one file, as `path:line: what` strings."""
    found = []
    tree = ast.parse(source, filename=path)
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            name, keywords = dotted(node.func), {k.arg: k.value for k in node.keywords if k.arg}
            if name == "torch.load" and not is_true(keywords.get("weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "cloudpickle.load"):
                found.append(f"{where}: {name} (unpickling runs code)")
            if name.startswith("yaml.") and name.split(".")[-1] in ("load", "unsafe_load", "full_load", "load_all"):
                found.append(f"{where}: {name} (use yaml.safe_load)")
            if name in ("eval", "exec"):
                found.append(f"{where}: builtin {name}")
            for flag in ("trust_remote_code", "allow_pickle", "shell"):
                if is_true(keywords.get(flag)):
                    found.append(f"{where}: {flag}=True")
            for flag in ("use_safetensors", "safe_serialization", "weights_only"):
                value = keywords.get(flag)
                if isinstance(value, ast.Constant) and value.value is False:
                    found.append(f"{where}: {flag}=False")
            if is_true(keywords.get("output_attentions")) and not path.startswith(ATTENTION_ALLOWED):
                found.append(f"{where}: output_attentions=True outside analysis code")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            defaults += node.args.kw_defaults
            for argument, default in zip(arguments, defaults):
                if argument.arg == "trust_remote_code" and default is not None and not (
                        isinstance(default, ast.Constant) and default.value is False):
                    found.append(f"{where}: trust_remote_code defaults to something other than False")
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id == "trust_remote_code" and is_true(node.value):
                found.append(f"{where}: trust_remote_code field defaults to True")
    return found


def test_source_tree_has_no_unsafe_loading_or_remote_code():
    files = tracked_python_files()
    assert len(files) > 50  # the scan really covers the tree
    found = []
    for path in files:
        full = os.path.join(REPO, path)
        if os.path.isfile(full):
            with open(full, encoding="utf-8") as handle:
                found += violations_in(path, handle.read())
    assert not found, "\n".join(found)


@pytest.mark.parametrize("snippet, problem", [
    ("import torch\ntorch.load('x')", "weights_only"),
    ("import torch\ntorch.load('x', weights_only=False)", "weights_only"),
    ("import yaml\nyaml.load(open('c'), Loader=yaml.Loader)", "safe_load"),
    ("import pickle\npickle.loads(b'')", "unpickling"),
    ("f(model, trust_remote_code=True)", "trust_remote_code=True"),
    ("def load(path, trust_remote_code=True):\n    pass", "defaults"),
    ("m.save_pretrained('d', safe_serialization=False)", "safe_serialization=False"),
    ("model(x, output_attentions=True)", "output_attentions"),
    ("import numpy as np\nnp.load('x', allow_pickle=True)", "allow_pickle"),
])
def test_scanner_catches_each_pattern(snippet, problem):
    found = violations_in("tga/example.py", snippet)
    assert found and any(problem in item for item in found), found


class CodeOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file if this object is ever unpickled


def test_pickled_projector_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "mm_projector.bin"
    with open(path, "wb") as handle:
        pickle.dump({"model.mm_projector.0.weight": CodeOnLoad(str(marker))}, handle)
    with pytest.raises(ConfigError, match="refused, the file holds pickled objects"):
        read_projector_state(str(path))
    assert not marker.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"learning_rate: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ConfigError, match="evil.yaml: not a valid YAML config"):
        yaml_to_argv(str(config))
    assert not marker.exists()


@pytest.mark.parametrize("relative", ["../secret.png", "a/../../secret.png", "/etc/passwd", "a/../../../etc/x"])
def test_image_paths_outside_the_folder_are_rejected(tmp_path, relative):
    with pytest.raises(DataError, match="outside the image folder"):
        resolve_image_path(str(tmp_path / "images"), relative, "id 'r1'")


def test_image_paths_inside_the_folder_are_kept(tmp_path):
    folder = tmp_path / "images"
    assert resolve_image_path(str(folder), "a/../b.png", "x") == str(folder / "b.png")
    assert resolve_image_path(str(folder), str(folder / "c.png"), "x") == str(folder / "c.png")
