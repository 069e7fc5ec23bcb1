"""Fuzz test of the data pipeline: randomly corrupted records and image files give either a correct sample or a
`DataError` that names the record (or the file), never another exception."""

import codecs
import io
import json
import os
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from tga.data.dataset import SampleBuilder
from tga.data.records import load_records
from tga.data.templates import get_template
from tga.errors import DataError
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor

NUM_CASES = 240
MAX_LENGTH = 160
IMAGE_TOKENS = 16  # 32 px tower, patch 8


def png_bytes(mode="RGB", size=(24, 16), fmt="PNG", colour=None):
    image = Image.new(mode, size, colour if colour is not None else (0 if mode in ("L", "P", "1", "I", "F") else
                                                                       tuple([90] * len(mode))))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def gif_animation():
    frames = [Image.new("P", (12, 12), index) for index in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


# Image corruptions: name -> (bytes or None for "no file", expected outcome).
IMAGES = {
    "good_png": (lambda: png_bytes(), "ok"),
    "good_jpeg": (lambda: png_bytes(fmt="JPEG"), "ok"),
    "truncated_png": (lambda: png_bytes(size=(64, 64))[:60], "error"),
    "truncated_jpeg": (lambda: png_bytes(size=(64, 64), fmt="JPEG")[:200], "error"),
    "zero_byte": (lambda: b"", "error"),
    "random_bytes": (lambda: bytes(random.Random(1).getrandbits(8) for _ in range(300)), "error"),
    "text_as_png": (lambda: b"this is not an image\n", "error"),
    "cmyk_jpeg": (lambda: png_bytes(mode="CMYK", fmt="JPEG"), "ok"),
    "la_png": (lambda: png_bytes(mode="LA"), "ok"),
    "p_png": (lambda: png_bytes(mode="P"), "ok"),
    "rgba_png": (lambda: png_bytes(mode="RGBA"), "ok"),
    "i16_png": (lambda: png_bytes(mode="I;16", colour=300), "ok"),
    "one_bit_png": (lambda: png_bytes(mode="1"), "ok"),
    "float_tiff": (lambda: png_bytes(mode="F", fmt="TIFF"), "ok"),
    "animated_gif": (gif_animation, "ok"),
    "one_pixel": (lambda: png_bytes(size=(1, 1)), "ok"),
    "wide_10000x10": (lambda: png_bytes(size=(10000, 10)), "ok"),
    "tall_10x10000": (lambda: png_bytes(size=(10, 10000)), "ok"),
    "missing_file": (None, "error"),
}
# Paths that must be rejected (outside the folder, or not a file).
BAD_PATHS = {"dotdot": "../outside.png", "absolute": "/etc/passwd", "folder": "subdir", "empty": "", "int": 7,
             "two_images": ["a.png", "b.png"], "null_byte": "a\x00.png"}


def mutate_text(rng, record):
    """Apply one text/schema corruption; returns (name, expected outcome)."""
    turns = record["conversations"]
    choice = rng.randrange(22)
    if choice == 0:
        turns[0]["value"] = "<image>\nWhat <im<image>age> is this?"  # nested placeholder: two placeholders
        return "nested_image", "error"
    if choice == 1:
        turns[1]["value"] += " <image>"
        return "image_in_answer", "error"
    if choice == 2:
        turns[0]["value"] = turns[0]["value"].replace("<image>", "")
        return "no_placeholder", "error"
    if choice == 3:
        turns[1]["value"] = 42
        return "int_value", "error"
    if choice == 4:
        turns[0]["from"] = "gpt"
        return "wrong_role", "error"
    if choice == 5:
        del turns[1]["from"]
        return "missing_from", "error"
    if choice == 6:
        record["conversations"] = "not a list"
        return "conversations_str", "error"
    if choice == 7:
        record["image_caption"] = 3.5
        return "caption_float", "error"
    if choice == 8:
        record["retrieved_caption"] = ["a", "list"]
        return "retrieved_list", "error"
    if choice == 9:
        record["toxic"] = "yes"
        return "toxic_str", "error"
    if choice == 10:
        turns[1]["value"] = "\ud800 lone surrogate \udfff"
        return "lone_surrogate", "either"
    if choice == 11:
        turns[1]["value"] = "émoji 🐱 and NUL \x00 and RTL \u202e"
        return "odd_unicode", "ok"
    if choice == 12:
        turns[0]["value"] = "<image>\n" + "word " * 400
        return "overlong_question", "either"  # truncated in text, or no answer left
    if choice == 13:
        turns[1]["value"] = "answer " * 400
        return "overlong_answer", "ok"  # truncated in text
    if choice == 14:
        turns[0]["value"] = "[INST] </s> <s> <<SYS>> " + turns[0]["value"]
        return "template_tokens", "ok"
    if choice == 15:
        record["conversations"] = []
        return "no_turns", "error"
    if choice == 16:
        record["id"] = 12345
        return "int_id", "ok"
    if choice == 17:
        del record["id"]
        return "no_id", "ok"
    if choice == 18:
        turns.append({"from": "human", "value": "dangling question"})
        return "dangling_human", "either"
    if choice == 19:
        record["conversations"] = [{"from": "system", "value": "be brief"}, *turns]
        return "system_turn", "ok"
    if choice == 20:
        turns[1]["value"] = ""
        return "empty_answer", "either"
    record["image_caption"] = record["retrieved_caption"] = "a red circle"
    return "leak", "ok"


def make_case(rng, index, folder):
    """One fuzzed record file; returns (path, label that errors must contain, names, expected outcome)."""
    record = {"id": f"fz-{index}", "image": f"img-{index}.png", "image_caption": "a red circle on white",
              "retrieved_caption": "a circle", "toxic": rng.random() < 0.2,
              "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                                {"from": "gpt", "value": "A red circle."}]}
    names, expectations = [], []
    kind = rng.random()
    if kind < 0.55:
        name = rng.choice(sorted(IMAGES))
        make, expected = IMAGES[name]
        if make is not None:
            with open(os.path.join(folder, record["image"]), "wb") as handle:
                handle.write(make())
        names.append(name)
        expectations.append(expected)
    elif kind < 0.65:
        name = rng.choice(sorted(BAD_PATHS))
        record["image"] = BAD_PATHS[name]
        names.append(f"path_{name}")
        expectations.append("error")
    else:
        with open(os.path.join(folder, record["image"]), "wb") as handle:
            handle.write(png_bytes())
        if rng.random() < 0.15:
            del record["image"]
            record["conversations"][0]["value"] = "What is a circle?"
            names.append("text_only")
            expectations.append("ok")
    if not names or rng.random() < 0.5:
        name, expected = mutate_text(rng, record)
        names.append(name)
        expectations.append(expected)
    path = os.path.join(folder, f"case-{index}.json")
    label = str(record.get("id", "#0"))
    if rng.random() < 0.06:  # the file itself is not UTF-8
        with open(path, "wb") as handle:
            handle.write(json.dumps([record]).encode("utf-8").replace(b"circle", b"circ\xff\xfele"))
        names.append("non_utf8_file")
        expectations.append("error")
        label = path
    else:
        # Every seventh file starts with a UTF-8 byte-order mark (Windows tools write one): read like any other.
        encoding = "utf-8-sig" if index % 7 == 3 else "utf-8"
        with open(path, "w", encoding=encoding, errors="surrogatepass") as handle:
            json.dump([record], handle, ensure_ascii=rng.random() < 0.5)
        if encoding == "utf-8-sig":
            names.append("bom_file")
    expected = "error" if "error" in expectations else "ok" if all(e == "ok" for e in expectations) else "either"
    return path, label, names, expected


@pytest.fixture(scope="module")
def builder(tiny_assets):
    tokenizer = load_tokenizer(tiny_assets["llm"])
    return SampleBuilder(
        tokenizer=tokenizer, template=get_template("llava_llama_2"), image_processor=load_image_processor(
            tiny_assets["vision"]), image_folder=None, image_token_id=image_token_id(tokenizer),
        num_image_tokens=IMAGE_TOKENS, max_length=MAX_LENGTH, use_retrieved=True, caption_target=True,
    )


def assert_sample(sample, builder, record):
    ids = sample["input_ids"]
    assert ids.dtype == torch.long and ids.ndim == 1 and 0 < ids.numel() <= MAX_LENGTH
    assert int((ids == builder.image_token_id).sum()) == (IMAGE_TOKENS if record.image else 0)
    assert bool((sample["labels"] != -100).any())
    if record.image:
        assert sample["pixel_values"].shape == (3, 32, 32) and bool(torch.isfinite(sample["pixel_values"]).all())
    if sample["guide"]:
        assert bool(sample["caption_mask"].any())


def test_fuzzed_records_give_a_sample_or_a_named_error(builder, tmp_path):
    rng = random.Random(2025)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "subdir").mkdir()
    (tmp_path / "outside.png").write_bytes(png_bytes())
    builder.image_folder = str(folder)
    outcomes, by_name = Counter(), Counter()
    for index in range(NUM_CASES):
        path, label, names, expected = make_case(rng, index, str(folder))
        try:
            records = load_records(path)
            sample = builder.build(records[0])
            assert_sample(sample, builder, records[0])
            outcome = "sample"
        except DataError as error:
            # A record-level error names the record; a file-level one (e.g. not UTF-8) names the file.
            assert label in str(error) or path in str(error), (names, str(error))
            outcome = "error"
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {index} {names}: {type(error).__name__}: {error}")
        assert expected == "either" or (expected == "ok") == (outcome == "sample"), (index, names, outcome)
        outcomes[outcome] += 1
        by_name.update(f"{name}:{outcome}" for name in names)
    print(dict(outcomes), dict(sorted(by_name.items())))
    assert sum(outcomes.values()) == NUM_CASES >= 200
    assert outcomes["sample"] >= 40 and outcomes["error"] >= 40
    assert by_name["bom_file:sample"] >= 5  # a BOM never turns a good record into an error


def write_with_bom(path, records, jsonl):
    text = "".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records)
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    return str(path)


