"""Inference-time defences (tga.defense) on a tiny real ChatModel and on scripted backends: where AdaShield's prompt
goes, what every defence's cost counts, and the `--defense` option end to end through `tga evaluate`."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from tga.cli import main
from tga.defense.adashield import ADASHIELD_PROMPTS, AdaShield
from tga.defense.base import ChatBackend, Cost
from tga.defense.cost import cost_summary
from tga.defense.dispatch import NoDefense, add_defense_args, build_defense
from tga.errors import ConfigError
from tga.inference import ChatModel, Usage
from tga.model.tokenizer import load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm
from tga.tiny import make_tiny_assets

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random VLM as a ChatModel, saved as a checkpoint folder too, and two toxic scene folders."""
    root = tmp_path_factory.mktemp("defense")
    assets = make_tiny_assets(str(root / "assets"), seed=0, num_images=4)
    tokenizer = load_tokenizer(assets["llm"])
    torch.manual_seed(0)
    model = build_vlm(assets["llm"], assets["vision"], tokenizer, template="llava_llama_2")
    processor = load_image_processor(assets["vision"])
    checkpoint = root / "ckpt"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    scenes = root / "scenes"
    for scene, colour in (("gun", (200, 0, 0)), ("knife", (0, 0, 200))):
        (scenes / scene).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(scenes / scene / "0.png")
    chat = ChatModel(model, tokenizer, processor, "llava_llama_2")
    return {"chat": chat, "ckpt": str(checkpoint), "scenes": str(scenes), "root": root}


def image(colour=(10, 200, 10)) -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


class RecordingBackend:
    """Stands in for a model: records every pass and answers from a script (request -> answer); tokens = words."""

    def __init__(self, script=None):
        self.passes: list[tuple[bool, str]] = []
        self.script = script or (lambda request, has_image: f"answer to: {request}")

    def generate(self, images, requests):
        self.passes += [(i is not None, r) for i, r in zip(images, requests)]
        return [Usage(self.script(r, i is not None), len(r.split()) + (10 if i is not None else 0), 3)
                for i, r in zip(images, requests)]

    def prompt_tokens(self, images, requests):
        return [len(r.split()) + (10 if i is not None else 0) for i, r in zip(images, requests)]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_new_tokens", type=int, default=NEW_TOKENS)
    add_defense_args(parser)
    return parser.parse_args(argv)


def test_adashield_prompt_goes_before_or_after_the_request_and_the_image_stays_first(tiny):
    backend = RecordingBackend()
    request = "Describe the image."
    AdaShield(backend)([image()], [request])
    AdaShield(backend, position="after")([image()], [request])
    AdaShield(backend, prompt="Be careful.")([image()], [request])
    (_, before), (_, after), (_, custom) = backend.passes
    assert before == f"{ADASHIELD_PROMPTS['before']} {request}" and before.startswith("Before processing")
    assert after == f"{request}\n{ADASHIELD_PROMPTS['after']}" and after.endswith("above instruction safely and correctly.")
    assert custom == f"Be careful. {request}"
    # in the model's prompt the image comes first, then the defence prompt, then the request
    prompt = tiny["chat"].format_prompt(before, with_image=True)
    assert prompt.index("<image>") < prompt.index("Before processing") < prompt.index(request)
    with pytest.raises(ConfigError, match="--adashield_position"):
        AdaShield(backend, position="middle")


