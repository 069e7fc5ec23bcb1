"""Configuration: YAML + flag overrides, LLaVA flags, precision checks, and every shipped recipe parses."""

import glob
import os
from dataclasses import asdict

import pytest
import yaml
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from tga.config import parse_config
from tga.errors import ConfigError
from tga.options import config_argv, load_config


@pytest.fixture(autouse=True)
def _no_leftover_deepspeed_state():
    yield
    unset_hf_deepspeed_config()


def write_yaml(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_flags_override_yaml_and_llava_flags_are_accepted(tmp_path):
    path = write_yaml(tmp_path, "data_path: a.json\nlearning_rate: 1.0e-3\nversion: plain\noutput_dir: out\n")
    argv = ["--local_rank=0", path, "--learning_rate", "2e-6", "--warmup_ratio", "0.03", "--version", "v1",
            "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--tune_mm_mlp_adapter", "True",
            "--group_by_modality_length", "True", "--evaluation_strategy", "no", "--lazy_preprocess", "True",
            "--image_aspect_ratio", "pad", "--tga", "true", "--tga_layers", "10-18"]
    model_args, data_args, tga_args, training_args = parse_config(argv)
    assert training_args.learning_rate == 2e-6 and training_args.warmup_steps == 0.03
    assert model_args.version == "v1" and model_args.tune_mm_mlp_adapter and tga_args.tga
    assert training_args.group_by_modality_length and not training_args.remove_unused_columns
    assert data_args.data_path == "a.json"


def test_yaml_lists_and_bools_become_flags(tmp_path):
    path = write_yaml(tmp_path, "tga: true\ntga_layers: [10, 12, 14]\n")
    assert config_argv([path]) == ["--tga", "true", "--tga_layers", "10,12,14"]


@pytest.mark.parametrize("flags, config, message", [
    (["--bf16", "true"], "deepspeed_configs/zero3_fp32.json", "--bf16 true contradicts"),
    (["--fp16"], "deepspeed_configs/zero3_fp32.json", "--fp16 true contradicts"),
    (["--bf16", "true", "--fp16", "true"], "deepspeed_configs/zero3.json", "both set"),
])
def test_precision_contradicting_deepspeed_is_an_error_before_anything_is_built(flags, config, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--data_path", "x.json", "--output_dir", "o", "--deepspeed", config, *flags])


def test_invalid_options_are_named():
    with pytest.raises(ConfigError, match=r"^argument --tga_form: invalid choice: 'cosine' \(choose from 'paper', "):
        parse_config(["--data_path", "x.json", "--output_dir", "o", "--tga_form", "cosine"])
    with pytest.raises(ConfigError, match="mm_use_im_start_end"):
        parse_config(["--data_path", "x.json", "--output_dir", "o", "--mm_use_im_start_end", "true"])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(["missing.yaml"])


@pytest.mark.parametrize("path", sorted(glob.glob("configs/pretrain/*.yaml") + glob.glob("configs/finetune/*.yaml")))
def test_every_shipped_training_recipe_parses(path):
    model_args, data_args, tga_args, training_args = parse_config([path])
    assert training_args.deepspeed and data_args.data_path and training_args.output_dir
    if "mistral7b" in path:
        stage2 = "finetune" in path
        assert model_args.model_name_or_path == "mistralai/Mistral-7B-Instruct-v0.2"
        assert training_args.learning_rate == (2e-6 if stage2 else 1e-3)
        assert training_args.per_device_train_batch_size == (4 if stage2 else 32)
        assert training_args.num_train_epochs == 1 and training_args.lr_scheduler_type == "cosine"
        assert tga_args.tga == ("tga" in path)


FLAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "flat_configs")


@pytest.mark.parametrize("stage, model", [(s, m) for s in ("pretrain", "finetune") for m in ("mistral7b", "tiny_cpu")])
def test_tga_configs_extend_the_baseline_and_resolve_to_the_old_flat_ones(stage, model):
    """Each TGA recipe is `base:` + its differences; it parses to exactly what the flat copy it replaced did."""
    path = f"configs/{stage}/{model}_tga.yaml"
    with open(path, encoding="utf-8") as handle:
        assert yaml.safe_load(handle)["base"] == f"{'mistral7b_llava' if model == 'mistral7b' else model}.yaml"
    flat = os.path.join(FLAT, f"{stage}_{model}_tga.yaml")
    with open(flat, encoding="utf-8") as handle:
        old = yaml.safe_load(handle)
    resolved = load_config(path)
    assert {key: value for key, value in resolved.items() if key in old} == old
    new_args, old_args = parse_config([path]), parse_config([flat])
    for new, previous in zip(new_args, old_args, strict=True):
        assert (new.to_dict() if hasattr(new, "to_dict") else asdict(new)) == (
            previous.to_dict() if hasattr(previous, "to_dict") else asdict(previous))


def test_base_resolves_relative_to_the_file_and_the_child_wins(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "root.yaml").write_text("learning_rate: 1.0e-3\nseed: 1\ntga_layers: 1-3\n")
    (tmp_path / "common" / "mid.yaml").write_text("base: root.yaml\nseed: 2\ndata_path: a.json\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: common/mid.yaml\nseed: 3\ntga_layers: null\noutput_dir: out\n")
    assert load_config(str(child)) == {"learning_rate": 1e-3, "seed": 3, "tga_layers": None, "data_path": "a.json",
                                       "output_dir": "out"}
    _, data_args, tga_args, training_args = parse_config([str(child)])
    assert training_args.seed == 3 and tga_args.tga_layers == "10-18"  # null: back to the default
    assert data_args.data_path == "a.json" and training_args.learning_rate == 1e-3


def test_base_cycles_and_missing_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"`base` cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml$"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "self.yaml"))
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*gone\.yaml \(the base of .*orphan\.yaml\)"):
        load_config(str(tmp_path / "orphan.yaml"))
    (tmp_path / "typo.yaml").write_text("base: orphan.yaml\nlearnig_rate: 1\n")
    (tmp_path / "orphan.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="unknown option `learnig_rate`"):
        parse_config([str(tmp_path / "typo.yaml")])


def test_a_demo_phase_key_changes_when_a_base_of_its_recipe_changes(tmp_path):
    from tga.demo.phases import Phase, recipe_files

    (tmp_path / "base.yaml").write_text("learning_rate: 1.0e-3\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nseed: 1\n")
    phase = Phase("stage1", str(tmp_path / "run"), (("pretrain", str(child), "--seed", "2"),))
    before = recipe_files(phase)
    assert sorted(before) == sorted([str(child), str(tmp_path / "base.yaml")])
    (tmp_path / "base.yaml").write_text("learning_rate: 2.0e-3\n")
    assert recipe_files(phase) != before
