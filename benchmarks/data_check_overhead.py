"""benchmarks/data_check_overhead.py

Time of the data checks on N generated LLaVA records (default 10,000, each with its own 64x48 PNG): the start-up
check (schema + image path inside the folder + file exists) against schema parsing alone, in memory and through the
Arrow record cache that training opens, and the full `tga data check` (every image decoded; token lengths with the
real Mistral-7B tokenizer).

    .venv/bin/python benchmarks/data_check_overhead.py [--records 10000] [--out benchmarks/results/data_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from PIL import Image
from tqdm import tqdm

from tga.data.arrow_records import open_records
from tga.data.check import check_data
from tga.data.dataset import SampleBuilder
from tga.data.guard import load_training_records
from tga.data.records import load_records
from tga.data.templates import get_template
from tga.model.tokenizer import image_token_id, load_tokenizer
from tga.tiny import mistral_tokenizer_file


def write_data(folder: str, count: int) -> tuple[str, str]:
    images = os.path.join(folder, "images")
    os.makedirs(images)
    records = []
    for index in tqdm(range(count), desc="writing images", unit="image"):
        name = f"{index:06d}.png"
        Image.new("RGB", (64, 48), (index % 256, 80, 160)).save(os.path.join(images, name))
        records.append({"id": f"r{index}", "image": name, "image_caption": f"a picture number {index}",
                        "retrieved_caption": "a similar picture", "conversations": [
                            {"from": "human", "value": "<image>\nDescribe the picture in detail."},
                            {"from": "gpt", "value": f"It shows colour {index % 256} on a blue background."}]})
    data = os.path.join(folder, "data.json")
    with open(data, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    return data, images


def timed(function, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data, images = write_data(folder, args.records)
        tokenizer_dir = os.path.join(folder, "tokenizer")
        os.makedirs(tokenizer_dir)
        with open(mistral_tokenizer_file(), "rb") as source, open(os.path.join(tokenizer_dir, "tokenizer.model"),
                                                                  "wb") as target:
            target.write(source.read())
        tokenizer = load_tokenizer(tokenizer_dir)
        builder = SampleBuilder(tokenizer=tokenizer, template=get_template("llava_llama_2"), image_processor=None,
                                image_folder=images, image_token_id=image_token_id(tokenizer), num_image_tokens=576,
                                max_length=2048, use_retrieved=True, caption_target=True)
        cache = os.path.join(folder, "arrow_cache")
        results = {
            "records": args.records,
            "parse_only_s": timed(lambda: load_records(data)),
            "startup_check_s": timed(lambda: load_training_records(data, images, skip_bad=False)),
            # What training runs: the Arrow cache (converted once; later runs and ranks open it), with and without the
            # image-path checks.
            "arrow_first_open_s": timed(lambda: open_records(data, cache_dir=cache, image_folder=images,
                                                             check_images=True), repeats=1),
            "arrow_open_s": timed(lambda: open_records(data, cache_dir=cache)),
            "arrow_open_checked_s": timed(lambda: open_records(data, cache_dir=cache, image_folder=images,
                                                               check_images=True)),
            "full_check_decode_s": timed(lambda: check_data(data, images, progress=False), repeats=1),
            "full_check_decode_tokens_s": timed(lambda: check_data(data, images, builder=builder, progress=False),
                                                repeats=1),
        }
    results["startup_overhead_s"] = results["startup_check_s"] - results["parse_only_s"]
    results["arrow_image_check_overhead_s"] = results["arrow_open_checked_s"] - results["arrow_open_s"]
    print(json.dumps(results, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
