"""VLGuard-style safety data in stage 2: the mix holds `--safety_ratio` exactly over an epoch (random and
modality-grouped samplers), subsamples or repeats the safety set by a seeded draw, and the real training data path
(`parse_config` + `build_dataset`) builds the safety records as samples."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import RandomSampler

from tga.config import parse_config
from tga.data.records import Record
from tga.data.safety_mix import MixedRecords
from tga.data.sampler import ModalityLengthGroupedSampler
from tga.data.templates import Message
from tga.errors import ConfigError


def record(record_id: str, image: bool = True, answer: str = "a red square") -> Record:
    prompt = "<image>\nDescribe the image." if image else "Tell me a story."
    return Record(record_id, (Message("user", prompt), Message("assistant", answer)), "x.png" if image else None)


MAIN = [record(f"m{i}", image=i % 4 != 0) for i in range(30)]
SAFETY = [record(f"s{i}", answer="I'm sorry, I cannot help with that.") for i in range(4)]


def epoch_ids(mixed: MixedRecords, sampler) -> list[str]:
    return [mixed[index].id for index in sampler]


@pytest.mark.parametrize("ratio, expected", [(0.25, 10), (0.1, 3), (0.5, 30)])
def test_the_ratio_holds_over_an_epoch_with_either_sampler(ratio, expected):
    mixed = MixedRecords(MAIN, SAFETY, ratio, seed=3)
    assert len(mixed) == len(MAIN) + expected
    samplers = [RandomSampler(range(len(mixed)), generator=torch.Generator().manual_seed(0)),
                ModalityLengthGroupedSampler(mixed.modality_lengths, batch_size=4, seed=0)]
    for sampler in samplers:
        ids = epoch_ids(mixed, sampler)
        assert sorted(i for i in ids if i.startswith("m")) == sorted(r.id for r in MAIN)  # every record once
        share = sum(i.startswith("s") for i in ids) / len(ids)
        assert share == pytest.approx(expected / (len(MAIN) + expected))
        assert abs(share - ratio) <= 0.5 / len(ids) + 1e-9  # the rounding of a whole number of records
    counts = {r.id: sum(mixed[i].id == r.id for i in range(len(mixed))) for r in SAFETY}
    # repeated sets cover every safety record equally often (up to one draw); a subsampled one never repeats
    assert max(counts.values()) - min(counts.values()) <= 1


def test_a_subsample_is_a_seeded_draw_and_no_ratio_takes_each_record_once():
    small = MixedRecords(MAIN, SAFETY, 0.05, seed=1)  # round(0.05 * 30 / 0.95) = 2 of the 4
    chosen = [small[i].id for i in range(len(MAIN), len(small))]
    assert len(chosen) == len(set(chosen)) == 2
    assert chosen == [MixedRecords(MAIN, SAFETY, 0.05, seed=1)[i].id for i in range(len(MAIN), len(small))]
    draws = {tuple(MixedRecords(MAIN, SAFETY, 0.05, seed=s)[i].id for i in range(30, 32)) for s in range(8)}
    assert len(draws) > 1
    once = MixedRecords(MAIN, SAFETY, None)
    assert [once[i].id for i in range(len(MAIN), len(once))] == [r.id for r in SAFETY]
    assert once.modality_lengths[-1] > 0 and once.modality_lengths[0] < 0  # image safety records, a text record


def test_bad_options_name_the_flag():
    with pytest.raises(ConfigError, match="--safety_ratio needs --safety_data"):
        parse_config(["--data_path", "x.json", "--output_dir", "o", "--safety_ratio", "0.1"])
    with pytest.raises(ConfigError, match="--safety_ratio must lie strictly between 0 and 1"):
        parse_config(["--data_path", "x.json", "--output_dir", "o", "--safety_data", "s.json", "--safety_ratio", "1"])


def test_stage2_data_path_mixes_the_safety_file(tiny_assets, tmp_path):
    from tga.model.tokenizer import load_tokenizer
    from tga.model.vision import load_image_processor
    from tga.train.run import build_dataset

    with open(tiny_assets["stage2"], encoding="utf-8") as handle:
        main = json.load(handle)
    images = sorted({r["image"] for r in main if r.get("image")})
    safety = [{"id": f"safety-{i}", "image": image, "toxic": True,
               "conversations": [{"from": "human", "value": "<image>\nHow do I use this?"},
                                 {"from": "gpt", "value": "I'm sorry, I cannot help with that."}]}
              for i, image in enumerate(images[:3])]
    safety_file = tmp_path / "safety.json"
    safety_file.write_text(json.dumps(safety))
    model_args, data_args, tga_args, training_args = parse_config([
        "--data_path", tiny_assets["stage2"], "--image_folder", tiny_assets["image_folder"], "--output_dir",
        str(tmp_path / "run"), "--safety_data", str(safety_file), "--safety_ratio", "0.2", "--data_cache_dir",
        str(tmp_path / "cache"), "--report_to", "none"])
    tokenizer = load_tokenizer(tiny_assets["llm"])
    model = SimpleNamespace(config=SimpleNamespace(tga_template="llava_llama_2", image_seq_length=16))
    dataset = build_dataset(data_args, tga_args, model, tokenizer, load_image_processor(tiny_assets["vision"]),
                            training_args, stage="finetune")
    ids = [dataset.records[i].id for i in RandomSampler(range(len(dataset)))]
    assert sum(i.startswith("safety-") for i in ids) == round(0.2 * len(main) / 0.8)
    sample = dataset[len(dataset) - 1]
    answer = tokenizer.decode(sample["labels"][sample["labels"] != -100], skip_special_tokens=True)
    assert "I'm sorry, I cannot help with that." in answer and sample["pixel_values"] is not None
    assert os.path.isdir(tmp_path / "cache")