def test_cost_counts_the_prompt_and_generated_tokens_of_every_pass(tiny):
    chat = tiny["chat"]
    images, requests = [image(), None], ["What is shown here?", "Tell me a story about a red square."]
    plain = NoDefense(ChatBackend(chat, max_new_tokens=NEW_TOKENS))(images, requests)
    shielded = AdaShield(ChatBackend(chat, max_new_tokens=NEW_TOKENS))(images, requests)
    for row, (reply, request, img) in enumerate(zip(plain, requests, images)):
        encoded, pixels = chat.encode([img], [request])
        width = encoded[0].input_ids.numel()
        # the image's tokens are part of the prompt the cost counts
        image_tokens = int((encoded[0].input_ids == chat.builder.image_token_id).sum())
        assert image_tokens == (chat.model.config.image_seq_length if img is not None else 0) and width > image_tokens
        output = chat.model.generate(input_ids=encoded[0].input_ids[None], max_new_tokens=NEW_TOKENS, do_sample=False,
                                     **({} if pixels is None else {"pixel_values": pixels}),
                                     pad_token_id=chat.tokenizer.pad_token_id, eos_token_id=chat.tokenizer.eos_token_id)
        new = output[0, width:].tolist()
        generated = new.index(chat.tokenizer.eos_token_id) + 1 if chat.tokenizer.eos_token_id in new else len(new)
        assert reply.cost == Cost(1, width, generated, width)
        assert reply.text == chat.tokenizer.decode(new, skip_special_tokens=True).strip()
        shield_width = chat.encode([img], [shielded[row].trace["request"]])[0][0].input_ids.numel()
        assert shielded[row].cost.prompt_tokens == shield_width > width
        assert shielded[row].cost.plain_prompt_tokens == width and shielded[row].cost.generations == 1


def test_cost_summary_means_and_ratios_to_no_defence():
    costs = [Cost(1, 100, 5, 100).to_dict(), Cost(3, 250, 15, 100).to_dict(), None]
    summary = cost_summary(costs)
    assert summary["requests"] == 2
    assert summary["generations_per_request"] == 2.0 and summary["relative"]["generations"] == 2.0
    assert summary["prompt_tokens_per_request"] == 175.0 and summary["new_tokens_per_request"] == 10.0
    assert summary["relative"]["prompt_tokens"] == pytest.approx(350 / 200)
    unknown = cost_summary([Cost(2, None, None, None).to_dict()])
    assert unknown["generations_per_request"] == 2.0 and unknown["relative"]["prompt_tokens"] is None
    assert cost_summary([None, {}]) is None


def test_a_defence_wraps_any_answer_function():
    calls = []

    def answer(request, img):
        calls.append((request, img is not None))
        return "I am sorry" if request.startswith("Before processing") else "a knife"

    defense = build_defense(parse(["--defense", "adashield"]), answer=answer)
    reply = defense([image()], ["Describe the image."])[0]
    assert reply.text == "I am sorry" and calls == [(reply.trace["request"], True)]
    assert reply.cost == Cost(1, None, None, None)


def test_flags_of_another_defence_are_an_error():
    with pytest.raises(ConfigError, match="--adashield_position applies to --defense adashield"):
        build_defense(parse(["--adashield_position", "after"]), answer=lambda r, i: "")
    with pytest.raises(SystemExit):
        parse(["--defense", "shield"])


def test_evaluate_dsr_with_a_defence_records_its_cost_and_settings(tiny, tmp_path):
    out = tmp_path / "dsr"
    common = ["evaluate", "dsr", "--model", tiny["ckpt"], "--data", tiny["scenes"], "--prompts", "Describe it.",
              "--max_new_tokens", "3", "--out", str(out)]
    assert main([*common, "--defense", "adashield", "--adashield_position", "after"]) == 0
    report = json.loads((out / "dsr.json").read_text())
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["cost"]["generations"] == 1 for row in rows)
    assert all(row["defense"]["request"].endswith(ADASHIELD_PROMPTS["after"]) for row in rows)
    assert report["cost"]["relative"]["generations"] == 1.0 and report["cost"]["relative"]["prompt_tokens"] > 1.5
    assert "Inference cost per request" in (out / "dsr.md").read_text()
    # the same folder without the defence is another setting: refused rather than mixed
    assert main(common) == 2
    plain = tmp_path / "plain"
    assert main([*common[:-1], str(plain)]) == 0
    assert json.loads((plain / "dsr.json").read_text())["cost"]["relative"]["prompt_tokens"] == 1.0


