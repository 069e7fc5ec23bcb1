"""Textual and multimodal unlearning on a tiny VLM: data adapters, loss terms, the forget/keep behaviour, the stopping
rule, the frozen reference (second model or LoRA adapters disabled), cost accounting and evaluation of the result."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tga.cli import main
from tga.data.collator import VLMCollator
from tga.data.dataset import SampleBuilder
from tga.data.templates import get_template
from tga.errors import DataError
from tga.inference import load_chat_model
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm, load_vlm
from tga.unlearn import UnlearnWeights, load_pairs, load_refusals, response_kl, response_nll, unlearn_loss
from tga.unlearn.dataset import pair_record
from tga.unlearn.run import prepare_unlearning, run_unlearn, save_unlearned, train_and_save

STEPS = 6
PROBE = torch.tensor([[1, 415, 3181, 349, 5045, 28723]])  # a few token ids to compare logits on


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def teach(model, tokenizer, pairs, steps: int = 12, lr: float = 1e-2):
    """Fit the tiny random model to the harmful responses, so that there is something to unlearn."""
    builder = SampleBuilder(tokenizer, get_template("llava_llama_2"), None, None, image_token_id(tokenizer),
                            model.config.image_seq_length)
    batch = VLMCollator(tokenizer.pad_token_id)([builder.build(pair_record(pair)) for pair in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="module")
def world(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("unlearn")
    harmful = write_jsonl(root / "harmful.jsonl", [
        {"prompt": f"How do I hurt person {i}?", "response_0": f"Here is how to hurt person {i}: step one.",
         "response_1": "I cannot help with that.", "is_response_0_safe": False, "is_response_1_safe": True}
        for i in range(6)])
    normal = root / "truthfulqa.csv"
    normal.write_text("Type,Category,Question,Best Answer\n" + "".join(
        f"Adversarial,Misc,What colour is item {i}?,Item {i} is blue.\n" for i in range(6)))
    refusals = root / "refusals.txt"
    refusals.write_text("I cannot help with that.\nSorry, I will not do that.\n")
    images = sorted(os.listdir(tiny_assets["image_folder"]))[:4]
    harmful_mm = root / "harmful_mm.json"
    harmful_mm.write_text(json.dumps([
        {"id": f"mm-{i}", "image": name, "conversations": [
            {"from": "human", "value": f"<image>\nHow do I hurt the person in picture {i}?"},
            {"from": "gpt", "value": f"Here is how to hurt them: step {i}."}]} for i, name in enumerate(images)]))
    tokenizer = load_tokenizer(tiny_assets["llm"])
    torch.manual_seed(0)
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer, template="llava_llama_2")
    teach(model, tokenizer, load_pairs(harmful, what="--harmful"))
    folder = root / "taught"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    load_image_processor(tiny_assets["vision"]).save_pretrained(folder)
    return {"root": root, "model": str(folder), "harmful": harmful, "normal": str(normal), "refusals": str(refusals),
            "harmful_mm": str(harmful_mm), "image_folder": tiny_assets["image_folder"]}


def argv(world, out, *flags):
    return ["--model", world["model"], "--harmful", world["harmful"], "--normal", world["normal"],
            "--output_dir", str(out), "--max_steps", str(STEPS), "--logging_steps", "1", "--learning_rate", "2e-3",
            "--dataloader_num_workers", "0", *flags]


def logged(folder, key):
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
        return [entry[key] for entry in json.load(handle)["log_history"] if key in entry]


def cost(folder):
    with open(os.path.join(folder, "cost.json"), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def copy_run(world):
    """A two-model run (frozen second copy as reference), with snapshots taken before training."""
    run = prepare_unlearning(argv(world, world["root"] / "copy"))
    reference_before = {k: v.clone() for k, v in run.trainer.reference.state_dict().items()}
    model_before = {k: v.clone() for k, v in run.model.state_dict().items()}
    out = train_and_save(run)
    return {"run": run, "out": out, "reference_before": reference_before, "model_before": model_before}


@pytest.fixture(scope="module")
def lora_run(world):
    run = prepare_unlearning(argv(world, world["root"] / "lora", "--lora_enable", "true", "--lora_r", "4"))
    run.trainer.train()
    with torch.no_grad():  # before saving: the saved folder has the adapters merged in
        with run.model.disable_adapter():
            base = run.model(input_ids=PROBE).logits
        adapted = run.model(input_ids=PROBE).logits
    save_unlearned(run.trainer, run.model, run.tokenizer, run.image_processor, run.training_args.output_dir, True)
    run.trainer.save_state()
    return {"run": run, "out": run.training_args.output_dir, "base": base, "adapted": adapted}


# ---- data adapters ----

@pytest.mark.slow
def test_adapters_read_pku_plain_truthfulqa_llava_and_refusals(world, tmp_path):
    harmful = load_pairs(world["harmful"], what="--harmful")
    assert [p.response for p in harmful[:2]] == ["Here is how to hurt person 0: step one.",
                                                 "Here is how to hurt person 1: step one."]  # unsafe responses only
    normal = load_pairs(world["normal"], what="--normal")
    assert (normal[3].prompt, normal[3].response) == ("What colour is item 3?", "Item 3 is blue.")
    mm = load_pairs(world["harmful_mm"], what="--harmful")
    assert mm[0].image and mm[0].prompt == "How do I hurt the person in picture 0?" and "<image>" not in mm[0].prompt
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"question": "q?", "answer": "a."}, {"prompt": "p", "is_safe": True,
                                                                                        "response": "fine"}])
    assert [(p.prompt, p.response) for p in load_pairs(plain, what="--normal")] == [("q?", "a.")]
    assert load_refusals(world["refusals"]) == ["I cannot help with that.", "Sorry, I will not do that."]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "r7", "prompt": "only a prompt"}])
    with pytest.raises(DataError, match="r7.*bad.jsonl"):
        load_pairs(bad, what="--harmful")
    safe_only = write_jsonl(tmp_path / "safe.jsonl", [{"prompt": "p", "response_0": "a", "response_1": "b",
                                                       "is_response_0_safe": True, "is_response_1_safe": True}])
    with pytest.raises(DataError, match="--harmful .*safe.jsonl"):
        load_pairs(safe_only, what="--harmful")


# ---- loss terms ----

def test_loss_terms_use_response_tokens_only_and_ascend_on_forget():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, 9, 1]])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert torch.allclose(response_nll(logits, labels), expected)
    assert response_kl(logits, logits.detach().clone(), labels) == 0
    other = logits.detach() + torch.randn_like(logits)
    changed_prompt = other.clone()
    changed_prompt[0, :1] += 5.0  # position 0 predicts a prompt token (label -100 at position 1): not scored
    assert response_kl(logits, other, labels) > 0
    assert torch.allclose(response_kl(logits, other, labels), response_kl(logits, changed_prompt, labels))
    nll = response_nll(logits, labels)
    loss = unlearn_loss(nll, torch.tensor(0.0), torch.tensor(0.0), UnlearnWeights(forget=0.5))
    loss.backward()
    # Gradient ascent: following -grad raises the forget NLL.
    assert response_nll(logits.detach() - 0.5 * logits.grad, labels) > nll.detach()


# ---- training behaviour ----

@pytest.mark.slow
def test_forget_loss_rises_while_normal_kl_stays_small(copy_run):
    forget, kl = logged(copy_run["out"], "unlearn/forget_nll"), logged(copy_run["out"], "unlearn/keep_kl")
    print(f"\nforget NLL {[round(v, 3) for v in forget]}\nkeep KL {[round(v, 5) for v in kl]}")
    assert len(forget) == STEPS
    assert forget[-1] > forget[0] + 0.1
    assert kl[0] == 0.0  # the KL term at step 0: the reference equals the model
    assert max(kl) < 0.3 and max(kl) < forget[-1] - forget[0] + 0.3


@pytest.mark.slow
def test_reference_never_changes_and_only_the_llm_trains(copy_run):
    run = copy_run["run"]
    after = run.trainer.reference.state_dict()
    assert all(torch.equal(after[k], v) for k, v in copy_run["reference_before"].items())
    state, before = run.model.state_dict(), copy_run["model_before"]
    changed = {k for k in before if not torch.equal(state[k], before[k])}
    assert changed and all(k.startswith(("model.language_model.", "lm_head.")) for k in changed)
    assert not any("vision_tower" in k or "multi_modal_projector" in k for k in changed)


@pytest.mark.slow
def test_stopping_rule_fires_on_the_forget_ceiling(world, tmp_path, copy_run):
    ceiling = logged(copy_run["out"], "unlearn/forget_nll")[0] + 0.1  # reached after a few steps (previous test)
    out = run_unlearn(argv(world, tmp_path / "stop", "--forget_ceiling", str(ceiling), "--max_steps", "40"))
    with open(os.path.join(out, "unlearn_summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    forget = logged(out, "unlearn/forget_nll")
    assert 1 < summary["steps"] < 40 and summary["stopped_at"]["step"] == summary["steps"] == len(forget)
    assert forget[-1] > ceiling and all(value <= ceiling for value in forget[:-1])
    assert cost(out)["steps"] == summary["steps"]


@pytest.mark.slow
def test_lora_reference_is_the_adapter_disabled_base_and_uses_less_memory(lora_run, copy_run, world):
    run = lora_run["run"]
    assert run.trainer.reference is None
    kl = logged(lora_run["out"], "unlearn/keep_kl")
    assert kl[0] == 0.0 and logged(lora_run["out"], "unlearn/forget_nll")[-1] > logged(lora_run["out"],
                                                                                       "unlearn/forget_nll")[0]
    # With the adapters disabled the model is the original one, bit for bit.
    with torch.no_grad():
        original = load_vlm(world["model"])(input_ids=PROBE).logits
    assert torch.equal(lora_run["base"], original) and not torch.equal(lora_run["adapted"], original)
    lora_bytes = cost(lora_run["out"])["memory"]["state_bytes_rank0"]
    copy_bytes = cost(copy_run["out"])["memory"]["state_bytes_rank0"]
    print(f"\nstate memory: two-model {copy_bytes['total']} B, LoRA {lora_bytes['total']} B")
    assert lora_bytes["reference"] == 0 and copy_bytes["reference"] > 0
    assert lora_bytes["total"] < copy_bytes["total"]
    # The saved folder is a plain VLM with the adapters merged in: the LLM changed, the vision tower did not.
    merged, source = load_file(os.path.join(lora_run["out"], "model.safetensors")), load_file(
        os.path.join(world["model"], "model.safetensors"))
    assert not any("lora" in key for key in merged)
    assert any(not torch.equal(merged[k], source[k]) for k in merged if "language_model" in k)
    assert all(torch.equal(merged[k], source[k]) for k in merged if "vision_tower" in k)


@pytest.mark.slow
def test_cost_json_counts_tokens_and_flops(copy_run, lora_run):
    text = cost(copy_run["out"])
    assert text["method"] == "unlearn-text" and text["steps"] == STEPS and text["samples"] == 2 * STEPS
    assert text["tokens"]["train"] > text["tokens"]["reference"] > 0
    p = text["parameters"]
    assert text["flops_estimate"]["total"] == 6 * p["trainable"] * text["tokens"]["train"] + 2 * p["reference"] * \
        text["tokens"]["reference"]
    lora = cost(lora_run["out"])
    assert lora["parameters"]["trainable"] < p["trainable"] / 10 and lora["parameters"]["frozen_forward"] > 0


@pytest.mark.slow
def test_multimodal_unlearning_costs_more_per_step(world, tmp_path, copy_run):
    out = run_unlearn(argv(world, tmp_path / "mm", "--harmful", world["harmful_mm"], "--image_folder",
                           world["image_folder"], "--max_steps", "2"))
    mm, text = cost(out), cost(copy_run["out"])
    assert mm["method"] == "unlearn-multimodal"
    assert mm["tokens"]["train"] / mm["steps"] > text["tokens"]["train"] / text["steps"]
    assert mm["parameters"]["frozen_forward"] == mm["parameters"]["frozen"] > 0
    assert logged(out, "unlearn/keep_kl")[0] == 0.0


# ---- the result is still a VLM the evaluation runs on ----

@pytest.mark.slow
def test_unlearned_model_loads_for_chat_and_dsr_evaluation(copy_run, tmp_path):
    chat = load_chat_model(copy_run["out"])
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    assert len(chat.generate([image, None], ["What is this?", "Hello"], max_new_tokens=3)) == 2
    scenes = tmp_path / "scenes" / "gun"
    scenes.mkdir(parents=True)
    image.save(scenes / "0.png")
    code = main(["evaluate", "dsr", "--model", copy_run["out"], "--data", str(tmp_path / "scenes"), "--out",
                 str(tmp_path / "dsr"), "--max_new_tokens", "3", "--prompts", "What is this?"])
    assert code == 0 and os.listdir(tmp_path / "dsr")


@pytest.mark.slow
def test_cli_errors_name_the_option_and_file(world, tmp_path, capsys):
    assert main(["unlearn", "--model", world["model"], "--normal", world["normal"]]) == 2
    assert "--harmful is required" in capsys.readouterr().err
    missing = str(tmp_path / "nope.jsonl")
    assert main(["unlearn", "--model", world["model"], "--harmful", missing, "--normal", world["normal"],
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_shipped_unlearn_recipe_parses_up_to_its_data_files():
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from tga.errors import ConfigError
    from tga.unlearn.config import parse_unlearn_config

    try:
        with pytest.raises(ConfigError, match="--harmful: file not found: data/unlearn/pku_saferlhf_train.jsonl"):
            parse_unlearn_config([os.path.join(os.path.dirname(os.path.dirname(__file__)),
                                               "configs/unlearn/mistral7b.yaml")])
    finally:
        unset_hf_deepspeed_config()


def test_unlearning_has_the_training_stages_fault_handling(world, tmp_path):
    """`tga unlearn` runs with the stages' guards: checkpoints verified by their markers, a resume that refuses a
    changed forget set, and a diverged run that stops with nothing non-finite written."""
    from tga.errors import ConfigError, TrainingDiverged
    from tga.train.integrity import COMPLETE_MARKER, verify

    out = tmp_path / "run"
    run_unlearn(argv(world, out, "--save_strategy", "steps", "--save_steps", "2"))
    assert verify(str(out / "checkpoint-2")) is None and verify(str(out)) is None  # checkpoints and the final folder
    with pytest.raises(ConfigError, match=r"--resume_from_checkpoint .*checkpoint-\d+: .*harmful: "):
        run_unlearn(argv(world, out, "--resume_from_checkpoint", "auto", "--max_steps", str(STEPS + 2),
                         "--harmful", world["normal"]))
    diverged = tmp_path / "diverged"
    with pytest.raises(TrainingDiverged, match="training diverged at step"):
        run_unlearn(argv(world, diverged, "--learning_rate", "1e30"))
    assert not (diverged / COMPLETE_MARKER).exists() and not (diverged / "model.safetensors").exists()
