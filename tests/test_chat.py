"""`tga chat`: streamed answers, the interactive loop, retrieval of a corpus text for the image, CLI errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaTokenizer

from tga.cli import chat_cmd
from tga.errors import ConfigError, DataError
from tga.retrieval import CaptionIndex, build_index
from tga.safety.chat import answer, interactive, make_retriever


class StreamingChat:
    """Stands in for `ChatModel.generate`: feeds the streamer a prompt then the answer tokens, like HF generate."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[dict] = []

    def generate(self, images, questions, *, max_new_tokens=64, retrieved=None, streamer=None):
        self.calls.append({"images": images, "questions": questions, "retrieved": retrieved})
        reply = f"You asked: {questions[0]}"
        if streamer is not None:
            streamer.put(torch.tensor([self.tokenizer("[INST] prompt [/INST]")["input_ids"]]))
            for token in self.tokenizer(reply, add_special_tokens=False)["input_ids"]:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return [reply]


@pytest.fixture(scope="module")
def chat(mistral_tokenizer_dir):
    return StreamingChat(LlamaTokenizer.from_pretrained(mistral_tokenizer_dir))


def test_answer_streams_only_the_answer(chat, capsys):
    text = answer(chat, None, "what is this?")
    printed = capsys.readouterr().out
    assert text == "You asked: what is this?"
    assert printed.strip() == text and "prompt" not in printed


def test_interactive_loop_until_exit(chat, capsys):
    chat.calls.clear()
    questions = iter(["first?", "", "second?", "exit", "never asked"])
    assert interactive(chat, None, read=lambda prompt: next(questions)) == 2
    assert [c["questions"] for c in chat.calls] == [["first?"], ["second?"]]
    assert "You asked: second?" in capsys.readouterr().out
    remaining = ["only?"]

    def eof_reader(prompt):
        if not remaining:
            raise EOFError  # Ctrl-D
        return remaining.pop()

    assert interactive(chat, None, read=eof_reader) == 1


class ColourEmbedder:
    """Embeds an image by its mean colour (3-d, normalised): red images retrieve the 'red' text."""

    def embed_images(self, images):
        rows = np.array([np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0) for image in images])
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_retrieved_text_reaches_generate(chat, capsys):
    texts = ["a red object", "a green object", "a blue object"]
    embeddings = np.eye(3, dtype=np.float32)
    retriever = make_retriever(CaptionIndex(texts, embeddings, build_index(embeddings), {}), ColourEmbedder())
    chat.calls.clear()
    answer(chat, Image.new("RGB", (4, 4), (0, 200, 10)), "what is it?", retriever=retriever, stream=False)
    assert chat.calls[0]["retrieved"] == ["a green object"]
    answer(chat, None, "text only?", retriever=retriever, stream=False)
    assert chat.calls[1]["retrieved"] == [None]


def parse_cli(argv):
    parser = argparse.ArgumentParser()
    chat_cmd.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_errors_name_model_folder_image_and_index(tmp_path):
    args = parse_cli(["chat", "--model", str(tmp_path / "missing_model"), "hello"])
    with pytest.raises(ConfigError, match="missing_model"):
        args.func(args)

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    args = parse_cli(["chat", "--model", str(model), "--image", str(bad), "what is this?"])
    with pytest.raises(DataError, match="photo.jpg"):
        args.func(args)

    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    args = parse_cli(
        ["chat", "--model", str(model), "--image", str(good), "--retrieve", str(tmp_path / "no_index"), "q"]
    )
    with pytest.raises(ConfigError, match="no_index"):
        args.func(args)
    args = parse_cli(["chat", "--model", str(model), "--retrieve", str(tmp_path / "no_index"), "q"])
    with pytest.raises(ConfigError, match="--image"):
        args.func(args)
