"""The request-token guide (`--tga_form request`): its value on hand-made tensors, the token pairing of the two
passes with the real tokenizer, its gradient reaching the projector (and not the caption pass), and the options it
needs, refused by name."""

import dataclasses
import json
import os

import pytest
import torch
import yaml
from tiny_parts import tiny_model_and_builder

from tga.align.guide_config import GuideConfig
from tga.align.request_guide import request_guide_loss, request_token_loss
from tga.config import TGAArguments
from tga.data.collator import VLMCollator
from tga.data.records import load_records
from tga.errors import ConfigError, DataError
from tga.model.text_states import text_hidden_states
from tga.options import load_config
from tga.train.run import run_stage
from tga.train.stages import apply_stage, trainable_components


def states(rows):
    """[G, T, H] from nested lists, as the states of one layer."""
    return torch.tensor(rows, dtype=torch.float32)


def test_value_on_hand_made_tensors():
    # layer 1: sample 0 has one paired token equal in both passes (distance 0); sample 1 has three tokens, each
    # orthogonal to its caption-pass twin (distance 1 each). Every sample weighs the same: (0 + 1) / 2 = 0.5; a mean
    # over tokens would give 0.75.
    image = states([[[1, 0], [0, 0], [0, 0]], [[1, 0], [1, 0], [0, 1]]])
    caption = states([[[1, 0], [0, 0], [0, 0]], [[0, 1], [0, 1], [1, 0]]])
    request = torch.tensor([[True, False, False], [True, True, True]])
    loss, metrics = request_token_loss({1: image}, {1: caption}, [1], request, request)
    assert loss.item() == pytest.approx(0.5)
    assert metrics["cos_request"].tolist() == pytest.approx([0.25])  # (1 + 0 + 0 + 0) / 4 tokens
    # opposite states: distance 2; two layers are averaged
    loss, _ = request_token_loss({1: image, 2: image}, {1: image, 2: -image}, [1, 2], request, request)
    assert loss.item() == pytest.approx(1.0)


