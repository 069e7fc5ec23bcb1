"""What a long run does that a short one does not, through the real TGATrainer on the tiny model: kill + resume with
a caption centre, gradient accumulation, the hand-built multimodal embedding of multi-rank ZeRO-3, the projector's
learning rate, the guide-weight schedules, the guide options named in error messages, no device reads on steps that
do not log, and the caption-state bank (tga.align.bank)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from tiny_parts import tiny_model_and_builder
from transformers import TrainerCallback

from tga.align.bank import caption_rows, data_fingerprint, model_fingerprint, open_or_build
from tga.align.batch import GuideBatch
from tga.config import TrainingArguments, parse_config
from tga.data.collator import VLMCollator
from tga.data.records import load_records
from tga.errors import ConfigError
from tga.model.vlm import build_vlm
from tga.running_means import RunningMeans
from tga.train.stages import apply_stage, trainable_components
from tga.train.trainer import GuideConfig, TGATrainer


@pytest.fixture(scope="module")
def parts(tiny_assets):
    tokenizer, _, builder = tiny_model_and_builder(tiny_assets, use_retrieved=True, caption_target=True)
    records = load_records(tiny_assets["stage2"])
    guided = [r for r in records if r.image and r.caption and not r.toxic]
    unguided = [r for r in records if r.image is None]
    return {"tokenizer": tokenizer, "builder": builder, "guided": guided, "unguided": unguided, "assets": tiny_assets}


def fresh_model(parts, stage: str):
    torch.manual_seed(0)
    model = build_vlm(parts["assets"]["llm"], parts["assets"]["vision"], parts["tokenizer"])
    apply_stage(model, trainable_components(stage))
    return model


def make_trainer(parts, model, samples, output_dir, guide=None, **overrides):
    settings = {"output_dir": str(output_dir), "report_to": "none", "per_device_train_batch_size": 2,
                "max_steps": 4, "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-2, "seed": 0,
                "lr_scheduler_type": "constant", "dataloader_num_workers": 0, "max_grad_norm": 0.0,
                **overrides}
    projector_lr = settings.pop("mm_projector_lr", None)
    return TGATrainer(model=model, args=TrainingArguments(**settings), train_dataset=samples,
                      data_collator=VLMCollator(parts["tokenizer"].pad_token_id),
                      processing_class=parts["tokenizer"], guide=guide, projector_lr=projector_lr)


def logged(trainer, key):
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


class StopAt(TrainerCallback):
    """Ends training after step N, as a kill right after that step's checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_kill_and_resume_keeps_the_caption_centre_and_the_losses(parts, tmp_path):
    samples = [parts["builder"].build(r) for r in parts["guided"][:8]]
    guide = GuideConfig(layers=[1, 2], center=True)
    whole = make_trainer(parts, fresh_model(parts, "pretrain"), samples, tmp_path / "whole", guide)
    whole.train()

    first = make_trainer(parts, fresh_model(parts, "pretrain"), samples, tmp_path / "killed", guide,
                         save_strategy="steps", save_steps=2)
    first.add_callback(StopAt(2))
    first.train()
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    assert (checkpoint / "tga_guide_state.safetensors").is_file()
    resumed = make_trainer(parts, fresh_model(parts, "pretrain"), samples, tmp_path / "killed", guide,
                           save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    for key in ("loss", "tga/guide_loss", "tga/cos_ic/L2"):
        expected, got = logged(whole, key), logged(resumed, key)
        assert sorted(got) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's log history, 3-4 from the resumed run
        assert got == pytest.approx(expected, rel=1e-5), key
    assert torch.allclose(resumed.guide.center(), whole.guide.center(), rtol=1e-6, atol=0)


def step_gradients(parts, samples, guide, batch, accumulation, tmp_path):
    model = fresh_model(parts, "finetune")
    trainer = make_trainer(parts, model, samples, tmp_path, guide, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, max_steps=1)
    grads = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.add_callback(Capture())
    trainer.train()
    return grads


@pytest.mark.parametrize("with_guide", [False, True], ids=["ce", "ce+guide"])
def test_batch_4_equals_batch_2_with_accumulation_2(parts, tmp_path, with_guide):
    # One sample without an image (no guide sample) among four: the two micro-batches hold 1 and 2 guide samples.
    records = [*parts["guided"][:3], parts["unguided"][0]]
    samples = [parts["builder"].build(r) for r in records]
    guide = GuideConfig(layers=[1, 2], weight=5.0) if with_guide else None
    whole = step_gradients(parts, samples, guide, 4, 1, tmp_path / "whole")
    split = step_gradients(parts, samples, guide, 2, 2, tmp_path / "split")
    assert whole.keys() == split.keys() and any(name.startswith("model.language_model") for name in whole)
    for name, grad in whole.items():
        assert torch.allclose(split[name], grad, rtol=1e-4, atol=1e-7), name


def test_embed_multimodal_gives_llavas_logits(parts):
    model = fresh_model(parts, "finetune").eval()
    trainer = make_trainer(parts, model, [], "unused")
    collate = VLMCollator(parts["tokenizer"].pad_token_id)
    for records in (parts["guided"][:2], parts["unguided"][:2]):  # an image batch, a text-only batch
        batch = collate([parts["builder"].build(r) for r in records])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
        with torch.no_grad():
            expected = model(**inputs).logits
            got = model(**trainer.embed_multimodal(model, dict(inputs))).logits
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_projector_learning_rate_reaches_the_optimizer(parts, tmp_path):
    model = fresh_model(parts, "finetune")
    samples = [parts["builder"].build(r) for r in parts["guided"][:4]]
    trainer = make_trainer(parts, model, samples, tmp_path, max_steps=2, learning_rate=1e-3, mm_projector_lr=5e-2,
                           weight_decay=0.1)
    trainer.train()
    projector = {id(p) for p in model.model.multi_modal_projector.parameters()}
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    seen = set()
    for group in trainer.optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        seen |= ids
        assert ids <= projector or not ids & projector  # a group is all projector or no projector
        assert group["lr"] == pytest.approx(5e-2 if ids <= projector else 1e-3)
    assert seen == trained


@pytest.mark.parametrize("schedule", ["linear", "released"])
def test_guide_weight_schedules_through_the_trainer(parts, tmp_path, schedule):
    # Learning rate 0: the states never change, so every step's guide loss differs only by its schedule.
    samples = [parts["builder"].build(r) for r in parts["guided"][:4]]
    form = "released" if schedule == "released" else "paper"
    trainer = make_trainer(parts, fresh_model(parts, "pretrain"), samples, tmp_path,
                           GuideConfig(layers=[1, 2], weight=2.0, schedule=schedule, form=form),
                           per_device_train_batch_size=4, learning_rate=0.0)
    trainer.train()
    weights, pairs = logged(trainer, "tga/weight"), logged(trainer, "tga/pair")
    progress = {step: (step - 1) / 4 for step in (1, 2, 3, 4)}  # step s runs at global_step s - 1
    if schedule == "linear":
        assert weights == pytest.approx({s: 2.0 * (1 - r) for s, r in progress.items()})
        assert pairs == pytest.approx({s: pairs[1] for s in pairs}, rel=1e-5)
    else:
        assert weights == pytest.approx({s: 2.0 for s in progress})
        assert pairs == pytest.approx({s: pairs[1] * (1 - r) for s, r in progress.items()}, rel=1e-5)


def test_guide_options_named_in_messages_exist(tmp_path):
    argv = ["--data_path", "x.json", "--output_dir", str(tmp_path), "--tga", "true", "--tga_layers", "1-2",
            "--tga_pair_weight", "0.5", "--tga_hinge_weight", "0.2", "--tga_center_momentum", "0.9"]
    _, _, tga_args, _ = parse_config(argv)
    settings = GuideConfig.for_run(tga_args, num_layers=4, trains_llm=True, zero3=False)
    assert (settings.pair_weight, settings.hinge_weight, settings.center_momentum) == (0.5, 0.2, 0.9)
    for flag, value in (("--tga_pair_weight", "-1"), ("--tga_hinge_weight", "-0.5"), ("--tga_center_momentum", "1")):
        with pytest.raises(ConfigError, match=flag):
            GuideConfig.for_run(parse_config([*argv, flag, value])[2], num_layers=4, trains_llm=True, zero3=False)


HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def test_a_micro_step_that_does_not_log_never_reads_the_device_from_tga_code(parts, tmp_path, monkeypatch):
    samples = [parts["builder"].build(r) for r in [*parts["guided"][:3], parts["unguided"][0]]]
    model = fresh_model(parts, "finetune")
    trainer = make_trainer(parts, model, samples, tmp_path, GuideConfig(layers=[1, 2], center=True),
                           logging_steps=10)
    trainer.state.global_step, trainer.state.logging_steps = 3, 10  # step 4 of 10: not a logging step
    batch = VLMCollator(parts["tokenizer"].pad_token_id)(samples)
    reads = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}tga{os.sep}" in caller and f"{os.sep}tests{os.sep}" not in caller:
                reads.append((_name, caller, sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    monkeypatch.undo()
    assert reads == []
    assert "tga/specificity" not in trainer.guide.metrics.sums  # the diagnostic waits for a logging step
    trainer.state.global_step = 9  # step 10 logs
    trainer.compute_loss(model, dict(batch))
    assert "tga/specificity" in trainer.guide.metrics.sums


def test_logged_guide_metrics_equal_the_per_step_values(parts, tmp_path):
    """Every step logged: the device-side means give what the per-step float path (RunningMeans) gives for the same
    metrics. Every second step logged: the means of the two steps, and the specificity of the logging step."""
    samples = [parts["builder"].build(r) for r in [*parts["guided"][:6], parts["unguided"][0], parts["unguided"][1]]]
    settings = GuideConfig(layers=[1, 2], center=True)
    # Batches of 4 from 6 guided and 2 text-only records: every batch has >= 2 guide samples (a defined specificity).
    every = make_trainer(parts, fresh_model(parts, "finetune"), samples, tmp_path / "every", settings,
                         learning_rate=1e-3, per_device_train_batch_size=4)
    per_step = []  # the metrics of each micro-batch, as the guide returns them, through the old float path

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            per_step.append(dict(reference.drain()))

    reference = RunningMeans()
    guide_loss_of = every.guide.loss

    def recorded_loss(*args, **kwargs):
        loss, metrics = guide_loss_of(*args, **kwargs)
        for key, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
            name = key if key.startswith("tga/") else f"tga/{key}"
            if value.ndim == 0:
                reference.add(name, float(value))
            else:
                for layer, item in zip([1, 2], value.tolist()):
                    reference.add(f"{name}/L{layer}", item)
        return loss, metrics

    every.guide.loss = recorded_loss
    every.add_callback(Record())
    every.train()
    for step, expected in enumerate(per_step, start=1):
        for key, value in expected.items():
            assert logged(every, key)[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)

    pairs = make_trainer(parts, fresh_model(parts, "finetune"), samples, tmp_path / "pairs", settings,
                         learning_rate=1e-3, per_device_train_batch_size=4, logging_steps=2)
    pairs.train()
    for key in ("tga/cos_ic/L1", "tga/guide_loss", "tga/hinge"):
        each = logged(every, key)
        assert logged(pairs, key) == pytest.approx({2: (each[1] + each[2]) / 2, 4: (each[3] + each[4]) / 2},
                                                   rel=1e-5), key
    spec = logged(every, "tga/specificity/L2")
    assert logged(pairs, "tga/specificity/L2") == pytest.approx({2: spec[2], 4: spec[4]}, rel=1e-5)


# ---- the caption-state bank ----
LAYERS = [1, 2]


def live_states(trainer, model, row):
    _, ids, mask = row
    extras = GuideBatch(image_mask=mask[None], retrieved_mask=mask[None], caption_input_ids=ids[None],
                        caption_attention_mask=torch.ones_like(ids, dtype=torch.bool)[None], caption_mask=mask[None])
    return trainer.guide.caption_states(model, extras, model.config.text_config.hidden_size, "cpu")


def test_bank_states_are_the_live_pass_bitwise_in_float32(parts, tmp_path):
    model = fresh_model(parts, "pretrain")
    trainer = make_trainer(parts, model, [], tmp_path / "out", GuideConfig(layers=LAYERS))
    rows = caption_rows(parts["guided"][:5], parts["builder"])
    bank = open_or_build(str(tmp_path / "bank"), model.model.language_model, rows, LAYERS, dtype="float32",
                         pad_token_id=parts["tokenizer"].pad_token_id, batch_size=1)
    for row in rows:
        assert torch.equal(bank.lookup([row[0]], "cpu"), live_states(trainer, model, row))
    # half-precision storage: the same states, rounded
    for dtype, tolerance in (("float16", 1e-3), ("bfloat16", 1e-2)):
        half = open_or_build(str(tmp_path / dtype), model.model.language_model, rows, LAYERS, dtype=dtype,
                             pad_token_id=parts["tokenizer"].pad_token_id)
        assert torch.allclose(half.lookup([r[0] for r in rows], "cpu"), bank.lookup([r[0] for r in rows], "cpu"),
                              rtol=tolerance, atol=tolerance)
        assert half.states.dtype.itemsize == 2


def test_training_with_the_bank_gives_the_losses_of_training_without(parts, tmp_path):
    records = [*parts["guided"][:6], parts["unguided"][0], parts["unguided"][1]]
    samples = [parts["builder"].build(r) for r in records]
    runs = {}
    for name, bank in (("live", None), ("bank", str(tmp_path / "bank"))):
        settings = GuideConfig(layers=LAYERS, bank=bank, bank_dtype="float32", center=True)
        trainer = make_trainer(parts, fresh_model(parts, "pretrain"), samples, tmp_path / name, settings)
        trainer.guide.bank_rows = lambda: caption_rows(records, parts["builder"])
        trainer.train()
        runs[name] = trainer
    assert runs["bank"].guide.bank is not None and runs["live"].guide.bank is None
    assert runs["bank"].guide.caption_tokens() == 0 < runs["live"].guide.caption_tokens()  # no caption pass ran
    for key in ("loss", "tga/guide_loss", "tga/cos_ic/L2"):
        assert logged(runs["bank"], key) == pytest.approx(logged(runs["live"], key), rel=1e-5), key


def test_a_stale_bank_is_refused_by_name(parts, tmp_path):
    model = fresh_model(parts, "pretrain")
    language_model = model.model.language_model
    rows = caption_rows(parts["guided"][:4], parts["builder"])
    folder = str(tmp_path / "bank")
    pad = parts["tokenizer"].pad_token_id
    open_or_build(folder, language_model, rows, LAYERS, dtype="float16", pad_token_id=pad)
    with pytest.raises(ConfigError, match=r"--tga_bank .*target layers \[1, 2\].*\[1, 3\]"):
        open_or_build(folder, language_model, rows, [1, 3], dtype="float16", pad_token_id=pad)
    with pytest.raises(ConfigError, match="--tga_bank .*other data"):
        open_or_build(folder, language_model, rows[:3], LAYERS, dtype="float16", pad_token_id=pad)
    before = model_fingerprint(language_model, 2)
    with torch.no_grad():
        language_model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(language_model, 2) != before
    with pytest.raises(ConfigError, match="--tga_bank .*another model"):
        open_or_build(folder, language_model, rows, LAYERS, dtype="float16", pad_token_id=pad)
    # a layer above the deepest target cannot change the caption states: the bank still fits
    with torch.no_grad():
        language_model.layers[1].mlp.down_proj.weight[0, 0] -= 1e-3
        language_model.layers[3].mlp.down_proj.weight[0, 0] += 1.0
    assert open_or_build(folder, language_model, rows, LAYERS, dtype="float16", pad_token_id=pad) is not None
    assert data_fingerprint(rows) != data_fingerprint(list(reversed(rows)))


@pytest.mark.distributed
def test_frozen_target_from_a_bank_under_two_rank_zero3_stage2(tiny_assets, launch_stage, tmp_path):
    """Without a bank run_stage refuses this (a second full LLM on every rank); with one, the ranks build it together
    and train."""
    out = launch_stage("finetune.py", "configs/finetune/tiny_cpu_tga.yaml", str(tmp_path / "run"), tiny_assets,
                       "--data_path", tiny_assets["stage2"], "--pretrain_mm_mlp_adapter", "", "--max_steps", "2",
                       "--tga_target", "frozen", "--tga_bank", str(tmp_path / "bank"), "--tga_center", "true")
    with open(tmp_path / "bank" / "bank.json", encoding="utf-8") as handle:
        meta = json.load(handle)
    guided = [r for r in load_records(tiny_assets["stage2"]) if r.image and r.caption and not r.toxic]
    assert meta["ids"] == [r.id for r in guided] and meta["layers"] == [1, 2, 3]
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as handle:
        history = json.load(handle)["log_history"]
    assert [entry["step"] for entry in history if "tga/guide_loss" in entry] == [1, 2]
