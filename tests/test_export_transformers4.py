"""`tga export --layout transformers4`: key names, config fields, tokenizer and processor files as transformers 4.x
(and the llava-hf checkpoints) have them, checked against the 4.x module layout: 4.x's Llava holds a `CLIPVisionModel`
(keys `vision_model.*`) as `vision_tower` and a `*ForCausalLM` as `language_model`. transformers 5 loads the same folder
to identical weights and logits. Real transformers 4.57.1 (`make t4-env`, .venv-t4, layered on .venv) loads the folder
with no extra arguments in a subprocess: its processor returns only what the model takes, `generate(**processor(...))`
runs, and pixels, logits and greedy tokens are training's and transformers 5's; that test is skipped without .venv-t4.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from tga.cli import main
from tga.data.chat_templates import chat_template
from tga.data.dataset import SampleBuilder
from tga.data.records import Record
from tga.data.templates import Message
from tga.errors import ConfigError
from tga.export import export_hf_llava
from tga.export_transformers4 import transformers4_key
from tga.model.processor import build_processor
from tga.model.tokenizer import load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T4_PYTHON = os.path.join(REPO, ".venv-t4", "bin", "python")
needs_transformers4 = pytest.mark.skipif(
    not os.path.exists(T4_PYTHON), reason="transformers 4.57.1 environment missing: `make t4-env` builds .venv-t4")
SIZES = [(45, 17), (17, 45), (33, 31)]  # wide, tall, odd: padded, resized and cropped
QUESTION = "What is this?"
MODEL_INPUTS = ["attention_mask", "input_ids", "pixel_values"]  # what LlavaForConditionalGeneration takes

# Run by .venv-t4's python: what a transformers 4 user writes, with no extra arguments anywhere.
T4_SCRIPT = """import sys

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

folder, out_file, question, *images = sys.argv[1:]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
result = {"version": transformers.__version__, "image_processor": type(processor.image_processor).__name__,
          "prompt": prompt, "runs": []}
