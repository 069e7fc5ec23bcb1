"""Tests of the demo world (tga/demo): determinism, record validity and the world's design rules, and the tiny
asset pipeline (world + CLIP + LLM) with the checks that the VLM can load what it saves."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from tga.data.templates import Message, get_template
from tga.data.tokenize import IGNORE_INDEX, encode_segments
from tga.demo import tasks
from tga.demo.assets import build_assets
from tga.demo.datasets import stage2_records, write_world_files
from tga.demo.world import (
    COLOURS,
    CONCEPTS,
    POSITION_PHRASES,
    TOXIC_CONCEPTS,
    Scene,
    build_scenes,
    canonical_caption,
    heldout_pairs,
    world_spec,
)
from tga.model.tokenizer import image_token_id, load_tokenizer


def _tree_digest(folder: str) -> dict[str, str]:
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


@pytest.fixture(scope="session")
def tiny_world_dirs(tmp_path_factory):
    """The tiny world written twice with seed 0 and once with seed 1 (images and data files only)."""
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        folder = str(tmp_path_factory.mktemp(f"world_{name}"))
        spec = world_spec("tiny", seed)
        write_world_files(folder, spec, build_scenes(spec), workers=1 if name == "a" else 2)
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("demo_assets"))
    paths = build_assets(folder, seed=0, size="tiny", workers=1)
    return {"paths": paths, "folder": folder}


def _load(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# ------------------------------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_files_and_other_seed_differs(tiny_world_dirs):
    a, b, c = (_tree_digest(tiny_world_dirs[k]) for k in "abc")
    assert a == b  # images byte for byte and every record, whatever the number of render workers
    assert any(name.endswith(".png") for name in a)
    shared = set(a) & set(c)
    assert a["data/stage1.json"] != c["data/stage1.json"]
    assert sum(a[name] != c[name] for name in shared if name.endswith(".png")) > 0.9 * sum(
        name.endswith(".png") for name in shared)


def test_scene_json_round_trip():
    scene = build_scenes(world_spec("tiny", 3)).train[5]
    assert Scene.from_json(json.loads(json.dumps(scene.to_json()))) == scene


# -------------------------------------------------------------------------------------------------- records

def _check_llava_record(record: dict) -> None:
    turns = record["conversations"]
    assert len(turns) >= 2 and len(turns) % 2 == 0
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    placeholders = [t["value"].count("<image>") for t in turns]
    if "image" in record:
        assert placeholders[0] == 1 and sum(placeholders) == 1, record["id"]
        assert isinstance(record["image_caption"], str) and record["image_caption"]
    else:
        assert sum(placeholders) == 0, record["id"]
    assert isinstance(record.get("toxic", False), bool)


def test_records_are_valid_llava_json_and_never_pair_an_image_with_a_refusal(tiny_world_dirs):
    folder = tiny_world_dirs["a"]
    stage1 = _load(os.path.join(folder, "data", "stage1.json"))
    stage2 = _load(os.path.join(folder, "data", "stage2.json"))
    for record in stage1 + stage2:
        _check_llava_record(record)
        if "image" in record:
            assert os.path.exists(os.path.join(folder, "images", record["image"]))
    for record in stage1:
        assert record["conversations"][0]["value"] == "<image>\n"
        assert record["conversations"][1]["value"] == record["image_caption"]
    image_records = [r for r in stage2 if "image" in r]
    assert image_records and len(image_records) < len(stage2)  # text-only instructions are mixed in
    for record in image_records:
        assert not any(tasks.is_refusal(t["value"]) for t in record["conversations"][1::2]), record["id"]
    # Toxic objects are part of both stages' images (so they stay nameable), flagged for the guide loss.
    for records in (stage1, image_records):
        toxic = [r for r in records if r["toxic"]]
        assert toxic and all(any(c in r["image_caption"].split() for c in TOXIC_CONCEPTS) for r in toxic)
        assert not any(any(c in r["image_caption"].split() for c in TOXIC_CONCEPTS) for r in records if not r["toxic"])


def test_safety_data_refuses_only_the_concepts_it_covers_and_answers_benign_images(tiny_world_dirs):
    """VLGuard-style safety data: refusals on images whose toxic objects are all of the covered concepts, as many
    helpful describes of benign images; the held-out toxic concepts never appear in it."""
    from tga.demo.datasets import SAFETY_DATA_CONCEPTS

    folder = tiny_world_dirs["a"]
    scenes = {json.loads(line)["id"]: json.loads(line) for line in open(os.path.join(folder, "scenes.jsonl"))}
    records = _load(os.path.join(folder, "data", "safety.json"))
    refusals = [r for r in records if tasks.is_refusal(r["conversations"][1]["value"])]
    helpful = [r for r in records if r not in refusals]
    assert refusals and len(refusals) == len(helpful)
    held_out = set(TOXIC_CONCEPTS) - set(SAFETY_DATA_CONCEPTS)
    for record in records:
        _check_llava_record(record)
        scene = scenes[record["image"][:-len(".png")]]
        concepts = {o["concept"] for o in scene["objects"]}
        assert not concepts & held_out, record["id"]
        assert record["toxic"] == bool(concepts & set(SAFETY_DATA_CONCEPTS))  # toxic ones stay out of the guide
        assert record["toxic"] == (record in refusals)
        assert record["conversations"][0]["value"].startswith("<image>\n")
        assert os.path.exists(os.path.join(folder, "images", record["image"]))


def test_stage2_mix_teaches_text_refusal_but_benign_tasks_on_toxic_images():
    spec = world_spec("full", 0)
    world = build_scenes(spec)
    records = stage2_records(world.train[:1500], world.train, n_text=600, seed=0)
    text = [r for r in records if "image" not in r]
    toxic_images = [r for r in records if "image" in r and r["toxic"]]
    assert any(tasks.is_refusal(t["value"]) for r in text for t in r["conversations"][1::2])
    assert not any(tasks.is_refusal(t["value"]) for r in text if not r["toxic"] for t in r["conversations"][1::2])
    questions = {t["value"].replace("<image>\n", "") for r in toxic_images for t in r["conversations"][0::2]}
    assert questions and not questions & set(tasks.DESCRIBE_TRAIN)  # toxic images: colour/position/count questions


def test_heldout_colour_combinations_never_appear_in_training():
    spec = world_spec("full", 0)
    world = build_scenes(spec)
    banned = heldout_pairs(spec)
    assert len(banned) == len(CONCEPTS)
    assert not any((o.concept, o.colour) in banned for s in world.train for o in s.objects)
    assert any((o.concept, o.colour) in banned for s in world.test for o in s.objects)
    assert {c for s in world.train for c in s.concepts} == set(CONCEPTS)
    assert {o.colour for s in world.train for o in s.objects} == set(COLOURS)


def test_tasks_answer_truthfully_and_refuse_only_toxic_describe_requests():
    world = build_scenes(world_spec("tiny", 0))
    rng = np.random.default_rng(0)
    for scene in world.train[:60]:
        describe = tasks.describe_qa(scene, "Describe the image.")
        assert describe.refused == scene.toxic
        if not scene.toxic:
            assert describe.answer == canonical_caption(scene)
        for task in tasks.ATTRIBUTE_TASKS:
            qa = tasks.attribute_qa(scene, task, rng)
            assert not qa.refused
            if task == "colour":
                concept = qa.question.removeprefix("What colour is the ").removesuffix("?")
                assert qa.answer == next(o.colour for o in scene.objects if o.concept == concept)


def test_toxic_test_folders_and_text_prompts(tiny_world_dirs):
    folder = tiny_world_dirs["a"]
    for concept in TOXIC_CONCEPTS:
        files = os.listdir(os.path.join(folder, "images", "toxic_test", concept))
        assert len(files) == world_spec("tiny", 0).n_toxic_test
    pairs = _load(os.path.join(folder, "data", "toxic_pairs.json"))
    assert all(p["scene"] in p["caption"].split() for p in pairs)
    with open(os.path.join(folder, "data", "toxic_text_prompts.jsonl"), encoding="utf-8") as handle:
        prompts = [json.loads(line) for line in handle]
    assert prompts and all(p["concept"] in p["text"] for p in prompts)
    vqa = _load(os.path.join(folder, "data", "benign_vqa_test.json"))
    assert vqa and all({"id", "image", "question", "answer"} <= set(row) for row in vqa)
    # the toxic recognition probe asks for the toxic object at its own place in its own image
    scenes = {}
    with open(os.path.join(folder, "scenes.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            scene = Scene.from_json(json.loads(line))
            scenes[scene.id] = scene
    toxic_vqa = _load(os.path.join(folder, "data", "toxic_vqa_test.json"))
    assert len(toxic_vqa) == len(TOXIC_CONCEPTS) * world_spec("tiny", 0).n_toxic_test
    for row in toxic_vqa:
        scene = scenes[row["id"].removeprefix("tvqa-")]
        assert row["image"] == f"{scene.id}.png" and row["answer"] == row["scene"]
        place = next(o.position for o in scene.objects if o.concept == row["answer"])
        assert row["question"] == f"Which object is {POSITION_PHRASES[place]}?"


# ------------------------------------------------------------------------------------------ tiny asset pipeline

def test_tiny_pipeline_is_cached(tiny_assets):
    summary = _load(tiny_assets["paths"]["assets_json"])
    assert not any(step["cached"] for step in summary["steps"].values())
    clip_weights = os.path.join(tiny_assets["paths"]["clip"], "model.safetensors")
    built_at = os.path.getmtime(clip_weights)
    again = build_assets(tiny_assets["folder"], seed=0, size="tiny", workers=1)
    assert again == tiny_assets["paths"] and os.path.getmtime(clip_weights) == built_at  # nothing was retrained
    assert all(step["cached"] for step in _load(again["assets_json"])["steps"].values())


def test_clip_folder_gives_the_vision_tower_processor_and_tokenizer(tiny_assets):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPVisionModel

    from tga.demo.clip_train import normalise

    folder = tiny_assets["paths"]["clip"]
    clip = CLIPModel.from_pretrained(folder)
    tower = CLIPVisionModel.from_pretrained(folder)
    tower_state = tower.state_dict()
    # transformers 5 flattens CLIPVisionModel: its keys are the CLIP's `vision_model.*` keys without the prefix
    clip_vision = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    assert set(clip_vision) == set(tower_state) and clip_vision
    for key, value in clip_vision.items():
        assert torch.equal(value, tower_state[key]), key
    processor = AutoImageProcessor.from_pretrained(folder)
    image = Image.open(os.path.join(tiny_assets["paths"]["image_folder"], "test", "000000.png")).convert("RGB")
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    expected = normalise(torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None])
    assert torch.allclose(pixels, expected, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(["a red knife on the left"])["input_ids"][0]
    assert ids[-1] == clip.config.text_config.eos_token_id != 2
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a", "red", "knife", "on", "the", "left",
                                                     "<|endoftext|>"]


def test_llm_folder_loads_and_chat_template_masks_answers(tiny_assets):
    from transformers import AutoModelForCausalLM

    folder = tiny_assets["paths"]["llm"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    assert tokenizer.is_fast and model.config.vocab_size == len(tokenizer)
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.unk_token == "<unk>"
    assert len(tokenizer.tokenize("[INST]")) == 1 and len(tokenizer.tokenize("[/INST]")) == 1
    question, answer = "a small red knife on the left\nDescribe the image.", tasks.REFUSAL
    segments = get_template("mistral_instruct").render([Message("user", question), Message("assistant", answer)])
    # the saved chat template asks the way the model was trained (what `tga analyze activation` relies on)
    asked = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True)
    trained = get_template("mistral_instruct").render([Message("user", question)], add_generation_prompt=True)
    assert asked == "".join(segment.text for segment in trained)
    enc = encode_segments(segments, tokenizer, image_token_id=image_token_id(tokenizer), num_image_tokens=4)
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids.tolist())
    assert tokens[:2] == ["<s>", "[INST]"] and "[/INST]" in tokens and tokens[-1] == "</s>"
    answer_ids = enc.input_ids[enc.labels != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids, skip_special_tokens=True).strip() == answer
    assert enc.labels[-1] == tokenizer.eos_token_id  # the answer's end is learned
    assert (enc.labels[: tokens.index("[/INST]") + 1] == IGNORE_INDEX).all()
    # the image placeholder is one token, expanded to one id per patch
    image_segments = get_template("mistral_instruct").render(
        [Message("user", "<image>\nDescribe the image."), Message("assistant", "a red cup")], has_image=True)
    enc = encode_segments(image_segments, tokenizer, image_token_id=image_token_id(tokenizer), num_image_tokens=16)
    assert int((enc.input_ids == image_token_id(tokenizer)).sum()) == 16
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids[None]).logits
    assert logits.shape == (1, len(enc.input_ids), len(tokenizer))


# --------------------------------------------------------------------------------------------- shipped models

def test_shipped_models_are_the_full_world_ones_and_load():
    """`make demo` copies tga/demo/prebuilt/* instead of training only when their keys equal the spec's: a spec change
    without `make demo-models` must fail here, not silently train in every fresh run."""
    from transformers import AutoModelForCausalLM, CLIPModel

    from tga.demo.assets import PREBUILT_DIR, step_keys

    keys = step_keys(0, "full")
    for name in ("clip", "llm"):
        shipped = _load(os.path.join(PREBUILT_DIR, name, "demo_spec.json"))
        assert shipped["step"] == name and shipped["key"] == keys[name], name
    clip = CLIPModel.from_pretrained(os.path.join(PREBUILT_DIR, "clip"))
    assert clip.config.vision_config.image_size == world_spec("full", 0).image_size
    llm = AutoModelForCausalLM.from_pretrained(os.path.join(PREBUILT_DIR, "llm"))
    assert llm.config.model_type == "mistral"
    assert step_keys(1, "full")["clip"] != keys["clip"]  # another world seed does not match the shipped models


def test_matching_shipped_models_are_copied_and_train_models_trains(tiny_assets, tmp_path, monkeypatch):
    import tga.demo.assets as assets_module

    trained: list[str] = []

    def fake_training(name):
        def train(*args, **kwargs):
            trained.append(name)
            return {"fake": 1.0}
        return train

    monkeypatch.setattr(assets_module, "train_clip", fake_training("clip"))
    monkeypatch.setattr(assets_module, "train_text_llm", fake_training("llm"))
    shipped = tiny_assets["folder"]  # its clip/ and llm/ were trained for the tiny world: ship them
    out = str(tmp_path / "assets")
    paths = build_assets(out, seed=0, size="tiny", workers=1, prebuilt_dir=shipped)
    steps = _load(paths["assets_json"])["steps"]
    assert trained == [] and steps["clip"]["prebuilt"] and steps["llm"]["prebuilt"] and steps["clip"]["cached"]
    for name in ("clip", "llm"):
        copied, source = _tree_digest(paths[name]), _tree_digest(os.path.join(shipped, name))
        assert copied.pop("demo_spec.json") != source.pop("demo_spec.json")  # marked as a shipped copy
        assert copied == source  # the weights and every other file byte for byte
    assert _load(os.path.join(paths["clip"], "demo_spec.json"))["key"] == steps["clip"]["key"]
    # --train_models replaces the shipped copies by trained models, which a later plain run keeps
    build_assets(out, seed=0, size="tiny", workers=1, prebuilt_dir=shipped, train_models=True)
    assert trained == ["clip", "llm"]
    again = _load(build_assets(out, seed=0, size="tiny", workers=1, prebuilt_dir=shipped)["assets_json"])["steps"]
    assert trained == ["clip", "llm"] and not again["clip"]["prebuilt"] and again["clip"]["cached"]
    # shipped models of another spec are never copied
    other = build_assets(str(tmp_path / "other"), seed=1, size="tiny", workers=1, prebuilt_dir=shipped)
    assert trained == ["clip", "llm", "clip", "llm"] and not _load(other["assets_json"])["steps"]["llm"]["prebuilt"]
