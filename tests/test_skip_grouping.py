"""`--skip_bad_records` with `--group_by_modality_length`: records left out at start-up contribute no length to the
sampler, so a grouped run trains on the kept records only, on one file or several, in one process and on 2 ranks.

Bad records of every start-up kind (a turn order that does not parse, a missing image, an image path escaping the
folder, the wrong number of `<image>` placeholders) and one image that fails to decode at access time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from tga.config import TrainingArguments
from tga.data.arrow_records import ArrowSupervisedDataset, open_records
from tga.data.dataset import modality_length
from tga.data.guard import REPORT_FILE, BadRecordLog, GuardedDataset
from tga.options import load_config
from tga.train.distributed import free_port
from tga.train.run import run_stage
from tga.train.trainer import TGATrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD_BAD = ["bad-order", "bad-missing", "bad-escape", "bad-placeholders"]
DECODE_BAD = "bad-decode"


@pytest.fixture(scope="module")
def bad_data(tiny_assets, tmp_path_factory):
    """The tiny stage-2 records with bad ones spread over them; as one file and split in two files."""
    root = tmp_path_factory.mktemp("skip_grouping")
    images = root / "images"
    shutil.copytree(tiny_assets["image_folder"], images)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    records = json.loads(open(tiny_assets["stage2"], encoding="utf-8").read())
    image = next(record for record in records if "image" in record)
    bad = {
        "bad-order": {"id": "bad-order", "conversations": [{"from": "gpt", "value": "an answer first"}]},
        "bad-missing": {**image, "id": "bad-missing", "image": "nowhere.png"},
        "bad-escape": {**image, "id": "bad-escape", "image": "../outside.png"},
        "bad-placeholders": {**image, "id": "bad-placeholders", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nTwo?"}, {"from": "gpt", "value": "One."}]},
        DECODE_BAD: {**image, "id": DECODE_BAD, "image": "corrupt.png"},
    }
    for position, record in zip((2, 9, 15, 21, 27), bad.values(), strict=True):
        records.insert(position, record)
    single = root / "single.json"
    single.write_text(json.dumps(records))
    halves = [root / "part1.json", root / "part2.jsonl"]
    halves[0].write_text(json.dumps(records[:17]))
    halves[1].write_text("".join(json.dumps(record) + "\n" for record in records[17:]))
    good = [str(record["id"]) for record in records if record["id"] not in LOAD_BAD]
    return {"single": str(single), "multi": ",".join(str(path) for path in halves), "images": str(images),
            "kept": good, "root": root}


def full_megabatches(lengths, megabatch):
    """How many megabatches the grouped sampler fills with one modality (image records, then text-only ones)."""
    return sum(length > 0 for length in lengths) // megabatch + sum(length < 0 for length in lengths) // megabatch


def grouped_batches(dataset, batch_size, world_size=1):
    trainer_args = TrainingArguments(output_dir="unused", report_to="none", per_device_train_batch_size=batch_size,
                                     group_by_modality_length=True)
    trainer = TGATrainer(model=torch.nn.Linear(1, 1), args=trainer_args, train_dataset=dataset,
                         data_collator=lambda samples: samples)
    order = list(trainer._get_train_sampler())
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@pytest.mark.parametrize("layout", ["single", "multi"])
def test_skipped_records_contribute_no_length_and_batches_hold_kept_records(bad_data, tmp_path, layout):
    records = open_records(bad_data[layout], cache_dir=str(tmp_path / "cache"), image_folder=bad_data["images"],
                           check_images=True, skip_bad=True)
    assert sorted(entry["id"] for entry in records.rejected) == sorted(LOAD_BAD)
    assert [record.id for record in records] == bad_data["kept"]
    # One length per kept record, each the record's own (the stored column of the rows left out is not read).
    assert records.modality_lengths == [modality_length(record) for record in records]
    dataset = GuardedDataset(ArrowSupervisedDataset(records, builder=None), BadRecordLog(None), skip_bad=True)
    batches = grouped_batches(dataset, batch_size=4)
    indices = [index for batch in batches for index in batch]
    assert sorted(indices) == list(range(len(bad_data["kept"])))  # every kept record once per epoch, no other
    for batch in batches[:full_megabatches(records.modality_lengths, 4)]:  # the partial ones of both go last
        assert len({records[index].image is None for index in batch}) == 1, batch


def test_an_empty_text_only_record_has_a_length_the_sampler_accepts(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"id": "empty", "conversations": [{"from": "human", "value": " "},
                                                                  {"from": "gpt", "value": ""}]}) + "\n")
    records = open_records(str(path), cache_dir=str(tmp_path / "cache"))
    assert records.modality_lengths == [-1]


def stage2_config(tmp_path, bad_data, data_path):
    """The tiny TGA stage-2 recipe (grouping on) in one process: no DeepSpeed, a fresh projector."""
    recipe = load_config(os.path.join(REPO, "configs/finetune/tiny_cpu_tga.yaml"))
    for key in ("deepspeed", "pretrain_mm_mlp_adapter"):
        recipe.pop(key)
    assert recipe["group_by_modality_length"] is True
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "data_path": data_path, "image_folder": bad_data["images"],
                                    "skip_bad_records": True, "tga_layers": "1-3"}))
    return str(path)


def read_report(output_dir):
    with open(os.path.join(output_dir, REPORT_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def test_grouped_run_with_skipping_trains_in_one_process(tiny_assets, bad_data, tmp_path):
    out = tmp_path / "run"
    run_stage("finetune", [stage2_config(tmp_path, bad_data, bad_data["single"]), "--model_name_or_path",
                           tiny_assets["llm"], "--vision_tower", tiny_assets["vision"], "--output_dir", str(out),
                           "--per_device_train_batch_size", "4"])
    report = read_report(out)
    assert {entry["id"]: entry["stage"] for entry in report["skipped"]} == {
        **dict.fromkeys(LOAD_BAD, "load"), DECODE_BAD: "skipped"}
    state = json.loads((out / "trainer_state.json").read_text())
    kept = len(bad_data["kept"])
    assert state["global_step"] == (kept + 3) // 4  # one epoch over the kept records only


RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from tga.config import parse_config
    from tga.data.arrow_records import ArrowSupervisedDataset, open_records
    from tga.data.guard import BadRecordLog, GuardedDataset
    from tga.train.distributed import prepare_process
    from tga.train.trainer import TGATrainer

    _, data_args, _, args = parse_config(prepare_process(sys.argv[1:]))
    with args.main_process_first(desc="records to Arrow"):
        records = open_records(data_args.data_path, cache_dir=data_args.data_cache_dir,
                               image_folder=data_args.image_folder, check_images=True, skip_bad=True)
    dataset = GuardedDataset(ArrowSupervisedDataset(records, None), BadRecordLog(None), skip_bad=True)
    trainer = TGATrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=dataset,
                         data_collator=lambda samples: samples)
    loader = trainer.get_train_dataloader()
    batches = [[records[i].id for i in batch] for batch in loader.batch_sampler]
    with open(os.path.join(args.output_dir, f"rank{args.process_index}.json"), "w") as handle:
        json.dump({"batches": batches, "image": {r.id: r.image is not None for r in records}}, handle)
""")