@pytest.mark.parametrize("jsonl", [False, True])
def test_files_with_a_byte_order_mark_are_read_by_every_reader(tiny_assets, tmp_path, jsonl):
    """The in-memory reader, the Arrow conversion, the unlearning pairs reader and the retrieval corpus reader."""
    from tga.data.arrow_records import open_records
    from tga.retrieval.corpus import load_corpus
    from tga.unlearn.data import load_pairs

    records = load_records(tiny_assets["stage2"])[:6]
    path = write_with_bom(tmp_path / f"records.json{'l' if jsonl else ''}", read_json(tiny_assets["stage2"])[:6], jsonl)
    assert load_records(path) == records
    assert list(open_records(path, cache_dir=str(tmp_path / "cache"))) == records
    pairs = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(3)]
    pairs_path = write_with_bom(tmp_path / f"pairs.json{'l' if jsonl else ''}", pairs, jsonl)
    assert [(p.prompt, p.response) for p in load_pairs(pairs_path, what="--normal")] == [
        (f"question {i}", f"answer {i}") for i in range(3)]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_bytes(codecs.BOM_UTF8 + b"prompt,response\nquestion 0,answer 0\n")
    assert [(p.prompt, p.response) for p in load_pairs(str(csv_path), what="--normal")] == [("question 0", "answer 0")]
    corpus = write_with_bom(tmp_path / f"corpus.json{'l' if jsonl else ''}", [{"text": "a red circle"}], jsonl)
    assert load_corpus(corpus)[0] == ["a red circle"]


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def model_path_cases(rng, folder):
    """(value, expected): local-looking paths that do not exist, ids that are not hub ids, uncached hub ids (the tests
    run offline), and real folders."""
    names = {"llm": True, "Mistral-7B": True, "model.safetensors": True, "clip vit": False, "a/b/c": False,
             "-leading-dash": False}  # name -> whether `name` and `org/name` are valid hub ids
    for _ in range(40):
        name = rng.choice(sorted(names))
        prefix = rng.choice(["/nonexistent/", "./", "../", "~/", str(folder) + "/missing/", "", "org/"])
        local = prefix not in ("", "org/") or not names[name]
        yield prefix + name, "no such file or folder" if local else "not a local folder, and not in the hub cache"
    yield str(folder), None
    yield "", None


@pytest.mark.parametrize("flag", ["model_name_or_path", "vision_tower", "tokenizer", "model"])
def test_model_paths_that_do_not_exist_are_named_with_the_flag(flag, tmp_path):
    from tga.errors import ConfigError
    from tga.model.sources import check_model_source

    checked = Counter()
    for value, expected in model_path_cases(random.Random(flag), tmp_path):
        if expected is None:
            check_model_source(flag, value)
            checked["ok"] += 1
            continue
        with pytest.raises(ConfigError) as error:
            check_model_source(flag, value)
        assert str(error.value).startswith(f"--{flag} {value}: {expected}"), (value, str(error.value))
        checked[expected] += 1
    assert checked["no such file or folder"] >= 10 and checked["not a local folder, and not in the hub cache"] >= 3