for path in images:
    with Image.open(path) as image:
        inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
    run = {"keys": sorted(inputs.keys()), "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
    try:
        with torch.no_grad():
            run["logits"] = model(**inputs).logits
        run["tokens"] = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    except Exception as error:
        run["error"] = f"{type(error).__name__}: {error}"
    result["runs"].append(run)
torch.save(result, out_file)
"""


@pytest.fixture(scope="module")
def folders(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    tokenizer = load_tokenizer(tiny_assets["llm"])
    torch.manual_seed(0)
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    model.config.text_config.rope_parameters["rope_theta"] = 1e6  # Mistral-7B-v0.2's base, not 4.x's fallback
    source = str(root / "vlm")
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    build_processor(model, tokenizer, load_image_processor(tiny_assets["vision"])).save_pretrained(source)
    return {"source": source, "v5": export_hf_llava(source, str(root / "v5")),
            "v4": export_hf_llava(source, str(root / "v4"), layout="transformers4"), "model": model.eval(),
            "tokenizer": tokenizer}


def read(folder, name):
    with open(os.path.join(folder, name), encoding="utf-8") as handle:
        return json.load(handle)


def test_weight_names_are_those_of_the_transformers4_llava_modules(folders):
    model = folders["model"]
    llm_keys = {f"model.{key}" for key in model.model.language_model.state_dict()} | {"lm_head.weight"}
    expected = ({f"language_model.{key}" for key in llm_keys}
                | {f"vision_tower.vision_model.{key}" for key in model.model.vision_tower.state_dict()}
                | {f"multi_modal_projector.{key}" for key in model.model.multi_modal_projector.state_dict()})
    with safe_open(os.path.join(folders["v4"], "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == expected
        assert handle.metadata()["format"] == "pt"
    with safe_open(os.path.join(folders["v5"], "model.safetensors"), framework="pt") as handle:
        assert any(key.startswith("vision_tower.embeddings.") for key in handle.keys())  # what 4.x would drop


def test_config_has_the_fields_transformers4_reads(folders):
    config = read(folders["v4"], "config.json")
    text = config["text_config"]
    assert text["rope_theta"] == 1e6 and "rope_parameters" not in text and "rope_scaling" not in text
    assert config["image_token_index"] == folders["tokenizer"].convert_tokens_to_ids("<image>")
    assert config["torch_dtype"] == text["torch_dtype"] == config["vision_config"]["torch_dtype"] == "float32"
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["vision_config"]["model_type"] == "clip_vision_model" and text["model_type"] == "mistral"
    assert "rope_theta" not in read(folders["v5"], "config.json")["text_config"]  # what 4.x would miss


def test_tokenizer_and_processor_files_are_those_transformers4_loads(folders):
    tokenizer_config = read(folders["v4"], "tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.x has no TokenizersBackend
    assert "extra_special_tokens" not in tokenizer_config and "<image>" in tokenizer_config["additional_special_tokens"]
    assert tokenizer_config["chat_template"] == chat_template("llava_llama_2")
    assert read(folders["v4"], "chat_template.json")["chat_template"] == chat_template("llava_llama_2")
    # only the inputs Llava takes: 4.x's PreTrainedTokenizerFast would add token_type_ids, which generate rejects
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
    assert read(folders["v5"], "tokenizer_config.json")["model_input_names"] == ["input_ids", "attention_mask"]
    image_processor = read(folders["v4"], "preprocessor_config.json")
    # the torchvision processor, 4.x's default only under a `Fast` name; its `LlavaImageProcessor` resizes with PIL
    assert image_processor["image_processor_type"] == "LlavaImageProcessorFast" and image_processor["do_pad"] is True
    assert "image_processor" not in read(folders["v4"], "processor_config.json")
    # tokenizer.json alone gives the training token ids (what PreTrainedTokenizerFast runs in 4.x)
    text = "[INST] <image>\nWhat is this? [/INST] A cat.</s>"
    plain = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folders["v4"], "tokenizer.json"))
    assert plain(text)["input_ids"] == folders["tokenizer"](text)["input_ids"]


def test_transformers5_loads_the_transformers4_layout_to_the_same_model(folders):
    v4 = LlavaForConditionalGeneration.from_pretrained(folders["v4"]).eval()
    v5 = LlavaForConditionalGeneration.from_pretrained(folders["v5"]).eval()
    processor = AutoProcessor.from_pretrained(folders["v4"])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=Image.effect_noise((40, 24), 50).convert("RGB"), text=prompt, return_tensors="pt")
    assert sorted(inputs.keys()) == MODEL_INPUTS
    assert v4.config.text_config.rope_parameters["rope_theta"] == 1e6
    with torch.no_grad():
        assert torch.equal(v4(**inputs).logits, v5(**inputs).logits)
    assert torch.equal(v4.generate(**inputs, max_new_tokens=2, do_sample=False),
                       v5.generate(**inputs, max_new_tokens=2, do_sample=False))


def training_pixels(vision, path):
    """The pixels tga.data builds for a record's image with the vision tower's processor, as a training run does."""
    builder = SampleBuilder(tokenizer=None, template=None, image_folder=os.path.dirname(path),  # only images are built
                            image_processor=load_image_processor(vision, "pad"), image_token_id=0,
                            num_image_tokens=16, image_aspect_ratio="pad")
    name = os.path.basename(path)
    return builder.load_image(Record(id=name, image=name, messages=(Message("user", "<image>\nq"),
                                                                     Message("assistant", "a"))))


@needs_transformers4
def test_transformers4_generates_from_the_processor_with_training_pixels_and_logits(folders, tiny_assets, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for width, height in SIZES:
        paths.append(str(tmp_path / f"{width}x{height}.png"))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "t4.py").write_text(T4_SCRIPT)
    out_file = str(tmp_path / "t4.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([T4_PYTHON, str(tmp_path / "t4.py"), folders["v4"], out_file, QUESTION, *paths],
                         capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(out_file, weights_only=True)
    assert result["version"] == "4.57.1"

    model = LlavaForConditionalGeneration.from_pretrained(folders["source"]).eval()  # transformers 5, the tga folder
    processor = AutoProcessor.from_pretrained(folders["source"])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True)
    assert result["prompt"] == prompt
    for path, t4 in zip(paths, result["runs"]):
        assert t4["keys"] == MODEL_INPUTS  # no token_type_ids
        assert "error" not in t4, t4["error"]  # generate(**processor(...)) ran
        torch.testing.assert_close(t4["pixel_values"][0], training_pixels(tiny_assets["vision"], path), rtol=0, atol=0)
        with Image.open(path) as image:
            inputs = processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
        assert torch.equal(t4["input_ids"], inputs["input_ids"])
        with torch.no_grad():
            torch.testing.assert_close(t4["logits"], model(**inputs).logits)  # float32 tolerances
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert torch.equal(t4["tokens"], tokens)
    assert result["image_processor"] == "LlavaImageProcessorFast"  # the default, with no use_fast argument


def test_unknown_weight_names_and_layouts_are_errors(folders, tmp_path):
    assert transformers4_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == (
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
    with pytest.raises(ConfigError, match="not part of a Llava model"):
        transformers4_key("text_encoder.weight")
    with pytest.raises(ConfigError, match="--layout"):
        export_hf_llava(folders["source"], str(tmp_path / "x"), layout="transformers3")
    assert main(["export", folders["source"], str(tmp_path / "cli"), "--layout", "transformers4"]) == 0
    assert read(str(tmp_path / "cli"), "config.json")["text_config"]["rope_theta"] == 1e6


def test_a_resize_run_keeps_its_aspect_ratio_through_the_transformers4_export(folders, tiny_assets, tmp_path):
    """The v4 layout saves the fast image processor's name; tga still reads the run's padding from it."""
    from tga.model.vision import saved_aspect_ratio

    source = tmp_path / "resize"
    folders["model"].save_pretrained(source)
    folders["tokenizer"].save_pretrained(source)
    processor = build_processor(folders["model"], folders["tokenizer"],
                                load_image_processor(tiny_assets["vision"], "resize"))
    processor.save_pretrained(source)
    exported = export_hf_llava(str(source), str(tmp_path / "v4"), layout="transformers4")
    assert read(exported, "preprocessor_config.json")["image_processor_type"] == "LlavaImageProcessorFast"
    assert saved_aspect_ratio(exported) == "resize" and saved_aspect_ratio(folders["v4"]) == "pad"