def test_tokens_pair_in_order_across_different_positions():
    # the caption pass is shorter: its paired tokens sit at other positions; the k-th marked token of one pass is
    # compared with the k-th of the other
    image = states([[[9, 9], [1, 0], [0, 1]]])
    caption = states([[[1, 0], [0, 1]]])
    loss, _ = request_token_loss({0: image}, {0: caption}, [0], torch.tensor([[False, True, True]]),
                                 torch.tensor([[True, True]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DataError, match="pair token for token"):
        request_token_loss({0: image}, {0: caption}, [0], torch.tensor([[False, True, True]]),
                           torch.tensor([[False, True]]))


def test_gradient_reaches_the_image_pass_only_at_request_tokens():
    image = torch.randn(2, 4, 8, requires_grad=True)
    caption = torch.randn(2, 3, 8, requires_grad=True)
    request = torch.tensor([[False, False, True, True], [False, True, True, False]])
    caption_request = torch.tensor([[False, True, True], [True, True, False]])
    loss, _ = request_token_loss({3: image}, {3: caption}, [3], request, caption_request)
    loss.backward()
    assert caption.grad is None  # the caption pass is the target
    touched = image.grad.abs().sum(dim=-1) > 0
    assert torch.equal(touched, request)


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    tokenizer, model, builder = tiny_model_and_builder(tiny_assets, use_retrieved=True, caption_target=True,
                                                       caption_context="request", request_guide=True)
    return model, tokenizer, builder, load_records(tiny_assets["stage2"])[:8]


def test_paired_tokens_are_the_request_after_the_image_and_after_the_caption(tiny):
    _, tokenizer, builder, records = tiny
    guided = 0
    for record in records:
        sample = builder.build(record)
        if not sample["guide"]:
            assert not sample["request_mask"].any() and "caption_request_mask" not in sample
            continue
        guided += 1
        image_side = sample["input_ids"][sample["request_mask"]]
        caption_side = sample["caption_input_ids"][sample["caption_request_mask"]]
        assert image_side.numel() > 0 and torch.equal(image_side, caption_side)
        # the span starts after the image, ends before the answer, and holds the question of the first turn
        first = int(sample["request_mask"].nonzero()[0])
        assert first > int(sample["image_mask"].nonzero()[-1])
        assert (sample["labels"][sample["request_mask"]] == -100).all()
        assert int(sample["caption_request_mask"].nonzero()[0]) > int(sample["caption_mask"].nonzero()[-1])
        question = record.messages[0].content.replace("<image>", "").strip()
        assert question.split()[-1].strip("?.") in tokenizer.decode(image_side)
    assert guided >= 2


def test_guide_gradient_reaches_the_projector(tiny):
    model, _, builder, records = tiny
    apply_stage(model, trainable_components("finetune"))
    model.zero_grad(set_to_none=True)
    batch = VLMCollator(builder.tokenizer.pad_token_id)([builder.build(r) for r in records])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    hidden = model(**inputs, output_hidden_states=True).hidden_states
    with torch.no_grad():
        caption_pass = text_hidden_states(model.model.language_model, batch["guide"].caption_input_ids,
                                          batch["guide"].caption_attention_mask, depth=2)
    loss, metrics = request_guide_loss(hidden, caption_pass, batch["guide"], [1, 2])
    assert loss.item() > 0 and metrics["cos_request"].shape == (2,) and metrics["cos_ic"].shape == (2,)
    loss.backward()
    projector = sum(float(p.grad.abs().sum()) for p in model.model.multi_modal_projector.parameters()
                    if p.grad is not None)
    assert projector > 0
    assert all(p.grad is None or not p.grad.any() for p in model.model.vision_tower.parameters())


def test_a_micro_batch_without_guide_samples_gives_an_attached_zero(tiny):
    model, _, builder, records = tiny
    text_only = dataclasses.replace(builder, caption_target=False)
    batch = VLMCollator(builder.tokenizer.pad_token_id)([text_only.build(r) for r in records[:2]])
    hidden = [torch.randn(2, batch["input_ids"].shape[1], 8, requires_grad=True) for _ in range(3)]
    loss, metrics = request_guide_loss(hidden, None, batch["guide"], [1, 2])
    assert loss.item() == 0.0 and loss.requires_grad and metrics == {}


@pytest.mark.parametrize("flags, message", [
    ({"tga_caption_context": "alone"}, "--tga_caption_context request"),
    ({"tga_caption_context": "request", "tga_bank": "bank"}, "--tga_bank"),
    ({"tga_caption_context": "request", "tga_center": True}, "--tga_center"),
])
def test_options_it_cannot_work_with_are_refused_by_name(flags, message):
    tga_args = TGAArguments(tga=True, tga_form="request", tga_layers="1-2", **flags)
    with pytest.raises(ConfigError, match=message):
        GuideConfig.for_run(tga_args, num_layers=3, trains_llm=True, zero3=False)


def test_a_stage_2_run_trains_with_the_request_guide_and_logs_it(tiny_assets, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recipe = load_config(os.path.join(repo, "configs/finetune/tiny_cpu_tga.yaml"))
    for key in ("deepspeed", "pretrain_mm_mlp_adapter"):  # one process, fresh projector
        recipe.pop(key, None)
    config = tmp_path / "request.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    run_stage("finetune", [
        str(config), "--model_name_or_path", tiny_assets["llm"], "--vision_tower", tiny_assets["vision"],
        "--data_path", tiny_assets["stage2"], "--image_folder", tiny_assets["image_folder"], "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--tga_layers", "1-2", "--tga_form", "request",
        "--tga_caption_context", "request", "--max_steps", "3", "--logging_steps", "1",
    ])
    with open(out / "trainer_state.json", encoding="utf-8") as handle:
        history = [entry for entry in json.load(handle)["log_history"] if "loss" in entry]
    guided = [entry for entry in history if "tga/cos_request/L1" in entry]
    assert len(history) == 3 and guided
    assert all(-1.0 <= entry["tga/cos_request/L2"] <= 1.0 and entry["tga/guide_loss"] > 0 for entry in guided)
