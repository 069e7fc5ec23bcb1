"""Records, dataset, collator and sampler: validation errors name the record and file; batches carry exact spans."""

import json
import os

import pytest
import torch
from PIL import Image

from tga.data.collator import VLMCollator
from tga.data.dataset import LazySupervisedDataset, SampleBuilder, leak_guarded
from tga.data.records import load_records, parse_record
from tga.data.sampler import ModalityLengthGroupedSampler
from tga.data.templates import get_template
from tga.data.tokenize import IGNORE_INDEX
from tga.errors import DataError
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor


def write(path, records):
    with open(path, "w") as handle:
        json.dump(records, handle)
    return str(path)


def record(record_id, image="a.png", question="<image>\nWhat is it?", **extra):
    return {"id": record_id, "image": image, **extra,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "A cup."}]}


@pytest.fixture
def builder(tiny_assets, tmp_path):
    tokenizer = load_tokenizer(tiny_assets["llm"])
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return SampleBuilder(tokenizer=tokenizer, template=get_template("llava_llama_2"),
                         image_processor=load_image_processor(tiny_assets["vision"]), image_folder=str(tmp_path),
                         image_token_id=image_token_id(tokenizer), num_image_tokens=16, max_length=512,
                         use_retrieved=True, caption_target=True)


@pytest.mark.parametrize("raw, message", [
    ({"id": "r1", "image": "a.png"}, "missing or empty `conversations`"),
    (record("r2", question="What is it?"), "'<image>' placeholder"),
    (record("r3", question="<image><image>\nWhat?"), "'<image>' placeholder"),
    (record("r4", image=None), "'<image>' placeholder"),
    ({"id": "r5", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "alternate"),
    (record("r6", toxic="yes"), "`toxic` must be true or false"),
    (record("r7", image_caption=3), "`image_caption` must be a string"),
])
def test_invalid_records_name_the_record_and_file(tmp_path, raw, message):
    path = write(tmp_path / "data.json", [record("ok"), raw])
    with pytest.raises(DataError) as error:
        load_records(path)
    assert message in str(error.value) and f"record {raw['id']!r}" in str(error.value) and path in str(error.value)


def test_jsonl_and_bad_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record("a")) + "\n{not json\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid JSON"):
        load_records(str(path))


def test_missing_corrupt_and_escaping_images_are_named(builder, tmp_path):
    cases = {"missing": ("nope.png", "image not found"), "corrupt": ("corrupt.png", "cannot read image"),
             "escape": ("../outside.png", "resolves outside the image folder")}
    for record_id, (image, message) in cases.items():
        parsed = parse_record(record(record_id, image=image), 0, "data.json")
        with pytest.raises(DataError) as error:
            builder.build(parsed)
        assert message in str(error.value) and record_id in str(error.value)
        if record_id != "escape":
            assert os.path.join(str(tmp_path), image) in str(error.value)


def test_sample_spans_and_guide_selection(builder):
    tokenizer = builder.tokenizer
    guided = parse_record(record("g", image_caption="a red cup", retrieved_caption="a mug"), 0, "d")
    toxic = parse_record(record("t", image_caption="a knife", toxic=True), 1, "d")
    text_only = parse_record({"id": "x", "conversations": [{"from": "human", "value": "Hi"},
                                                            {"from": "gpt", "value": "Hello."}]}, 2, "d")
    samples = [builder.build(r) for r in (guided, toxic, text_only)]
    assert [s["guide"] for s in samples] == [True, False, False]  # toxic and caption-less samples skip the guide loss
    assert samples[0]["pixel_values"].shape == (3, 32, 32) and samples[2]["pixel_values"] is None
    assert tokenizer.decode(samples[0]["input_ids"][samples[0]["retrieved_mask"]]) == "a mug"
    assert tokenizer.decode(samples[0]["caption_input_ids"][samples[0]["caption_mask"]]) == "a red cup"
    batch = VLMCollator(tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape[0] == 2  # images stacked in sample order; text-only rows have none
    assert batch["guide"].guide_index.tolist() == [0]
    assert torch.equal(batch["guide"].image_mask, batch["input_ids"] == builder.image_token_id)
    assert batch["guide"].image_mask.sum().item() == 2 * 16
    lengths = [s["input_ids"].numel() for s in samples]
    for row, length in enumerate(lengths):  # right padding: attention ends where the sample ends
        assert batch["attention_mask"][row].sum().item() == length
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()


def test_guide_toxic_puts_toxic_records_into_the_guide(builder):
    import dataclasses

    toxic = parse_record(record("t", image_caption="a knife", toxic=True), 1, "d")
    sample = dataclasses.replace(builder, guide_toxic=True).build(toxic)
    assert sample["guide"]
    assert builder.tokenizer.decode(sample["caption_input_ids"][sample["caption_mask"]]) == "a knife"


def test_caption_context_request_reads_the_caption_where_the_image_was(builder):
    """`--tga_caption_context request`: the caption pass is the image pass's prompt with the caption in the image's
    place (same system prompt, retrieved text and question); the target span is the caption alone either way."""
    import dataclasses

    raw = record("q", question="What colour is it?\n<image>", image_caption="a red cup", retrieved_caption="a blue cup")
    parsed = parse_record(raw, 0, "d")
    alone = builder.build(parsed)
    request = dataclasses.replace(builder, caption_context="request").build(parsed)
    decode = builder.tokenizer.decode
    for sample in (alone, request):
        assert decode(sample["caption_input_ids"][sample["caption_mask"]]) == "a red cup"
    assert "What colour is it?" not in decode(alone["caption_input_ids"])
    image_prompt = decode(request["input_ids"][request["labels"] == IGNORE_INDEX])
    caption_prompt = decode(request["caption_input_ids"])
    assert "What colour is it?" in caption_prompt and "a blue cup" in caption_prompt
    # the caption pass is the image prompt with the image tokens replaced by the caption tokens (as text: the tokenizer
    # may join the space before the image into the caption's first token)
    image_ids = request["input_ids"][request["labels"] == IGNORE_INDEX]
    before = int(request["image_mask"].nonzero()[0])
    start, end = int(request["caption_mask"].nonzero()[0]), int(request["caption_mask"].nonzero()[-1]) + 1
    assert decode(request["caption_input_ids"][:start]).strip() == decode(image_ids[:before]).strip()
    assert decode(request["caption_input_ids"][end:]).strip() == decode(image_ids[before + 16:]).strip()
    assert image_prompt.count("a red cup") == 0


def test_leak_guard_halves_a_retrieved_text_equal_to_the_caption():
    assert leak_guarded("A red knife on the left", "a red  knife on the left") == "A red knife"
    assert leak_guarded("a blue cup", "a red knife") == "a blue cup"


def test_modality_sampler_groups_and_is_deterministic():
    lengths = [10 + i for i in range(20)] + [-(5 + i) for i in range(12)]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(32)) and order == list(sampler)
    full = order[: (20 // 4) * 4 + (12 // 4) * 4]
    for start in range(0, len(full), 4):  # every full megabatch is single-modality
        signs = {lengths[i] > 0 for i in full[start : start + 4]}
        assert len(signs) == 1
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_dataset_modality_lengths(builder):
    records = [parse_record(record("i"), 0, "d"),
               parse_record({"id": "t", "conversations": [{"from": "human", "value": "a b"},
                                                          {"from": "gpt", "value": "c"}]}, 1, "d")]
    lengths = LazySupervisedDataset(records, builder).modality_lengths
    assert lengths[0] > 0 and lengths[1] == -3
