"""Saved and exported folders preprocess images as training did: `AutoProcessor` pads non-square images to a square with
the mean colour (`--image_aspect_ratio pad`) or leaves them (`resize`), with pixels equal to the training pipeline's and
logits equal to the project's own inference; folders saved with a plain CLIPImageProcessor keep their training
preprocessing in the project and export with the right processor."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration

from tga.data.dataset import SampleBuilder
from tga.data.records import Record
from tga.data.templates import Message
from tga.export import export_hf_llava
from tga.inference import load_chat_model
from tga.model.vision import load_image_processor
from tga.train.run import run_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(45, 17), (17, 45), (33, 31), (101, 7), (7, 50)]  # wide, tall, odd, very wide, very tall


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Noise images of non-square sizes saved as PNG (the training pipeline reads files)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for width, height in SIZES:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{width}x{height}.png")
    return str(folder)


@pytest.fixture(scope="module")
def stage_folder(tiny_assets, tmp_path_factory):
    """A stage-2 folder saved by training (one step, one process, `--image_aspect_ratio pad`)."""
    root = tmp_path_factory.mktemp("stage")
    with open(os.path.join(REPO, "configs/finetune/tiny_cpu.yaml"), encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    for key in ("deepspeed", "pretrain_mm_mlp_adapter"):
        recipe.pop(key, None)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = root / "stage2"
    run_stage("finetune", [
        str(root / "recipe.yaml"), "--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
        "--data_path", tiny_assets["stage2"], "--image_folder", tiny_assets["image_folder"], "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "2", "--image_aspect_ratio", "pad",
    ])
    return str(out)


def training_pixels(vision, image_folder, name, aspect_ratio):
    """The pixels tga.data builds for a record's image, with the vision tower's processor, as a training run does."""
    builder = SampleBuilder(tokenizer=None, template=None, image_folder=image_folder,  # only images are built
                            image_processor=load_image_processor(vision, aspect_ratio), image_token_id=0,
                            num_image_tokens=16, image_aspect_ratio=aspect_ratio)
    record = Record(id=name, image=name, messages=(Message("user", "<image>\nq"), Message("assistant", "a")))
    return builder.load_image(record)


def auto_pixels(folder, images, name):
    with Image.open(os.path.join(images, name)) as image:
        return AutoProcessor.from_pretrained(folder).image_processor(images=image.convert("RGB"),
                                                                     return_tensors="pt")["pixel_values"][0]


def make_old_folder(stage_folder, out, aspect_ratio):
    """The stage folder as written before the aspect ratio was saved: a plain CLIPImageProcessor, the run's config
    (`aspect_ratio`, or none) beside it."""
    shutil.copytree(stage_folder, out)
    for name in ("processor_config.json", "preprocessor_config.json", "tga_config.json"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    if aspect_ratio is not None:
        with open(os.path.join(out, "tga_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"DataArguments": {"image_aspect_ratio": aspect_ratio}}, handle)
    return str(out)


@pytest.mark.parametrize("writer", ["training", "export"])
def test_folders_the_project_writes_pad_images_exactly_like_training(writer, stage_folder, images, tiny_assets,
                                                                      tmp_path):
    folder = stage_folder if writer == "training" else export_hf_llava(stage_folder, str(tmp_path / "hf"))
    for width, height in SIZES:
        name = f"{width}x{height}.png"
        expected = training_pixels(tiny_assets["vision"], images, name, "pad")
        assert torch.equal(auto_pixels(folder, images, name), expected), name
        # the old processor's centre crop differs: the comparison can fail
        with Image.open(os.path.join(images, name)) as image:
            cropped = load_image_processor(tiny_assets["vision"], "resize")(images=image.convert("RGB"),
                                                                            return_tensors="pt")["pixel_values"][0]
        assert (cropped - expected).abs().max() > 0.5


@pytest.mark.parametrize("aspect_ratio", ["pad", "resize", None])
def test_old_clip_processor_folders_keep_training_preprocessing_and_export_the_right_processor(
        aspect_ratio, stage_folder, images, tiny_assets, tmp_path):
    old = make_old_folder(stage_folder, tmp_path / "old", aspect_ratio)
    trained_with = aspect_ratio or "pad"  # a run without a saved config used the default
    chat = load_chat_model(old)
    exported = export_hf_llava(old, str(tmp_path / "hf"))
    for width, height in SIZES:
        name = f"{width}x{height}.png"
        expected = training_pixels(tiny_assets["vision"], images, name, trained_with)
        with Image.open(os.path.join(images, name)) as image:
            assert torch.equal(chat.builder.process_image(image.convert("RGB")), expected), name
        assert torch.equal(auto_pixels(exported, images, name), expected), name


def test_plain_transformers_logits_and_answers_equal_the_projects_inference(stage_folder, images, tmp_path):
    exported = export_hf_llava(stage_folder, str(tmp_path / "hf"))
    processor = AutoProcessor.from_pretrained(exported)
    model = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    chat = load_chat_model(stage_folder)
    question = "What colour is the shape?"
    for width, height in SIZES:
        with Image.open(os.path.join(images, f"{width}x{height}.png")) as file:
            image = file.convert("RGB")
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        encoded, pixels = chat.encode([image], [question])
        ids, attention, _ = chat.padded(encoded, left=True)
        assert torch.equal(inputs["input_ids"], ids) and torch.equal(inputs["pixel_values"], pixels)
        with torch.no_grad():
            plain = model(**inputs).logits
            ours = chat.model(input_ids=ids, attention_mask=attention, pixel_values=pixels).logits
            generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert torch.allclose(plain, ours, atol=1e-5)
        answer = processor.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert answer == chat.generate([image], [question], max_new_tokens=6)[0]
