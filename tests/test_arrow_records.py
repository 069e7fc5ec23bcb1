"""Arrow-backed records: the same samples, in the same order, with the same tokens as the in-memory path; errors that
name the record and the file; saved dataset folders as `--data_path`; the cache; dataloader workers."""

import dataclasses
import json
import os

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from tga.data.arrow_records import ArrowSupervisedDataset, convert, open_records
from tga.data.collator import VLMCollator
from tga.data.dataset import LazySupervisedDataset, SampleBuilder
from tga.data.records import load_records
from tga.data.sampler import ModalityLengthGroupedSampler
from tga.data.templates import get_template
from tga.errors import DataError
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.model.vision import load_image_processor
from tga.records_io import load_records as read_json_records


def make_builder(assets, template="llava_llama_2", **options):
    tokenizer = load_tokenizer(assets["llm"])
    return SampleBuilder(tokenizer=tokenizer, template=get_template(template),
                         image_processor=load_image_processor(assets["vision"]), image_folder=assets["image_folder"],
                         image_token_id=image_token_id(tokenizer), num_image_tokens=16, max_length=512, **options)


def assert_same_sample(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(path)


@pytest.mark.parametrize("data, template, num_proc", [("stage2", "llava_llama_2", 2), ("stage1", "plain", None)])
def test_same_records_samples_and_order_as_in_memory(tiny_assets, tmp_path, data, template, num_proc):
    builder = make_builder(tiny_assets, template, use_retrieved=data == "stage2", caption_target=True)
    path = tiny_assets[data]
    memory = LazySupervisedDataset(load_records(path), builder)
    arrow = ArrowSupervisedDataset(open_records(path, cache_dir=str(tmp_path / "cache"), num_proc=num_proc), builder)
    assert len(arrow) == len(memory) > 10
    assert list(arrow.records) == list(memory.records)  # every Record field, record by record
    assert arrow.modality_lengths == memory.modality_lengths
    for index in range(len(memory)):
        assert_same_sample(arrow[index], memory[index])
    # The grouped sampler sees the same lengths, so it yields the same order.
    order = [list(ModalityLengthGroupedSampler(d.modality_lengths, batch_size=2, seed=3)) for d in (memory, arrow)]
    assert order[0] == order[1]


def test_jsonl_and_several_parts_concatenate_in_order(tiny_assets, tmp_path):
    stage2 = read_json_records(tiny_assets["stage2"])
    part = write_jsonl(tmp_path / "part.jsonl", stage2[:5])
    records = open_records(f"{part},{tiny_assets['stage1']}", cache_dir=str(tmp_path / "cache"))
    expected = load_records(part) + load_records(tiny_assets["stage1"])
    assert list(records) == expected and records[-1] == expected[-1] and records[1:3] == expected[1:3]


def test_saved_dataset_folder_as_data_path(tiny_assets, tmp_path):
    folder = str(tmp_path / "saved")
    Dataset.from_list(read_json_records(tiny_assets["stage2"])).save_to_disk(folder)
    records = open_records(folder, cache_dir=str(tmp_path / "cache"))
    assert list(records) == load_records(tiny_assets["stage2"])


def bad_record(record_id):
    return {"id": record_id, "image": "x.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                                 {"from": "gpt", "value": "x"}]}


@pytest.mark.parametrize("suffix, num_proc", [(".json", 2), (".jsonl", None)])
def test_errors_name_the_record_and_file(tiny_assets, tmp_path, suffix, num_proc):
    good = read_json_records(tiny_assets["stage2"])
    path = str(tmp_path / f"data{suffix}")
    rows = good[:7] + [bad_record("bad-7"), {"id": 99, "conversations": []}] + good[7:]
    if suffix == ".json":
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(rows, handle)
    else:
        write_jsonl(path, rows)
    with pytest.raises(DataError) as error:
        open_records(path, cache_dir=str(tmp_path / "cache"), num_proc=num_proc)
    assert "record 'bad-7'" in str(error.value) and path in str(error.value) and "<image>" in str(error.value)
    # The same cache serves --skip_bad_records: bad records are left out and listed.
    kept = open_records(path, cache_dir=str(tmp_path / "cache"), skip_bad=True)
    assert list(kept) == load_records(tiny_assets["stage2"])
    assert [(r["id"], r["source"], r["stage"]) for r in kept.rejected] == [("bad-7", path, "load"), ("99", path, "load")]
    assert "missing or empty `conversations`" in kept.rejected[1]["error"]


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(bad_record("a")) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        open_records(str(path), cache_dir=str(tmp_path / "cache"))


def test_image_check_names_record_and_path(tiny_assets, tmp_path):
    records = read_json_records(tiny_assets["stage2"])
    image_record = next(r for r in records if r.get("image"))
    missing = dict(image_record, id="lost", image="nowhere/missing.png")
    escaping = dict(image_record, id="escape", image="../outside.png")
    path = write_jsonl(tmp_path / "data.jsonl", records + [missing, escaping])
    options = {"cache_dir": str(tmp_path / "cache"), "image_folder": tiny_assets["image_folder"], "check_images": True}
    with pytest.raises(DataError, match=r"record 'lost': image not found: .*missing\.png"):
        open_records(path, **options)
    kept = open_records(path, skip_bad=True, **options)
    assert len(kept) == len(records) and [r["id"] for r in kept.rejected] == ["lost", "escape"]
    assert "outside the image folder" in kept.rejected[1]["error"]


def test_cache_is_reused_and_follows_file_changes(tiny_assets, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", read_json_records(tiny_assets["stage2"])[:4])
    cache = str(tmp_path / "cache")
    first = convert(path, cache)
    stamp = os.stat(first).st_mtime_ns
    assert convert(path, cache) == first and os.stat(first).st_mtime_ns == stamp  # warm: opened, not rebuilt
    write_jsonl(path, read_json_records(tiny_assets["stage2"])[:3])
    second = convert(path, cache)
    assert second != first and len(open_records(path, cache_dir=cache)) == 3
    assert not [name for name in os.listdir(cache) if name.startswith(".")]  # no work folders left behind


def test_dataloader_workers_give_the_same_batches(tiny_assets, tmp_path):
    builder = make_builder(tiny_assets, use_retrieved=True, caption_target=True)
    dataset = ArrowSupervisedDataset(open_records(tiny_assets["stage2"], cache_dir=str(tmp_path / "cache")), builder)
    collator = VLMCollator(builder.tokenizer.pad_token_id)
    order = list(ModalityLengthGroupedSampler(dataset.modality_lengths, batch_size=4, seed=0))[:16]
    loaders = [DataLoader(dataset, batch_size=4, sampler=order, collate_fn=collator, num_workers=workers,
                          persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
               for workers in (0, 2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == 4
    for plain, parallel in zip(*batches, strict=True):
        plain, parallel = flat(plain), flat(parallel)
        assert plain.keys() == parallel.keys() and "pixel_values" in plain and "guide.guide_ids" in plain
        for key in plain:  # tensors, None, and the guide samples' record ids (a list: the caption-state bank's rows)
            same = torch.equal(plain[key], parallel[key]) if torch.is_tensor(plain[key]) else plain[key] == parallel[key]
            assert same, key


def flat(batch: dict) -> dict:
    """A collated batch with its GuideBatch spread into `guide.<field>` entries."""
    guide = batch["guide"]
    return {**{k: v for k, v in batch.items() if k != "guide"},
            **{f"guide.{f.name}": getattr(guide, f.name) for f in dataclasses.fields(guide)}}


def test_images_decode_in_workers_through_the_trainer(tiny_assets, tmp_path):
    """TGATrainer's own dataloader with persistent workers and prefetch, over the Arrow dataset and the collator."""
    from tga.config import TrainingArguments
    from tga.train.trainer import TGATrainer

    builder = make_builder(tiny_assets, use_retrieved=True, caption_target=True)
    dataset = ArrowSupervisedDataset(open_records(tiny_assets["stage2"], cache_dir=str(tmp_path / "cache")), builder)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=4,
                             dataloader_num_workers=1, dataloader_persistent_workers=True,
                             dataloader_prefetch_factor=2, group_by_modality_length=True)
    trainer = TGATrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=dataset,
                         data_collator=VLMCollator(builder.tokenizer.pad_token_id))
    loader = trainer.get_train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[1:] == (3, 32, 32)
    assert len(loader) == (len(dataset) + 3) // 4



def test_image_check_follows_symlinks_and_rejects_folders(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "sub" / "x.png")
    (images / "link.png").symlink_to(images / "sub" / "x.png")
    (images / "dir.png").mkdir()
    rows = [{"id": name, "image": name, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                          {"from": "gpt", "value": "A square."}]}
            for name in ("sub/x.png", "link.png", "dir.png", "sub/../sub/x.png")]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    kept = open_records(path, cache_dir=str(tmp_path / "cache"), image_folder=str(images), check_images=True,
                        skip_bad=True)
    assert [record.id for record in kept] == ["sub/x.png", "link.png", "sub/../sub/x.png"]
    assert [r["id"] for r in kept.rejected] == ["dir.png"] and "image not found" in kept.rejected[0]["error"]
