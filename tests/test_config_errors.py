"""Bad configs through the training entry points (scripts/pretrain.py and scripts/finetune.py), in YAML and as flags:
an unknown key, a prefix of a real option (argparse would expand it), a value outside an option's choices, and a model
or vision-tower path that does not exist are each one line naming the file, key or flag (and the closest valid
option), printed before anything is loaded or written, with no traceback."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "finetune")
CHOICES = "(choose from 'paper', 'released', 'contrastive', 'request')"
# (YAML line or flags, the error after "<file>: " for YAML / alone for flags)
YAML_CASES = [
    ("learnig_rate: 1.0e-4", "unknown option `learnig_rate` (did you mean learning_rate?)"),
    ("learning_rat: 1.0e-4", "unknown option `learning_rat` (did you mean learning_rate?)"),
    ("tga_layer: 1-3", "unknown option `tga_layer` (did you mean tga_layers?)"),
    ("skip_bad: true", "unknown option `skip_bad` (did you mean skip_bad_records?)"),
    ("tga_form: cosine", f"argument --tga_form: invalid choice: 'cosine' {CHOICES}"),
]
FLAG_CASES = [
    (["--learnig_rate", "1e-4"], "unknown option --learnig_rate (did you mean --learning_rate?)"),
    (["--learning_rat", "1e-4"], "unknown option --learning_rat (did you mean --learning_rate?)"),
    (["--tga_layer", "1-3"], "unknown option --tga_layer (did you mean --tga_layers?)"),
    (["--skip_bad=true"], "unknown option --skip_bad (did you mean --skip_bad_records?)"),
    (["--tga_form", "cosine"], f"argument --tga_form: invalid choice: 'cosine' {CHOICES}"),
]


def run_script(stage, argv, capsys, monkeypatch):
    """scripts/<stage>.py as `python scripts/<stage>.py ARGV` would run it; returns (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", [f"scripts/{stage}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, "scripts", f"{stage}.py"), run_name="__main__")
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def assert_one_line_error(stage, code, output, message, out_dir):
    assert code == 2
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == f"{stage}: error: {message}"
    assert not os.path.exists(out_dir)  # nothing was written: the run stopped before it started


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("line, message", YAML_CASES)
def test_yaml_typos_are_named_with_the_file(stage, line, message, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    config = tmp_path / "recipe.yaml"
    config.write_text(f"data_path: records.json\noutput_dir: {out}\n{line}\n")
    code, output = run_script(stage, [str(config)], capsys, monkeypatch)
    assert_one_line_error(stage, code, output, f"{config}: {message}", out)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("flags, message", FLAG_CASES)
def test_flag_typos_are_named(stage, flags, message, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, output = run_script(stage, ["--data_path", "records.json", "--output_dir", str(out), *flags], capsys,
                              monkeypatch)
    assert_one_line_error(stage, code, output, message, out)


@pytest.mark.parametrize("stage", STAGES)
def test_missing_model_and_vision_tower_paths_are_named_before_anything_is_built(stage, tiny_assets, tmp_path, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "out"
    common = ["--data_path", tiny_assets["stage2"], "--output_dir", str(out)]
    missing = str(tmp_path / "models" / "llm")
    cases = [
        (["--model_name_or_path", missing], f"--model_name_or_path {missing}: no such file or folder"),
        (["--model_name_or_path", "./checkpoints/llm"], "--model_name_or_path ./checkpoints/llm: no such file or folder"),
        (["--model_name_or_path", tiny_assets["llm"], "--vision_tower", "~/no/clip"],
         "--vision_tower ~/no/clip: no such file or folder"),
        (["--model_name_or_path", "tga-tests/not-a-cached-model"],
         "--model_name_or_path tga-tests/not-a-cached-model: not a local folder, and not in the hub cache"),
        (["--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
          "--pretrain_mm_mlp_adapter", str(tmp_path / "mm_projector.safetensors")],
         f"--pretrain_mm_mlp_adapter {tmp_path / 'mm_projector.safetensors'}: no such file"),
    ]
    for flags, message in cases:
        code, output = run_script(stage, [*common, *flags], capsys, monkeypatch)
        assert code == 2 and "Traceback" not in output
        assert output.strip().splitlines()[-1].startswith(f"{stage}: error: {message}"), output
        assert not os.path.exists(out)


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    """The same errors from real `python scripts/<stage>.py` processes (both at once: each start is slow)."""
    config = tmp_path / "recipe.yaml"
    config.write_text(f"data_path: records.json\noutput_dir: {tmp_path / 'out'}\nlearnig_rate: 1.0e-4\n")
    good = tmp_path / "good.yaml"
    good.write_text(f"data_path: records.json\noutput_dir: {tmp_path / 'out'}\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    runs = {
        "finetune": ([str(config)], f"{config}: unknown option `learnig_rate` (did you mean learning_rate?)"),
        "pretrain": ([str(good), "--learning_rate", "1e-4", "--tga_layer", "1-3"],
                     "unknown option --tga_layer (did you mean --tga_layers?)"),
    }
    processes = {stage: subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", f"{stage}.py"), *argv],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for stage, (argv, _) in runs.items()}
    for stage, process in processes.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 2 and "Traceback" not in output, output
        assert output.strip().splitlines()[-1] == f"{stage}: error: {runs[stage][1]}", output


def test_unlearning_options_are_spelled_exactly_too(tmp_path):
    from tga.errors import ConfigError
    from tga.unlearn.config import parse_unlearn_config

    with pytest.raises(ConfigError, match=r"^unknown option --w_fg \(did you mean --w_fgt\?\)$"):
        parse_unlearn_config(["--model", "m", "--harmful", "h.json", "--normal", "n.json", "--w_fg", "1"])
    config = tmp_path / "unlearn.yaml"
    config.write_text("w_fgt: 0.5\nreference: frozen\n")
    with pytest.raises(ConfigError, match=rf"^{config}: argument --reference: invalid choice: 'frozen' "
                                          r"\(choose from 'auto', 'copy', 'adapter'\)$"):
        parse_unlearn_config([str(config), "--model", "m", "--harmful", "h.json", "--normal", "n.json"])
