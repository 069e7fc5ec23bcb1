"""lmms-eval on an exported tiny model, as a user runs it: `python -m lmms_eval --model llava_hf` with a local task
(generated non-square images and questions, a task YAML in a temporary folder, no hub access), the score read from
the results file (lmms-eval exits 0 even when the run failed). The task's targets are `tga chat`'s answers, so a
score of 1 says lmms-eval's answers on non-square images equal the project's own inference.

lmms-eval lives in its own environment (`make eval-env`, requirements-eval.txt); `make test` builds it. Elsewhere the
test is skipped unless TGA_LMMS_EVAL_PYTHON names an interpreter that has lmms-eval.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from tga.export import export_hf_llava
from tga.inference import ChatModel, load_chat_model
from tga.model.processor import build_processor
from tga.model.tokenizer import load_tokenizer
from tga.model.vision import load_image_processor
from tga.model.vlm import build_vlm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(45, 17), (17, 45), (33, 31)]  # wide, tall, odd
QUESTION = "What colour is the shape?"
MAX_NEW_TOKENS = 8

TASK_YAML = """task: tga_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

TASK_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
'''


def lmms_eval_python() -> str | None:
    python = os.environ.get("TGA_LMMS_EVAL_PYTHON") or os.path.join(REPO, ".venv-eval", "bin", "python")
    return python if os.path.exists(python) else None


def write_task(folder, images, answers) -> str:
    """A local lmms-eval task: data.jsonl (image path, question, target) and its YAML + doc functions."""
    os.makedirs(folder / "task")
    with open(folder / "data.jsonl", "w", encoding="utf-8") as handle:
        for index, (path, answer) in enumerate(zip(images, answers)):
            handle.write(json.dumps({"id": index, "image": path, "question": QUESTION, "answer": answer}) + "\n")
    (folder / "task" / "tga_local.yaml").write_text(TASK_YAML.format(data=folder / "data.jsonl",
                                                                      max_new_tokens=MAX_NEW_TOKENS))
    (folder / "task" / "utils.py").write_text(TASK_UTILS)
    return str(folder / "task")


def read_results(output_path) -> tuple[dict, list[dict]]:
    """The results and logged samples lmms-eval wrote; their absence is the only sign of a failed run."""
    results = glob.glob(os.path.join(output_path, "*", "*_results.json"))
    samples = glob.glob(os.path.join(output_path, "*", "*_samples_tga_local.jsonl"))
    assert len(results) == 1 and len(samples) == 1, f"no lmms-eval results under {output_path}"
    with open(results[0], encoding="utf-8") as handle:
        scores = json.load(handle)["results"]
    with open(samples[0], encoding="utf-8") as handle:
        return scores, [json.loads(line) for line in handle]


@pytest.mark.slow
def test_lmms_eval_scores_an_exported_model_and_answers_like_tga_chat(tiny_assets, tmp_path):
    python = lmms_eval_python()
    if python is None:
        pytest.skip("lmms-eval environment missing: `make eval-env` (or set TGA_LMMS_EVAL_PYTHON)")
    tokenizer = load_tokenizer(tiny_assets["llm"])
    torch.manual_seed(0)
    model = build_vlm(tiny_assets["llm"], tiny_assets["vision"], tokenizer)
    source = str(tmp_path / "vlm")
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    build_processor(model, tokenizer, load_image_processor(tiny_assets["vision"])).save_pretrained(source)
    exported = export_hf_llava(source, str(tmp_path / "exported"))

    rng = np.random.default_rng(0)
    paths, pictures = [], []
    for width, height in SIZES:
        path = str(tmp_path / f"{width}x{height}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
        pictures.append(Image.open(path).convert("RGB"))
    chat = load_chat_model(source)  # what `tga chat --model SOURCE` answers
    answers = [chat.generate([picture], [QUESTION], max_new_tokens=MAX_NEW_TOKENS)[0] for picture in pictures]
    cropped = ChatModel(chat.model, chat.tokenizer, load_image_processor(source, "resize"), chat.template_name,
                        "resize")  # CLIP's centre crop, as the old exports gave lmms-eval
    assert [cropped.generate([p], [QUESTION], max_new_tokens=MAX_NEW_TOKENS)[0] for p in pictures] != answers

    task = write_task(tmp_path, paths, answers)
    output = tmp_path / "lmms_out"
    command = [python, "-m", "lmms_eval", "--model", "llava_hf",
               "--model_args", f"pretrained={exported},device=cpu,device_map=cpu,dtype=float32",
               "--tasks", "tga_local", "--include_path", task, "--batch_size", "1", "--log_samples",
               "--output_path", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    if not os.path.isdir(output):
        pytest.fail(f"lmms-eval exited 0 without results: {run.stderr[-3000:]}")
    scores, samples = read_results(output)
    by_doc = {sample["doc_id"]: sample["filtered_resps"] for sample in samples}
    lmms_answers = [(by_doc[index][0] if isinstance(by_doc[index], list) else by_doc[index]).strip()
                    for index in range(len(SIZES))]
    assert lmms_answers == answers
    assert scores["tga_local"]["exact_match,none"] == 1.0
