"""benchmarks/data_pipeline.py

The data pipeline at LLaVA scale, measured in one run on a generated set of LLaVA-shaped records (multi-turn
conversations, captions, retrieved text, 10% text-only) whose images are real JPEG files written here:
  records   start-up time and records-only RSS per process of `json.load`, of the in-memory path
            (`tga.data.records.load_records`: a list of `Record`s) and of the Arrow path (`open_records`), first
            conversion (cold cache), warm start, and warm start with the image-path check training runs; each in a
            fresh process, so RSS is its own
  loader    samples/s of dataset + collator (image decode, pad to square, CLIP preprocessing at 336 px,
            tokenization with spans, caption pass, padding) through a DataLoader with 0, 1 and 2 workers
  model     the training step rate (samples/s) of the tiny-but-not-trivial model of benchmarks/tga_overhead.py
            (8 layers, hidden 256, 576 image tokens + 300 text tokens), plain and with the TGA guide loss
Targets (issue 10): warm start <= 1 s, Arrow RSS <= 10% of json.load, loader >= 5x the model's samples/s.

    .venv/bin/python benchmarks/data_pipeline.py [--records 100000] [--images 1000] [--batch 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tga_overhead import build, run_variant  # noqa: E402  (the same model as the TGA overhead benchmark)

WORDS = ("the a red blue green small large dog cat person table knife cup street car tree house window sign holding "
         "standing next to on in near with two three sitting looking white black wooden old young").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def generate(workdir: str, num_records: int, num_images: int, seed: int = 0) -> str:
    """Write `num_images` JPEG files and a JSON list of `num_records` records using them; returns the JSON path."""
    from PIL import Image, ImageDraw
    from tqdm import tqdm

    path = os.path.join(workdir, f"records_{num_records}.json")
    if os.path.exists(path):
        return path
    rng = random.Random(seed)
    image_dir = os.path.join(workdir, "images")
    os.makedirs(image_dir, exist_ok=True)
    for index in tqdm(range(num_images), desc="images"):
        size = (rng.randint(320, 640), rng.randint(240, 480))  # COCO-like aspect ratios, smaller files
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            box = sorted(rng.randrange(size[0]) for _ in range(2)), sorted(rng.randrange(size[1]) for _ in range(2))
            draw.rectangle([box[0][0], box[1][0], box[0][1], box[1][1]], fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(os.path.join(image_dir, f"{index:06d}.jpg"), quality=90)
    records = []
    for index in tqdm(range(num_records), desc="records"):
        turns = []
        for _ in range(rng.randint(1, 3)):
            question = sentence(rng, 6, 16) + "?"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": sentence(rng, 10, 40) + "."}]
        record = {"id": f"{index:09d}", "conversations": turns}
        if rng.random() < 0.9:
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
            record.update(image=f"{rng.randrange(num_images):06d}.jpg", image_caption=sentence(rng, 8, 20),
                          retrieved_caption=sentence(rng, 8, 20), toxic=rng.random() < 0.05)
        records.append(record)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    os.replace(path + ".tmp", path)
    return path


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory of this process; `RssAnon` leaves out file-backed pages (memory-mapped Arrow, shared)."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_records(phase: str, data: str, cache_dir: str, num_proc: int) -> dict:
    """One start-up measurement in this (fresh) process: seconds and RSS growth, imports excluded."""
    from tga.data.arrow_records import open_records
    from tga.data.records import load_records

    gc.collect()
    before, anon_before = rss_mb(), rss_mb("RssAnon")
    started = time.perf_counter()
    if phase == "json":
        with open(data, encoding="utf-8") as handle:
            held = json.load(handle)
    elif phase == "memory":
        held = load_records(data)
    elif phase == "arrow_checked":  # what training does: also check every image path (a folder listing, no stat)
        held = open_records(data, cache_dir=cache_dir, image_folder=os.path.join(os.path.dirname(data), "images"),
                            check_images=True)
    else:
        held = open_records(data, cache_dir=cache_dir, num_proc=num_proc if phase == "arrow_cold" else None)
    seconds = time.perf_counter() - started
    gc.collect()
    result = {"phase": phase, "records": len(held), "seconds": seconds, "rss_mb": rss_mb() - before,
              "anon_mb": rss_mb("RssAnon") - anon_before}
    if phase.startswith("arrow"):
        lengths = held.modality_lengths  # what the trainer asks for once, for the grouped sampler
        result["anon_with_lengths_mb"] = rss_mb("RssAnon") - anon_before
        del lengths
        # Touch 1000 random records: file-backed pages of the memory map (shared by all processes), no copies.
        for index in random.Random(0).sample(range(len(held)), 1000):
            held[index]
        result["rss_after_access_mb"] = rss_mb() - before
        result["anon_after_access_mb"] = rss_mb("RssAnon") - anon_before
    return result


def loader_rate(data: str, cache_dir: str, workdir: str, batch: int, batches: int, workers: int) -> float:
    """Samples/s of dataset + collator through a DataLoader (random order), after the first batch."""
    from torch.utils.data import DataLoader, RandomSampler

    from tga.data.arrow_records import ArrowSupervisedDataset, open_records
    from tga.data.collator import VLMCollator
    from tga.data.dataset import SampleBuilder
    from tga.data.templates import get_template
    from tga.model.tokenizer import image_token_id
    from tga.model.vision import load_image_processor

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build(tmp, "cpu")
        processor = load_image_processor(os.path.join(tmp, "vision"))
    builder = SampleBuilder(tokenizer=tokenizer, template=get_template("llava_llama_2"), image_processor=processor,
                            image_folder=os.path.join(workdir, "images"), image_token_id=image_token_id(tokenizer),
                            num_image_tokens=model.config.image_seq_length, max_length=2048, use_retrieved=True,
                            caption_target=True)
    del model
    # Workers run torch with one thread; the main process (0 workers) does the same here, since on a loaded machine
    # its default intra-op threads oversubscribe the cores and make CLIP normalisation several times slower.
    torch.set_num_threads(1)
    dataset = ArrowSupervisedDataset(open_records(data, cache_dir=cache_dir), builder)
    loader = DataLoader(dataset, batch_size=batch, sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)),
                        collate_fn=VLMCollator(tokenizer.pad_token_id), num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not throughput
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - started)


def in_subprocess(*flags: str) -> dict:
    output = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], capture_output=True, text=True,
                            check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=2, help="samples per batch (loader and model)")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per loader setting")
    parser.add_argument("--steps", type=int, default=3, help="model steps timed (median)")
    parser.add_argument("--num_proc", type=int, default=2, help="processes for the first conversion")
    parser.add_argument("--workdir", help="where data and images are generated (kept; default: a temporary folder)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="tga_data_bench_")
    data, cache_dir = os.path.join(workdir, f"records_{args.records}.json"), os.path.join(workdir, "arrow_cache")
    if args.phase == "loader":
        rate = loader_rate(data, cache_dir, workdir, args.batch, args.batches, args.workers)
        print(json.dumps({"workers": args.workers, "samples_per_s": rate}))
        return
    if args.phase:
        print(json.dumps(measure_records(args.phase, data, cache_dir, args.num_proc)))
        return

    generate(workdir, args.records, args.images)
    size_mb = os.path.getsize(data) / 2**20
    shutil.rmtree(cache_dir, ignore_errors=True)  # the first conversion is measured on an empty cache
    start = {phase: in_subprocess("--phase", phase, "--workdir", workdir, "--records", str(args.records),
                                  "--num_proc", str(args.num_proc))
             for phase in ("json", "memory", "arrow_cold", "arrow_warm", "arrow_checked")}
    loader = {workers: in_subprocess("--phase", "loader", "--workers", str(workers), "--workdir", workdir,
                                     "--records", str(args.records), "--batch", str(args.batch),
                                     "--batches", str(args.batches))["samples_per_s"]
              for workers in (0, 1, 2)}
    model = {variant: args.batch / run_variant(variant, args.steps, args.batch, "cpu")["step_s"]
             for variant in ("plain", "tga")}

    print(f"\n{args.records} records ({size_mb:.0f} MB JSON), {args.images} JPEG images, {os.cpu_count()} CPUs")
    print(f"{'start-up':22s} {'seconds':>8s} {'RSS MB':>8s} {'anon MB':>8s} {'RSS/json':>9s}")
    json_rss = start["json"]["rss_mb"]
    for phase, label in (("json", "json.load"), ("memory", "list of Record"), ("arrow_cold", "arrow (conversion)"),
                         ("arrow_warm", "arrow (warm start)"), ("arrow_checked", "arrow warm + images")):
        r = start[phase]
        print(f"{label:22s} {r['seconds']:8.2f} {r['rss_mb']:8.1f} {r['anon_mb']:8.1f} {r['rss_mb'] / json_rss:9.3f}")
    warm = start["arrow_warm"]
    print(f"arrow warm start: anon {warm['anon_with_lengths_mb']:.1f} MB with the sampler's length list; after 1000 "
          f"random records RSS {warm['rss_after_access_mb']:.1f} MB, anon {warm['anon_after_access_mb']:.1f} MB "
          "(the rest is shared, file-backed pages of the memory map)")
    print(f"\n{'throughput (samples/s)':30s} {'rate':>8s} {'/model plain':>13s} {'/model tga':>11s}")
    for variant, rate in model.items():
        print(f"{'model step, ' + variant:30s} {rate:8.2f}")
    for workers, rate in loader.items():
        print(f"{f'loader, {workers} workers':30s} {rate:8.2f} {rate / model['plain']:13.1f} {rate / model['tga']:11.1f}")
    print(f"(batch {args.batch}; loader and model measured one after the other on the same CPUs)")


if __name__ == "__main__":
    main()
