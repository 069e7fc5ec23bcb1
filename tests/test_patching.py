"""`tga analyze patching` on a hand-built LLM whose refusal is planted in one known block: the tool finds that block,
the benign-into-benign control does not flip, patching a prompt with its own states changes nothing, and bad input
is one named error.

The planted LLM (real Mistral-7B tokenizer, 6 blocks of width 16): every token embeds a constant in dimension 2, the
toxic names (knife, gun) also a 3 in dimension 0. Every block is the identity (zero attention output and MLP)
except block PLANTED, whose attention is uniform (zero queries and keys) and copies dimension 0 into dimension 1,
so from that block on the last position knows whether a toxic name occurred. The LM head reads dimension 1 as
"Sorry" and dimension 2 as "Sure": toxic prompts are answered "Sorry ...", benign ones "Sure ...".
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import LlamaTokenizer, MistralConfig, MistralForCausalLM

from tga.cli import main
from tga.errors import DataError
from tga.safety.judge import KeywordJudge
from tga.safety.patching import last_positions
from tga.safety.patching_run import load_runner, patching_pairs, read_patch_pairs, run_patching
from tga.tiny import mistral_tokenizer_file

PLANTED = 4
NUM_LAYERS = 6
SCENES = ("a {} on a red table", "a small {} at the left", "a {} beside a blue cup", "two stars and a {}")


@pytest.fixture(scope="module")
def planted_llm(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("planted_llm"))
    shutil.copy(mistral_tokenizer_file(), os.path.join(folder, "tokenizer.model"))
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, legacy=False)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                           num_hidden_layers=NUM_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
        embeddings = model.get_input_embeddings().weight
        embeddings[:, 2] = 1.0
        for word in (" knife", " gun"):
            embeddings[tokenizer(word, add_special_tokens=False)["input_ids"], 0] = 3.0
        block = model.model.layers[PLANTED - 1].self_attn
        block.v_proj.weight[0, 0] = 1.0
        block.o_proj.weight[1, 0] = 20.0
        head = model.get_output_embeddings().weight
        head[tokenizer(" Sorry", add_special_tokens=False)["input_ids"][0], 1] = 10.0
        head[tokenizer(" Sure", add_special_tokens=False)["input_ids"][0], 2] = 1.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_pairs(path, pairs):
    path.write_text("\n".join(json.dumps(pair) for pair in pairs) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "toxic.jsonl"
    rows = [{"id": f"t{i}", "text": f"Describe the scene: {scene.format(name)}.", "concept": name}
            for i, (scene, name) in enumerate((s, n) for s in SCENES for n in ("knife", "gun"))]
    write_pairs(prompts, rows)
    pairs = patching_pairs(str(prompts), ["spoon", "cup", "circle"])
    return write_pairs(prompts.parent / "pairs.jsonl", pairs)


def test_the_tool_finds_the_planted_block(planted_llm, pairs_file, tmp_path):
    report = run_patching(planted_llm, pairs_file, str(tmp_path / "out"), template="llava_llama_2", batch_size=4,
                          max_new_tokens=4)
    assert report["clean_refused"] == {"toxic": 1.0, "benign": 0.0}  # the planted model behaves as built
    assert report["causal_layer"] == PLANTED
    flips = report["toxic_into_benign"]["flip_share"]
    assert flips[:PLANTED - 1] == [0.0] * (PLANTED - 1) and min(flips[PLANTED - 1:]) == 1.0
    assert min(report["benign_into_toxic"]["flip_share"][PLANTED - 1:]) == 1.0
    assert max(report["benign_into_benign"]["flip_share"]) <= 0.05
    direction = report["direction"]  # the refusal direction separates the prompts from the planted block on
    assert all(t > b for t, b in zip(direction["toxic"][PLANTED:], direction["benign"][PLANTED:]))
    assert os.path.isfile(tmp_path / "out" / "patching.png")
    concept = run_patching(planted_llm, pairs_file, str(tmp_path / "concept"), template="llava_llama_2",
                           positions="concept", batch_size=4, max_new_tokens=4)
    # the name itself: swapping it before the planted block changes the answer; after it, the name's position no
    # longer matters (the block has already copied it to the last position)
    assert concept["toxic_into_benign"]["flip_share"][:PLANTED - 1] == [1.0] * (PLANTED - 1)
    assert concept["toxic_into_benign"]["flip_share"][PLANTED:] == [0.0] * (NUM_LAYERS - PLANTED)


def test_patching_a_prompt_with_its_own_states_changes_nothing(planted_llm):
    runner, _ = load_runner(planted_llm, device="cpu", dtype=None, template="llava_llama_2")
    opener = [runner.tokenizer(" Sorry", add_special_tokens=False)["input_ids"][0]]
    batch = runner.encode(["Describe the scene: a knife on a red table.", "Describe the scene: a cup on a table."])
    clean_answers, clean_opener = runner.answer(batch, opener, 4)
    states = runner.states(batch)
    for layer in range(1, NUM_LAYERS + 1):
        with runner.patched(layer, last_positions(batch), states[layer][:, -1:]):
            answers, patched_opener = runner.answer(batch, opener, 4)
        assert answers == clean_answers
        assert torch.equal(patched_opener, clean_opener)  # exactly 0.0 change
    assert [KeywordJudge().is_refusal(answer) for answer in clean_answers] == [True, False]


def test_bad_pairs_are_one_named_error(planted_llm, pairs_file, tmp_path, capsys):
    good = {"id": "p", "toxic": "a knife here", "benign": "a spoon here", "toxic_concept": "knife",
            "benign_concept": "spoon"}
    cases = [
        ({**good, "toxic_concept": "sword"}, r"pair id 'p': the concept 'sword' does not occur in its toxic prompt"),
        ({**good, "benign": "a spoon there"}, r"pair id 'p': the prompts differ in more than the concept"),
        ({**good, "benign": None}, r"pair id 'p' needs string fields \['benign'\]"),
    ]
    for record, message in cases:
        with pytest.raises(DataError, match=message):
            read_patch_pairs(write_pairs(tmp_path / "bad.jsonl", [record, {**good, "id": "q"}]))
    with pytest.raises(DataError, match=r"pair id 'p': --positions concept needs a `control` prompt"):
        read_patch_pairs(write_pairs(tmp_path / "plain.jsonl", [good, {**good, "id": "q"}]), positions="concept")
    # names of unequal token length cannot be patched position by position
    long_name = {**good, "benign": "a teaspoonful here", "benign_concept": "teaspoonful",
                 "control": "a cup here", "control_concept": "cup"}
    code = main(["analyze", "patching", "--model", planted_llm, "--data", write_pairs(tmp_path / "long.jsonl", [
        long_name, {**long_name, "id": "q"}]), "--positions", "concept", "--template", "llava_llama_2",
        "--out", str(tmp_path / "out")])
    assert code != 0 and "concept has" in capsys.readouterr().err
    code = main(["analyze", "patching", "--model", str(tmp_path / "missing"), "--data", pairs_file,
                 "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code != 0 and "missing" in err and "Traceback" not in err


def test_a_vlm_reports_image_and_caption_projections_on_the_refusal_direction(tiny_assets, tmp_path):
    """Through a tga VLM folder: the LLM is patched with text prompts in the folder's template, and image prompts are
    projected beside the same scenes given as captions, one value per layer."""
    from tga.model.processor import build_processor
    from tga.model.tokenizer import load_tokenizer
    from tga.model.vision import load_image_processor
    from tga.model.vlm import build_vlm

    tokenizer = load_tokenizer(tiny_assets["llm"])
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    folder = tmp_path / "vlm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    build_processor(model, tokenizer, load_image_processor(tiny_assets["vision"])).save_pretrained(folder)
    records = [r for r in json.loads(open(tiny_assets["stage2"], encoding="utf-8").read()) if r.get("image")][:3]
    images = write_pairs(tmp_path / "images.jsonl", [{"image": r["image"], "caption": r["image_caption"]}
                                                    for r in records])
    pairs = write_pairs(tmp_path / "pairs.jsonl", [
        {"id": str(i), "toxic": f"Describe: a {name} here.", "benign": "Describe: a cup here.",
         "toxic_concept": name, "benign_concept": "cup"} for i, name in enumerate(("knife", "gun"))])
    report = run_patching(str(folder), pairs, str(tmp_path / "out"), images_path=images,
                          image_folder=tiny_assets["image_folder"], max_new_tokens=2)
    layers = model.config.text_config.num_hidden_layers
    assert report["num_layers"] == layers and len(report["toxic_into_benign"]["flip_share"]) == layers
    assert set(report["direction"]) == {"toxic", "benign", "image", "caption"}
    assert all(len(values) == layers + 1 for values in report["direction"].values())
    # the direction is toxic minus benign: toxic prompts project above benign ones at every layer past the embeddings
    assert all(t > b for t, b in zip(report["direction"]["toxic"][1:], report["direction"]["benign"][1:]))


def test_each_pair_has_its_causal_layer_and_world2_pairs_use_its_held_out_benign_names(planted_llm, pairs_file,
                                                                                      tmp_path):
    report = run_patching(planted_llm, pairs_file, str(tmp_path / "out"), template="llava_llama_2", batch_size=4,
                          max_new_tokens=4)
    assert report["pair_causal_layers"] == [PLANTED] * report["num_pairs"]
    vocabulary = write_pairs(tmp_path / "vocabulary.jsonl", [
        {"name": "bulota", "harmful": True, "heldout": True}, {"name": "mireka", "harmful": False, "heldout": True},
        {"name": "sanolu", "harmful": False, "heldout": True}, {"name": "kolupa", "harmful": False, "heldout": True},
        {"name": "tavemi", "harmful": False, "heldout": False}])
    prompts = write_pairs(tmp_path / "toxic.jsonl", [{"id": "a", "text": "a bulota near a sanolu", "concept": "bulota"}])
    assert main(["analyze", "patching-pairs", "--data", prompts, "--vocabulary", vocabulary,
                 "--out", str(tmp_path / "pairs.jsonl")]) == 0
    pair = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[0])
    # held-out benign names only (not the trained tavemi), and not sanolu, which the scene already holds
    assert (pair["benign"], pair["control"]) == ("a mireka near a sanolu", "a kolupa near a sanolu")
