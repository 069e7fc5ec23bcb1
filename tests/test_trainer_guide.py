"""The guide term inside TGATrainer: gradients reach the projector and the LLM below the deepest target layer, never
the vision tower; the caption pass and masks select the intended states."""

import pytest
import torch
from tiny_parts import tiny_model_and_builder
from transformers import TrainerState
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from tga.align import pool_layers
from tga.config import TrainingArguments
from tga.data.collator import VLMCollator
from tga.data.records import load_records
from tga.model.vlm import build_vlm
from tga.train.stages import apply_stage, trainable_components
from tga.train.throughput import Throughput
from tga.train.trainer import GuideConfig, TGATrainer


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    tokenizer, model, builder = tiny_model_and_builder(tiny_assets, use_retrieved=True, caption_target=True)
    records = load_records(tiny_assets["stage2"])[:8]
    batch = VLMCollator(tokenizer.pad_token_id)([builder.build(r) for r in records])
    batch["records"] = records
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), report_to="none")
    yield model, tokenizer, batch, args
    unset_hf_deepspeed_config()


def guide_backward(model, tokenizer, batch, args, stage, layers):
    apply_stage(model, trainable_components(stage))
    model.zero_grad(set_to_none=True)
    trainer = TGATrainer(model=model, args=args, processing_class=tokenizer, guide=GuideConfig(layers=layers))
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    hidden = model(**inputs, output_hidden_states=True).hidden_states
    loss, metrics = trainer.guide.loss(model, hidden, batch["guide"])  # the guide loss alone: no CE
    assert loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    return metrics


def grad_norm(parameters):
    return sum(float(p.grad.abs().sum()) for p in parameters if p.grad is not None)


def test_stage1_guide_gradient_reaches_the_projector_only(setup):
    model, tokenizer, batch, args = setup
    metrics = guide_backward(model, tokenizer, batch, args, "pretrain", [1, 2])
    assert grad_norm(model.model.multi_modal_projector.parameters()) > 0
    assert grad_norm(model.model.vision_tower.parameters()) == 0
    assert grad_norm(model.model.language_model.parameters()) == 0  # frozen in stage 1
    assert metrics["cos_ic"].shape == (2,) and metrics["hinge"].item() > 0  # R is in these prompts


def test_stage2_guide_gradient_reaches_llm_layers_below_the_deepest_target(setup):
    model, tokenizer, batch, args = setup
    guide_backward(model, tokenizer, batch, args, "finetune", [1, 2])
    layers = model.model.language_model.layers
    assert grad_norm(model.model.multi_modal_projector.parameters()) > 0
    assert grad_norm(layers[0].parameters()) > 0 and grad_norm(layers[1].parameters()) > 0
    # Layer index 2 of the module list produces hidden_states[3]: above the deepest target, it gets no gradient.
    assert grad_norm(layers[2].parameters()) == 0 and grad_norm(layers[3].parameters()) == 0
    assert grad_norm(model.model.vision_tower.parameters()) == 0


def test_toxic_and_caption_less_samples_are_outside_the_guide(setup):
    _, _, batch, _ = setup
    expected = [row for row, r in enumerate(batch["records"]) if r.image and r.caption and not r.toxic]
    assert batch["guide"].guide_index.tolist() == expected
    assert any(r.toxic for r in batch["records"]) and any(r.image is None for r in batch["records"])


def test_centred_guide_measures_states_minus_the_running_caption_mean(setup):
    model, tokenizer, batch, args = setup
    apply_stage(model, trainable_components("finetune"))
    trainer = TGATrainer(model=model, args=args, processing_class=tokenizer,
                         guide=GuideConfig(layers=[1, 2], center=True))
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        _, metrics = trainer.guide.loss(model, hidden, batch["guide"])
        captions = trainer.guide.caption_states(model, batch["guide"], hidden[0].shape[-1], hidden[0].device)
    index = batch["guide"].guide_index
    images = pool_layers(hidden, [1, 2], batch["guide"].image_mask)[:, index]
    centre = captions.mean(dim=1, keepdim=True)  # the first update sets the centre to the batch mean
    assert torch.allclose(trainer.guide.center().unsqueeze(1), centre, atol=1e-6)
    expected = torch.nn.functional.cosine_similarity(images - centre, captions - centre, dim=-1).mean(dim=1)
    assert torch.allclose(metrics["cos_ic"], expected, atol=1e-5)
    uncentred = torch.nn.functional.cosine_similarity(images, captions, dim=-1).mean(dim=1)
    assert not torch.allclose(expected, uncentred, atol=1e-3)  # centring changes what is measured


@pytest.mark.slow
def test_frozen_target_never_changes_while_the_model_trains(setup, tiny_assets):
    tokenizer = setup[1]
    torch.manual_seed(0)
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    batch, args = setup[2], setup[3]
    apply_stage(model, trainable_components("finetune"))
    trainer = TGATrainer(model=model, args=args, processing_class=tokenizer,
                         guide=GuideConfig(layers=[1, 2], target="frozen"))
    frozen = {k: v.clone() for k, v in trainer.guide.frozen_language_model.state_dict().items()}
    live_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    target_before = trainer.guide.caption_states(model, batch["guide"], model.config.text_config.hidden_size, "cpu")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    keys = ("input_ids", "attention_mask", "pixel_values", "labels", "guide")
    for _ in range(3):
        loss = trainer.compute_loss(model, {k: batch[k] for k in keys if k in batch})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, frozen[k]) for k, v in trainer.guide.frozen_language_model.state_dict().items())
    assert any(not torch.equal(v, live_before[k]) for k, v in model.model.language_model.state_dict().items())
    assert all(not p.requires_grad for p in trainer.guide.frozen_language_model.parameters())
    target_after = trainer.guide.caption_states(model, batch["guide"], model.config.text_config.hidden_size, "cpu")
    assert torch.equal(target_before, target_after)  # the target is the stage-start model's, bitwise
    trainer.guide.frozen_language_model = None  # the live target follows the trained model
    live = trainer.guide.caption_states(model, batch["guide"], model.config.text_config.hidden_size, "cpu")
    assert not torch.allclose(live, target_after)


def test_throughput_and_eta_between_logs():
    ticks = iter([10.0, 14.0, 20.0])
    meter = Throughput(clock=lambda: next(ticks))
    meter.on_train_begin(None, TrainerState(global_step=0, num_input_tokens_seen=0), None)
    first = meter.measure(step=4, max_steps=10, samples_per_step=8, tokens_seen=400)  # 4 steps in 4 s
    assert first == {"throughput/samples_per_second": 8.0, "throughput/seconds_per_step": 1.0,
                     "throughput/eta_seconds": 6.0, "throughput/tokens_per_second": 100.0}
    second = meter.measure(step=7, max_steps=10, samples_per_step=8, tokens_seen=700)  # 3 steps in 6 s
    assert second["throughput/seconds_per_step"] == 2.0 and second["throughput/eta_seconds"] == 6.0


def test_training_logs_carry_throughput(setup):
    model, tokenizer, _, args = setup
    trainer = TGATrainer(model=model, args=args, processing_class=tokenizer)
    trainer.state.max_steps = 5
    trainer.throughput.on_train_begin(args, trainer.state, None)
    trainer.state.global_step = 2
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    assert logged["throughput/samples_per_second"] > 0 and logged["throughput/eta_seconds"] >= 0
