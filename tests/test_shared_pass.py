"""The caption pass riding the training forward (tga.align.shared_pass): its states equal the separate pass's bit for
bit, the training forward and its gradients are untouched, each layer runs the captions once per forward (gradient
checkpointing included), and where it cannot hold the separate pass is chosen with a one-line notice."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GemmaConfig, GemmaModel, LlamaConfig, LlamaModel, MistralConfig, MistralModel

from tga.align.shared_pass import SharedCaptionPass
from tga.errors import ConfigError
from tga.model.text_states import text_hidden_states

SIZES = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def batches():
    torch.manual_seed(1)
    ids, captions = torch.randint(3, 100, (2, 11)), torch.randint(3, 100, (3, 7))
    attention, caption_attention = torch.ones_like(ids), torch.ones_like(captions)
    attention[1, 8:] = 0
    caption_attention[0, 5:] = 0  # right padding
    caption_attention[2, :2] = 0  # left padding
    return ids, attention, captions, caption_attention


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_class,config", [
    (MistralModel, MistralConfig(**SIZES)),
    (MistralModel, MistralConfig(**SIZES, sliding_window=4)),
    (LlamaModel, LlamaConfig(**SIZES)),
])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_ridden_states_equal_the_separate_pass_and_leave_the_training_step_alone(model_class, config, checkpointing):
    torch.manual_seed(0)
    model = model_class(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, attention, captions, caption_attention = batches()
    plain = model(input_ids=ids, attention_mask=attention).last_hidden_state
    plain.square().mean().backward()
    plain_grads = grads(model)
    for depth in range(1, config.num_hidden_layers + 1):  # the last depth takes the final norm, as the full forward
        with torch.no_grad():
            expected = text_hidden_states(model, captions, caption_attention, depth)
        model.zero_grad(set_to_none=True)
        shared = SharedCaptionPass(model, depth, zero3=False)
        with shared.riding(captions, caption_attention):
            output = model(input_ids=ids, attention_mask=attention).last_hidden_state
        output.square().mean().backward()  # a checkpointed layer recomputes here: no caption state added
        states = shared.take()
        assert len(states) == len(expected) == depth + 1
        assert all(torch.equal(got, want) for got, want in zip(states, expected))
        assert not any(s.requires_grad for s in states)
        assert torch.equal(output, plain)
        assert grads(model).keys() == plain_grads.keys()
        assert all(torch.equal(grads(model)[name], grad) for name, grad in plain_grads.items())
        assert shared.take() is None  # taken once; nothing armed since
        assert not any(getattr(getattr(hook, "func", hook), "__self__", None) is shared  # nothing stays on the model
                       for module in model.modules() for hook in module._forward_hooks.values())


def test_a_forward_without_captions_runs_nothing_and_gives_an_empty_tuple():
    model = MistralModel(MistralConfig(**SIZES)).eval()
    calls = []
    for layer in model.layers:
        layer.register_forward_hook(lambda *_: calls.append(1))
    ids, attention, _, _ = batches()
    shared = SharedCaptionPass(model, 2, zero3=False)
    with shared.riding(None, None), torch.no_grad():
        model(input_ids=ids, attention_mask=attention)
    assert shared.take() == () and len(calls) == 4  # the training forward's four layers, nothing more


def test_a_forward_that_stops_below_the_depth_is_an_error():
    model = MistralModel(MistralConfig(**SIZES)).eval()
    _, _, captions, caption_attention = batches()
    shared = SharedCaptionPass(model, 3, zero3=False)
    with shared.riding(captions, caption_attention), torch.no_grad():
        model.embed_tokens(captions)  # a forward that never reaches the decoder layers
    with pytest.raises(RuntimeError, match="ran 0 of the 3 decoder layers"):
        shared.take()


def test_zero3_marks_the_layers_up_to_the_depth_as_leaf_modules():
    from deepspeed.utils import z3_leaf_module

    model = MistralModel(MistralConfig(**SIZES))
    SharedCaptionPass(model, 2, zero3=True)
    assert [z3_leaf_module(layer) for layer in model.layers] == [True, True, False, False]


def test_auto_shares_where_it_can_and_names_why_not():
    from tga.align.guide_config import GuideConfig

    mistral, gemma = MistralModel(MistralConfig(**SIZES)), GemmaModel(GemmaConfig(**SIZES, head_dim=8))

    def source(language_model, copied=False, **options):
        return GuideConfig(layers=[1], **options).caption_source(language_model, copied_target=copied)

    assert source(mistral) == ("shared", None)
    assert source(mistral, target="frozen", bank="bank") == ("bank", None)
    assert source(mistral, caption_pass="separate") == ("separate", None)
    mode, why = source(gemma)
    assert mode == "separate" and "'gemma'" in why
    mode, why = source(mistral, copied=True, target="frozen")
    assert mode == "separate" and "--tga_target frozen" in why
    with pytest.raises(ConfigError, match="--tga_caption_pass shared: the forward of model type 'gemma'"):
        source(gemma, caption_pass="shared")
    with pytest.raises(ConfigError, match="--tga_caption_pass bank needs --tga_bank"):
        GuideConfig(layers=[1], caption_pass="bank")
    with pytest.raises(ConfigError, match="--tga_caption_pass separate: --tga_bank"):
        GuideConfig(layers=[1], caption_pass="separate", bank="bank", target="frozen")


def test_guide_falls_back_to_the_separate_pass_with_one_notice(tiny_assets, caplog):
    """A frozen-copy target (stage 2, LLM trainable) is a module the training forward never runs."""
    from tga.align.guide import Guide
    from tga.align.guide_config import GuideConfig
    from tga.model.tokenizer import load_tokenizer
    from tga.model.vlm import build_vlm

    tokenizer = load_tokenizer(tiny_assets["llm"])
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    with caplog.at_level(logging.WARNING, logger="tga.align.guide"):
        frozen = Guide(GuideConfig(layers=[1, 2], target="frozen"), model, pad_token_id=tokenizer.pad_token_id)
    notices = [r.getMessage() for r in caplog.records if "caption pass" in r.getMessage()]
    assert frozen.caption_pass_mode == "separate" and frozen.shared is None
    assert len(notices) == 1 and "\n" not in notices[0] and "--tga_target frozen" in notices[0]
    live = Guide(GuideConfig(layers=[1, 2]), model, pad_token_id=tokenizer.pad_token_id)
    assert live.caption_pass_mode == "shared" and live.shared is not None


def finetune(tiny_assets, tmp_path, name, *flags):
    """The tiny TGA stage-2 recipe in one process (no DeepSpeed, a fresh projector), 3 steps, gradient checkpointing."""
    import json
    import os

    import yaml
    from safetensors.torch import load_file

    from tga.options import load_config
    from tga.train.run import run_stage

    recipe = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs/finetune/tiny_cpu_tga.yaml"))
    for key in ("deepspeed", "pretrain_mm_mlp_adapter"):
        recipe.pop(key)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**recipe, "data_path": tiny_assets["stage2"], "image_folder": tiny_assets["image_folder"],
                                    "model_name_or_path": tiny_assets["llm"], "vision_tower": tiny_assets["vision"],
                                    "output_dir": str(tmp_path / name), "max_steps": 3, "gradient_checkpointing": True,
                                    "group_by_modality_length": False}))
    out = run_stage("finetune", [str(path), *flags])
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as handle:
        history = [entry for entry in json.load(handle)["log_history"] if "loss" in entry]
    with open(os.path.join(out, "cost.json"), encoding="utf-8") as handle:
        tokens = json.load(handle)["tokens"]
    return history, load_file(os.path.join(out, "model.safetensors")), tokens


def test_trainer_steps_are_the_same_with_the_shared_and_the_separate_pass(tiny_assets, tmp_path, monkeypatch):
    """Three optimizer steps: the same losses, guide metrics, caption-token count and weights, bit for bit (the
    weights after AdamW steps equal only if every step's gradients did)."""
    with monkeypatch.context() as patch:  # the shared run never falls back to the separate pass
        patch.setattr("tga.align.guide.text_hidden_states", lambda *a, **k: pytest.fail("separate pass ran"))
        shared = finetune(tiny_assets, tmp_path, "shared", "--tga_caption_pass", "auto")
    separate = finetune(tiny_assets, tmp_path, "separate", "--tga_caption_pass", "separate")

    def compared(history):
        return [{k: v for k, v in entry.items() if k in ("loss", "grad_norm") or k.startswith("tga/")}
                for entry in history]

    assert len(shared[0]) == 3 and "tga/guide_loss" in shared[0][0] and "tga/cos_ic/L3" in shared[0][0]
    assert compared(shared[0]) == compared(separate[0])
    assert shared[1].keys() == separate[1].keys()
    assert all(torch.equal(shared[1][name], separate[1][name]) for name in shared[1])
    assert shared[2] == separate[2] and shared[2]["reference"] > 0


# ---------------------------------------------------------------------------------------------- 2 ranks, DeepSpeed

NO_REUSE = {"stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0}  # every layer gathered for each use: the regime of a 7B model


def _gathered_bytes(dist) -> int:
    return sum(size * record[0] for name, sizes in dist.comms_logger.comms_dict.items() if "all_gather" in name
               for size, record in sizes.items())


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    import deepspeed.comm as dist

    from tga.train.distributed import cpu_comm_buffer_path, release_cpu_comm_buffer

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    try:
        for stage in (0, 2, 3):
            torch.manual_seed(0)
            model = MistralModel(MistralConfig(**SIZES)).train()
            shared = SharedCaptionPass(model, 3, zero3=stage == 3)  # before the engine: the leaf marks
            config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage, **NO_REUSE},
                      "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
                      "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, config=config,
                                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
            torch.manual_seed(10 + rank)  # each rank its own batches; rank 1 has no captions at its second step
            steps = [batches(), batches()]
            for step, (ids, attention, captions, caption_attention) in enumerate(steps):
                has_captions = rank == 0 or step == 0
                before = _gathered_bytes(dist)
                with shared.riding(captions if has_captions else None, caption_attention):
                    output = engine(input_ids=ids, attention_mask=attention).last_hidden_state
                ridden_bytes = _gathered_bytes(dist) - before
                ridden = shared.take()
                with torch.no_grad():  # the separate pass (every rank runs it under ZeRO-3: one token without captions)
                    separate = text_hidden_states(engine.module, captions if has_captions else captions[:1, :1],
                                                  caption_attention if has_captions else None, 3)
                before = _gathered_bytes(dist)
                with torch.no_grad():
                    engine(input_ids=ids, attention_mask=attention)  # a plain forward, no caption pass
                plain_bytes = _gathered_bytes(dist) - before
                engine.backward(output.square().mean())
                engine.step()
                results[f"{stage}/{step}"] = {
                    "equal": bool(ridden) and all(torch.equal(a, b) for a, b in zip(ridden, separate, strict=True)),
                    "empty": ridden == (), "ridden_bytes": ridden_bytes, "plain_bytes": plain_bytes}
            dist.comms_logger.comms_dict.clear()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        release_cpu_comm_buffer(cpu_comm_buffer_path())
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_ride_bit_for_bit_under_zero_0_2_3_without_extra_gathers(tmp_path):
    """One launch of 2 CPU ranks (gloo): ZeRO-0, 2 and 3 in turn. The ridden states equal the separate pass's; a rank
    without captions arms nothing and the ranks stay in step; under ZeRO-3 (nothing kept live) the ridden forward
    gathers exactly the bytes of a plain forward."""
    from tga.train.distributed import free_port

    torch.multiprocessing.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for stage in (0, 2, 3):
        assert results[0][f"{stage}/0"]["equal"] and results[0][f"{stage}/1"]["equal"]
        assert results[1][f"{stage}/0"]["equal"] and results[1][f"{stage}/1"]["empty"]
    for step in range(2):
        zero3 = results[0][f"3/{step}"]
        assert zero3["plain_bytes"] > 0 and zero3["ridden_bytes"] == zero3["plain_bytes"]


@pytest.mark.distributed
def test_zero3_trainer_on_two_ranks_gives_the_same_steps_with_either_pass(tiny_assets, tmp_path, launch_stage):
    """The tiny TGA stage 2 under `deepspeed --num_gpus 2` (ZeRO-3, gloo), 4 steps with the shared pass and with the
    separate one: the first step's loss and guide metrics are equal bit for bit (the same caption states); its
    gradients, and so the later steps, agree to float32 rounding only. The leaf mark alone does that: DeepSpeed
    delays the reduction of a leaf module's gradients to the end of the module's backward (stage3.py), which regroups
    the reduction, and a plain ZeRO-3 step with the decoder layers marked as leaves differs from one without in the
    last bits of the same weights (docs/tga_loss.md)."""
    import json
    import os

    from safetensors.torch import load_file

    runs = {}
    for name in ("shared", "separate"):
        out = launch_stage("finetune.py", "configs/finetune/tiny_cpu_tga.yaml", str(tmp_path / name), tiny_assets,
                           "--data_path", tiny_assets["stage2"], "--pretrain_mm_mlp_adapter", "", "--max_steps", "4",
                           "--tga_caption_pass", name)
        with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as handle:
            history = [{k: v for k, v in entry.items() if k == "loss" or k.startswith("tga/")}
                       for entry in json.load(handle)["log_history"] if "loss" in entry]
        runs[name] = history, load_file(os.path.join(out, "model.safetensors"))
    (shared, shared_weights), (separate, separate_weights) = runs["shared"], runs["separate"]
    assert len(shared) == 4 and "tga/guide_loss" in shared[0]
    assert shared[0] == separate[0]
    for got, want in zip(shared[1:], separate[1:], strict=True):
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6) for k in got)
    assert shared_weights.keys() == separate_weights.keys()
    assert all(torch.allclose(shared_weights[k], separate_weights[k], rtol=1e-5, atol=1e-6) for k in shared_weights)
