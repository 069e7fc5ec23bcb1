"""Captioning (`tga caption`) with tiny random image-to-text models built offline: a BLIP (no chat template; the
prompt is a caption prefix) and a LLaVA (chat template; only the answer is kept). Captions are gibberish; the
tests check the plumbing: which records get captions, resume after a kill, bad images, the command line."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from PIL import Image

from tga.caption import CaptionConfig, Captioner, caption_file
from tga.errors import ConfigError, DataError
from tga.records_io import PARTIAL_SUFFIX, load_records

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "picture", "of", "photo", "the", "small", "big"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> str:
    """A random tiny BLIP captioner with a BERT word-piece tokenizer and a 32px image processor."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny_blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    processor = BlipProcessor(
        BlipImageProcessor(size={"height": 32, "width": 32}), BertTokenizer(str(folder / "vocab.txt"))
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        sep_token_id=3,
        eos_token_id=3,
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(
        folder
    )
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    """A random tiny LLaVA (CLIP tower + Llama LM) whose processor has a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    folder = tmp_path_factory.mktemp("tiny_llava")
    vocab = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "describe"] + WORDS
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        image_token_id=4,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def make_records(root, count: int = 10) -> tuple[str, str]:
    """Coloured images, records (some captioned already, one text-only); returns (records path, image folder)."""
    images = root / "images"
    images.mkdir(exist_ok=True)
    records = []
    for number in range(count):
        Image.new("RGB", (24 + number, 32), ((37 * number) % 256, (91 * number) % 256, 120)).save(
            images / f"{number}.png"
        )
        record = {
            "id": f"c{number}",
            "image": f"{number}.png",
            "conversations": [{"from": "human", "value": "<image>"}],
        }
        if number % 4 == 1:
            record["image_caption"] = "kept caption"
        records.append(record)
    records.append({"id": "text", "conversations": [{"from": "human", "value": "hello"}]})
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path), str(images)


def test_records_lacking_a_caption_get_one_and_others_are_kept(tmp_path, blip_dir):
    data, images = make_records(tmp_path)
    out = str(tmp_path / "out.json")
    report = caption_file(
        CaptionConfig(model=blip_dir, data=data, image_folder=images, out=out, batch_size=3, max_new_tokens=6)
    )
    assert report.complete and report.processed == 7 and report.passed_through == 4
    records = load_records(out)
    for record in records[:-1]:
        assert isinstance(record["image_caption"], str)
        assert (record["image_caption"] == "kept caption") == (int(record["id"][1:]) % 4 == 1)
    assert records[-1] == {"id": "text", "conversations": [{"from": "human", "value": "hello"}]}
    overwritten = str(tmp_path / "all.json")
    report = caption_file(
        CaptionConfig(model=blip_dir, data=data, image_folder=images, out=overwritten, overwrite=True)
    )
    assert report.processed == 10
    assert all(r["image_caption"] != "kept caption" for r in load_records(overwritten)[:-1])


def test_blip_prompt_is_a_caption_prefix(blip_dir):
    captioner = Captioner.load(blip_dir, prompt="a picture of", max_new_tokens=4)
    captions = captioner.caption([Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (40, 20), (0, 0, 200))])
    assert len(captions) == 2 and all(c.startswith("a picture of") for c in captions)
    assert all(len(c.split()) <= 3 + 4 for c in captions)


def test_chat_model_keeps_only_the_answer(tmp_path, llava_dir):
    captioner = Captioner.load(llava_dir, prompt="describe the picture", max_new_tokens=5)
    assert captioner.chat and captioner.text.startswith("USER: <image> describe the picture")
    captions = captioner.caption([Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (48, 32), (0, 0, 200))])
    assert len(captions) == 2
    for caption in captions:
        # the echoed instruction would start the text (and push it past 5 words); a random LM may emit role words
        assert isinstance(caption, str) and not caption.startswith("USER: describe the picture")
        assert len(caption.split()) <= 5
    data, images = make_records(tmp_path, count=4)
    out = str(tmp_path / "out.jsonl")
    assert caption_file(CaptionConfig(model=llava_dir, data=data, image_folder=images, out=out), captioner).complete
    assert all(isinstance(r["image_caption"], str) for r in load_records(out)[:-1])


class KilledCaptioner:
    """Delegates to a captioner and raises on the n-th batch, like a kill in the middle of a run."""

    def __init__(self, inner: Captioner, fail_on_call: int) -> None:
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, 0

    def caption(self, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated kill")
        return self.inner.caption(images)


def test_resume_after_kill_gives_the_same_file(tmp_path, blip_dir):
    data, images = make_records(tmp_path, count=12)
    options = dict(model=blip_dir, data=data, image_folder=images, batch_size=2, max_new_tokens=5)
    reference = str(tmp_path / "reference.jsonl")
    caption_file(CaptionConfig(out=reference, **options))
    out = str(tmp_path / "out.jsonl")
    report = caption_file(CaptionConfig(out=out, max_batches=2, **options))
    assert not report.complete and report.processed == 4 and not os.path.exists(out)
    killed = KilledCaptioner(Captioner.load(blip_dir, max_new_tokens=5), fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        caption_file(CaptionConfig(out=out, **options), killed)
    report = caption_file(CaptionConfig(out=out, **options))
    assert report.complete and report.resumed == 6 and report.processed == 3
    assert open(out, "rb").read() == open(reference, "rb").read()
    assert not os.path.exists(out + PARTIAL_SUFFIX)


def test_bad_images_are_named_or_skipped(tmp_path, blip_dir):
    data, images = make_records(tmp_path, count=3)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image at all")
    with open(data, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "broken-one", "image": "broken.png", "conversations": []}) + "\n")
        handle.write(json.dumps({"id": "sneaky", "image": "../../etc/passwd", "conversations": []}) + "\n")
    config = dict(model=blip_dir, data=data, image_folder=images, batch_size=8)
    with pytest.raises(DataError, match=r"record id 'broken-one'.*broken\.png"):
        caption_file(CaptionConfig(out=str(tmp_path / "a.json"), **config))
    report = caption_file(CaptionConfig(out=str(tmp_path / "b.json"), skip_bad_records=True, **config))
    assert report.complete and report.skipped_ids == ["id 'broken-one'", "id 'sneaky'"] and report.processed == 2
    records = load_records(str(tmp_path / "b.json"))
    assert [r.get("image_caption") is not None for r in records] == [True, True, True, False, False, False]


def test_cli_caption_and_unloadable_model(tmp_path, blip_dir, capsys):
    from tga.cli import caption_cmd

    parser = argparse.ArgumentParser(prog="tga")
    caption_cmd.register(parser.add_subparsers(dest="command"))
    data, images = make_records(tmp_path, count=5)
    out = str(tmp_path / "out.json")
    args = parser.parse_args(
        [
            "caption",
            "--model",
            blip_dir,
            "--data",
            data,
            "--image_folder",
            images,
            "--out",
            out,
            "--batch_size",
            "2",
            "--max_new_tokens",
            "3",
        ]
    )
    assert args.func(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert all(isinstance(r["image_caption"], str) for r in load_records(out)[:-1])
    not_a_model = tmp_path / "empty_model"
    not_a_model.mkdir()
    args = parser.parse_args(
        ["caption", "--model", str(not_a_model), "--data", data, "--image_folder", images, "--out", out]
    )
    with pytest.raises(ConfigError, match="--model"):
        args.func(args)