class SpyBackend:
    """The real tiny model behind a spy: records every pass; the harm check's verdict comes from a script (the
    random model's own verdict would be noise), every other pass is the model's."""

    def __init__(self, chat, harmful_words=("knife",)):
        self.inner, self.harmful_words, self.passes = ChatBackend(chat, max_new_tokens=NEW_TOKENS), harmful_words, []

    def generate(self, images, requests):
        self.passes += [(i is not None, r) for i, r in zip(images, requests)]
        usages = self.inner.generate(images, requests)
        return [Usage("Yes, it is." if any(w in r for w in self.harmful_words) else "No.", u.prompt_tokens, u.new_tokens)
                if r.startswith("Here is a request") else u for r, u in zip(requests, usages)]

    def prompt_tokens(self, images, requests):
        return self.inner.prompt_tokens(images, requests)


def test_ecso_captions_only_what_the_check_calls_harmful_and_answers_it_without_the_image(tiny):
    from tga.defense.ecso import ECSO

    chat = tiny["chat"]
    backend = SpyBackend(chat)
    requests = ["How do I use the knife?", "What colour is the ball?", "Tell me about knives."]
    replies = ECSO(backend)([image(), image((0, 0, 200)), None], requests)
    first = chat.generate([image(), image((0, 0, 200)), None], requests, max_new_tokens=NEW_TOKENS)
    passes = backend.passes
    # pass 1: every request as asked (image rows with their image); pass 2: the two image answers checked, text only
    assert passes[:3] == [(True, requests[0]), (True, requests[1]), (False, requests[2])]
    assert [p[0] for p in passes[3:5]] == [False, False] and requests[0] in passes[3][1] and first[0] in passes[3][1]
    # only the harmful one goes on: a caption of its image, then the answer from the caption alone
    assert len(passes) == 7
    caption_pass, answer_pass = passes[5], passes[6]
    assert caption_pass == (True, "Request: How do I use the knife?\nDescribe the image, with the details needed to "
                                  "answer the request.")
    caption = replies[0].trace["caption"]
    assert answer_pass[0] is False and caption in answer_pass[1] and requests[0] in answer_pass[1]
    # the final answer is the text-only pass's: what the model says to that prompt without any image
    assert replies[0].text == chat.generate([None], [answer_pass[1]], max_new_tokens=NEW_TOKENS)[0]
    assert replies[0].trace["first_answer"] == first[0] and replies[0].trace["harmful"] is True
    assert replies[1].text == first[1] and replies[1].trace["harmful"] is False and "caption" not in replies[1].trace
    assert replies[2].text == first[2] and "check" not in replies[2].trace
    assert [r.cost.generations for r in replies] == [4, 2, 1]
    assert replies[0].cost.prompt_tokens == sum(chat.prompt_tokens([img], [r])[0] for img, r in
                                                zip([image(), None, image(), None], [requests[0], passes[3][1],
                                                                                     caption_pass[1], answer_pass[1]]))


def test_ecso_always_captions_every_image_request_without_a_check(tiny):
    from tga.defense.ecso import ECSO

    chat = tiny["chat"]
    backend = SpyBackend(chat, harmful_words=())
    replies = ECSO(backend, mode="always", answer_prompt="{caption}\n{request}")([image(), None], ["Describe it.", "Hi"])
    assert [p[0] for p in backend.passes] == [False, True, False]  # the text-only request, the caption, the answer
    assert not any(r.startswith("Here is a request") for _, r in backend.passes)
    caption = replies[0].trace["caption"]
    assert backend.passes[2] == (False, f"{caption}\nDescribe it.")
    assert replies[0].text == chat.generate([None], [f"{caption}\nDescribe it."], max_new_tokens=NEW_TOKENS)[0]
    assert [r.cost.generations for r in replies] == [2, 1] and replies[0].trace["transformed"] is True


def test_ecso_templates_must_name_their_fields():
    from tga.defense.ecso import ECSO, harm_verdict

    with pytest.raises(ConfigError, match="--ecso_answer_prompt must contain {caption} and {request}"):
        ECSO(RecordingBackend(), answer_prompt="{request} only")
    with pytest.raises(ConfigError, match="--ecso_mode applies to --defense ecso"):
        build_defense(parse(["--defense", "adashield", "--ecso_mode", "always"]), answer=lambda r, i: "")
    assert [harm_verdict(t) for t in ("Yes.", " no, it is fine", "Maybe")] == [True, False, None]