@pytest.mark.distributed
def test_grouped_batches_on_two_ranks_hold_only_kept_records(bad_data, tmp_path):
    """The trainer's own dataloader on 2 ranks (accelerate shards the grouped sampler's batches)."""
    script = tmp_path / "rank_batches.py"
    script.write_text(RANK_SCRIPT)
    output = tmp_path / "ranks"
    output.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), "--data_path", bad_data["multi"], "--image_folder", bad_data["images"],
               "--data_cache_dir", str(tmp_path / "cache"), "--output_dir", str(output), "--report_to", "none",
               "--group_by_modality_length", "true", "--skip_bad_records", "true",
               "--per_device_train_batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    seen = [record_id for rank in ranks for batch in rank["batches"] for record_id in batch]
    assert set(seen) == set(bad_data["kept"]) and not set(seen) & set(LOAD_BAD)
    modality = ranks[0]["image"]
    full = full_megabatches([1 if has_image else -1 for has_image in modality.values()], 4)
    steps = list(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True))
    assert full >= 5
    for first, second in steps[:full]:  # a step's megabatch (2 ranks x 2) is one modality
        assert len({modality[record_id] for record_id in first + second}) == 1, (first, second)


@pytest.mark.distributed
def test_grouped_run_with_skipping_trains_on_two_ranks_from_several_files(tiny_assets, bad_data, tmp_path,
                                                                          launch_stage):
    out = launch_stage("finetune.py", "configs/finetune/tiny_cpu_tga.yaml", str(tmp_path / "run"), tiny_assets,
                       "--image_folder", bad_data["images"], "--data_path", bad_data["multi"],
                       "--skip_bad_records", "true", "--pretrain_mm_mlp_adapter", "", "--tga_layers", "1-3",
                       "--per_device_train_batch_size", "2")
    report = read_report(out)
    assert {entry["id"]: entry["stage"] for entry in report["skipped"]} == {
        **dict.fromkeys(LOAD_BAD, "load"), DECODE_BAD: "skipped"}
    state = json.loads(open(os.path.join(out, "trainer_state.json"), encoding="utf-8").read())
    assert state["global_step"] == -(-len(bad_data["kept"]) // 4)  # 2 ranks x 2 per step, kept records only
