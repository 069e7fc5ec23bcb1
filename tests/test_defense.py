"""Inference-time defences (tga.defense) on a tiny real ChatModel and on scripted backends: where AdaShield's prompt
goes, what every defence's cost counts, and the `--defense` option end to end through `tga evaluate`."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from tga.cli import main
from tga.data.tokenize import ROLE_ID
from tga.defense.adashield import ADASHIELD_PROMPTS, AdaShield
from tga.defense.base import ChatBackend, Cost
from tga.defense.dispatch import NoDefense, add_defense_args, build_defense
from tga.errors import ConfigError
from tga.inference import ChatModel, Usage
from tga.model.tokenizer import load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm
from tga.safety.cost import cost_summary
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
    with pytest.raises(ConfigError, match="--ecso_caption_prompt must contain no field"):
        ECSO(RecordingBackend(), caption_prompt="Describe {answer}")
    assert ECSO(RecordingBackend(), caption_prompt="Describe the image.").caption_prompt == "Describe the image."
    with pytest.raises(ConfigError, match="--ecso_mode applies to --defense ecso"):
        build_defense(parse(["--defense", "adashield", "--ecso_mode", "always"]), answer=lambda r, i: "")
    assert [harm_verdict(t) for t in ("Yes.", " no, it is fine", "Maybe")] == [True, False, None]


def calibration_data(tiny) -> str:
    path = tiny["root"] / "calibration.json"
    records = [{"image": f"scenes/{scene}/0.png", "caption": f"a {colour} square on a plain background"}
               for scene, colour in (("gun", "red"), ("knife", "blue"))]
    records.append({"image": "scenes/gun/0.png", "caption": "a red square", "question": "What is this?"})
    path.write_text(json.dumps(records))
    return str(path)


def test_cmrm_hooks_move_the_states_by_exactly_alpha_times_the_shift_and_leave_the_model_as_it_was(tiny):
    from tga.defense.cmrm import CMRM, Calibration, decoder_layers

    chat, alpha, layer = tiny["chat"], 0.5, 2
    config = chat.model.config.text_config
    generator = torch.Generator().manual_seed(0)
    calibration = Calibration(torch.randn(config.num_hidden_layers, config.hidden_size, generator=generator))
    images, requests = [image(), None, image((0, 0, 200))], ["What is shown?", "Hello there, how are you?", "Colour?"]
    before = chat.generate(images, requests, max_new_tokens=NEW_TOKENS)
    weights = {name: value.clone() for name, value in chat.model.state_dict().items()}
    raw, moved = [], []
    target = decoder_layers(chat.model)[layer - 1]
    watch = target.register_forward_hook(lambda m, a, o: raw.append(o.detach().clone()))
    defense = CMRM(chat, ChatBackend(chat, max_new_tokens=NEW_TOKENS), calibration, alpha=alpha, layers=str(layer))
    original_call = defense.backend.generate

    def generate_and_watch(imgs, reqs):  # a second watcher, added after CMRM's hook: it sees the moved states
        after = target.register_forward_hook(lambda m, a, o: moved.append(o.detach().clone()))
        try:
            return original_call(imgs, reqs)
        finally:
            after.remove()

    defense.backend.generate = generate_and_watch
    replies = defense(images, requests)
    watch.remove()
    assert len(raw) == len(moved) == NEW_TOKENS  # the prompt pass, then one pass per further generated token
    encoded, _ = chat.encode(images, requests)
    _, attention, roles = chat.padded(encoded, left=True)
    is_image = roles == ROLE_ID["image"]
    step = -alpha * calibration.shift[layer - 1]
    for call, (old, new) in enumerate(zip(raw, moved)):
        difference = new - old
        for row in range(len(requests)):
            for position in range(old.shape[1]):
                if call == 0:  # the prompt: only positions after the image of an image request move
                    after_image = bool(is_image[row].any()) and position > int(is_image[row].nonzero().max())
                    expected = after_image and bool(attention[row, position])
                else:  # a generated token moves when its request has an image
                    expected = bool(is_image[row].any())
                if expected:
                    assert torch.allclose(difference[row, position], step, atol=1e-5), (call, row, position)
                else:
                    assert torch.equal(difference[row, position], torch.zeros_like(step)), (call, row, position)
    assert int(is_image[0].sum()) == chat.model.config.image_seq_length  # image tokens exist and stayed put
    # afterwards: no hook left on any layer, the same weights, the same answers as before
    assert all(not layer_module._forward_hooks for layer_module in decoder_layers(chat.model))
    assert all(torch.equal(value, weights[name]) for name, value in chat.model.state_dict().items())
    assert chat.generate(images, requests, max_new_tokens=NEW_TOKENS) == before
    assert [r.cost.generations for r in replies] == [1, 1, 1]


def test_cmrm_hooks_are_removed_when_generation_fails(tiny):
    from tga.defense.cmrm import decoder_layers, shifted_states

    chat = tiny["chat"]
    hidden = chat.model.config.text_config.hidden_size
    with pytest.raises(RuntimeError, match="stop"):
        with shifted_states(chat.model, {1: torch.ones(hidden)}, 1.0, torch.ones(1, 3, dtype=torch.bool),
                            torch.ones(1, dtype=torch.bool)):
            assert decoder_layers(chat.model)[0]._forward_hooks
            raise RuntimeError("stop")
    assert not decoder_layers(chat.model)[0]._forward_hooks


def test_cmrm_calibration_is_the_mean_shift_at_the_last_prompt_token(tiny):
    from tga.defense.calibrate import calibrate_cmrm, load_calibration_items
    from tga.safety.evaluate import load_batch_images

    chat = tiny["chat"]
    items = load_calibration_items(calibration_data(tiny))
    assert [item.question for item in items] == ["Describe the image.", "Describe the image.", "What is this?"]
    calibration = calibrate_cmrm(chat, items, batch_size=2)
    # the same quantity through another path: the model's own hidden states, right padded, read at each last token
    images = load_batch_images([item.image for item in items])
    with_image = chat.hidden_states(images, [item.question for item in items])
    text_only = chat.hidden_states([None] * 3, [f"{item.caption}\n{item.question}" for item in items])
    layers = chat.model.config.text_config.num_hidden_layers
    for layer in range(1, layers):  # hidden_states[-1] is after the final norm; the hooks read the layer itself
        a = with_image.states[layer][torch.arange(3), with_image.last_index]
        b = text_only.states[layer][torch.arange(3), text_only.last_index]
        assert torch.allclose(calibration.shift[layer - 1], (a - b).mean(dim=0), atol=1e-4), layer
    assert calibration.shift.shape == (layers, chat.model.config.text_config.hidden_size)


def test_calibrate_command_and_evaluate_with_cmrm(tiny, tmp_path):
    from tga.defense.cmrm import load_calibration

    out = tmp_path / "cmrm.safetensors"
    assert main(["calibrate", "cmrm", "--model", tiny["ckpt"], "--data", calibration_data(tiny), "--out", str(out),
                 "--max_samples", "2"]) == 0
    calibration = load_calibration(str(out))
    assert calibration.meta["samples"] == "2" and calibration.shift.shape[0] == 4
    dsr = tmp_path / "dsr"
    assert main(["evaluate", "dsr", "--model", tiny["ckpt"], "--data", tiny["scenes"], "--prompts", "Describe it.",
                 "--max_new_tokens", "3", "--out", str(dsr), "--defense", "cmrm", "--cmrm_file", str(out),
                 "--cmrm_alpha", "0.5", "--cmrm_layers", "2-3"]) == 0
    settings = json.loads((dsr / "answers.settings.json").read_text())
    assert settings["cmrm_layers"] == [2, 3] and settings["cmrm_alpha"] == 0.5
    assert json.loads((dsr / "dsr.json").read_text())["cost"]["relative"] == {"generations": 1.0, "prompt_tokens": 1.0}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    common = ["evaluate", "dsr", "--model", tiny["ckpt"], "--data", tiny["scenes"], "--out", str(tmp_path / "x")]
    assert main([*common, "--defense", "cmrm", "--cmrm_file", str(bad)]) == 2
    assert main([*common, "--defense", "cmrm", "--cmrm_file", str(out), "--cmrm_layers", "0-2"]) == 2
    assert main([*common, "--defense", "cmrm"]) == 2


def test_chat_prints_the_defended_answer_and_refuses_retrieval_with_a_defence(capsys):
    from tga.defense.base import Reply
    from tga.safety.chat import answer

    seen = []

    def defense(images, requests):
        seen.append((images, requests))
        return [Reply("I am sorry", Cost(2, None, None, None))]

    picture = image()
    assert answer(object(), picture, "Describe it.", defense=defense) == "I am sorry"
    assert seen == [([picture], ["Describe it."])] and capsys.readouterr().out == "I am sorry\n"
    with pytest.raises(ConfigError, match="--retrieve and --defense cannot be combined"):
        answer(object(), picture, "Describe it.", defense=defense, retriever=lambda img: "text")
