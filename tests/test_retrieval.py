"""Retrieval (`tga retrieve`): accuracy of a tiny trained open_clip model on a synthetic shapes world, flat vs
IVF agreement, resumability, the leak guard, bad and escaping image paths, the corpus-index cache, the HF CLIP
backend and the command line."""

from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tga.errors import ConfigError, DataError
from tga.records_io import PARTIAL_SUFFIX, load_records
from tga.retrieval import (
    RetrieveConfig,
    build_embedder,
    build_index,
    load_corpus,
    load_or_build_caption_index,
    normalize_text,
    pick_retrieved,
    retrieve_file,
)

CONCEPTS = [
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "triangle"),
    ("white", "circle"),
    ("cyan", "square"),
]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
CAPTIONS = [f"a {colour} {shape}" for colour, shape in CONCEPTS]
DISTRACTORS = [
    "a black star",
    "a photo of a dog",
    "a grey cloud",
    "two cats on a sofa",
    "a bowl of soup",
    "a pink heart",
]
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def draw_concept(concept: int, rng: random.Random) -> Image.Image:
    """A 32x32 image of one coloured shape at a random size and place on a dark random background."""
    colour, shape = CONCEPTS[concept]
    image = Image.new("RGB", (32, 32), tuple(rng.randint(0, 60) for _ in range(3)))
    size = rng.randint(14, 24)
    x, y = rng.randint(0, 32 - size), rng.randint(0, 32 - size)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x, y, x + size, y + size], fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle([x, y, x + size, y + size], fill=COLOURS[colour])
    else:
        draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
    return image


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    """A tiny open_clip model trained for 40 contrastive steps on the shapes world, saved as a local-dir folder."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_open_clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    rng = random.Random(0)
    labels = torch.arange(len(CONCEPTS)).repeat(2)
    for _ in range(40):
        images = torch.stack([preprocess(draw_concept(i, rng)) for i in labels.tolist()])
        logits = (
            model.logit_scale.exp()
            * model.encode_image(images, normalize=True)
            @ model.encode_text(tokens, normalize=True).T
        )
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return str(folder)


def make_world(root, count: int = 24, seed: int = 1, with_captions: bool = False) -> tuple[str, str, str, list[int]]:
    """Write held-out images, their records and a corpus; returns (records path, image folder, corpus, concepts)."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(exist_ok=True)
    concepts, records = [], []
    for number in range(count):
        concept = number % len(CONCEPTS)
        draw_concept(concept, rng).save(images / f"img{number}.png")
        record = {
            "id": f"r{number}",
            "image": f"img{number}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "A shape."},
            ],
        }
        if with_captions:
            record["image_caption"] = "  " + CAPTIONS[concept].upper() + ". "  # differs only in case/space/punctuation
        records.append(record)
        concepts.append(concept)
    records.insert(
        3, {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    )
    data = root / "records.json"
    data.write_text(json.dumps(records))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CAPTIONS + DISTRACTORS + [CAPTIONS[0]]) + "\n")  # one duplicate line
    return str(data), str(images), str(corpus), concepts


def config_for(data: str, images: str, corpus: str, out: str, model_dir: str, **overrides) -> RetrieveConfig:
    options = dict(
        data=data, image_folder=images, corpus=corpus, out=out, model=f"local-dir:{model_dir}", pretrained=None
    )
    options.update(overrides)
    return RetrieveConfig(**options)


def top1_accuracy(out: str, concepts: list[int]) -> float:
    image_records = [r for r in load_records(out) if "image" in r]
    return float(np.mean([r["retrieved_caption"] == CAPTIONS[c] for r, c in zip(image_records, concepts)]))


@pytest.mark.slow
def test_trained_tiny_clip_retrieves_well_and_ivf_matches_flat(tmp_path, clip_dir):
    data, images, corpus, concepts = make_world(tmp_path)
    flat_out, ivf_out = str(tmp_path / "flat.json"), str(tmp_path / "ivf.jsonl")
    report, duplicates = retrieve_file(config_for(data, images, corpus, flat_out, clip_dir, top_k=3, batch_size=8))
    assert report.complete and duplicates == 1 and report.passed_through == 1 and report.processed == len(concepts)
    accuracy = top1_accuracy(flat_out, concepts)
    chance = 1 / len(CONCEPTS)
    print(f"top-1 retrieval accuracy {accuracy:.3f} (chance {chance:.3f})")
    assert accuracy > 2 * chance
    retrieve_file(
        config_for(data, images, corpus, ivf_out, clip_dir, top_k=3, batch_size=8, index="ivf", nlist=4, nprobe=4)
    )
    flat, ivf = load_records(flat_out), load_records(ivf_out)
    assert [r.get("retrieved_caption") for r in flat] == [r.get("retrieved_caption") for r in ivf]
    for a, b in zip(flat, ivf):
        if "image" in a:
            assert [t["text"] for t in a["retrieved_topk"]] == [t["text"] for t in b["retrieved_topk"]]
            assert len(a["retrieved_topk"]) == 3
            scores = [t["score"] for t in a["retrieved_topk"]]
            assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    assert flat[3] == json.load(open(data))[3]  # the text-only record passes through unchanged


class FailingEmbedder:
    """Wraps an embedder and raises on the n-th image batch, like a kill in the middle of a run."""

    def __init__(self, inner, fail_on_call: int) -> None:
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, 0
        self.description = inner.description

    def embed_images(self, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated kill")
        return self.inner.embed_images(images)

    def embed_texts(self, texts):
        return self.inner.embed_texts(texts)


def test_interrupted_runs_resume_to_the_identical_file(tmp_path, clip_dir):
    data, images, corpus, _ = make_world(tmp_path, count=20)
    reference = str(tmp_path / "reference.json")
    retrieve_file(config_for(data, images, corpus, reference, clip_dir, batch_size=4))

    stopped = str(tmp_path / "stopped.json")
    report, _ = retrieve_file(config_for(data, images, corpus, stopped, clip_dir, batch_size=4, max_batches=1))
    assert not report.complete and not os.path.exists(stopped) and report.processed == 4
    embedder = build_embedder("open_clip", f"local-dir:{clip_dir}")
    with pytest.raises(KeyboardInterrupt):
        retrieve_file(config_for(data, images, corpus, stopped, clip_dir, batch_size=4), FailingEmbedder(embedder, 3))
    with open(stopped + PARTIAL_SUFFIX, "a", encoding="utf-8") as handle:
        handle.write('{"index": 17, "id": "r1')  # a line cut short by the kill
    report, _ = retrieve_file(config_for(data, images, corpus, stopped, clip_dir, batch_size=4))
    assert report.complete and report.resumed == 12 and report.processed == 8
    assert open(stopped, "rb").read() == open(reference, "rb").read()
    assert not os.path.exists(stopped + PARTIAL_SUFFIX)


def test_changed_settings_do_not_mix_with_partial_results(tmp_path, clip_dir):
    data, images, corpus, _ = make_world(tmp_path, count=8)
    out = str(tmp_path / "out.json")
    retrieve_file(config_for(data, images, corpus, out, clip_dir, batch_size=4, max_batches=1))
    with pytest.raises(ConfigError, match="top_k"):
        retrieve_file(config_for(data, images, corpus, out, clip_dir, batch_size=4, top_k=2))


def test_leak_guard_never_returns_the_records_own_caption(tmp_path, clip_dir):
    data, images, corpus, _ = make_world(tmp_path, count=16, with_captions=True)
    out = str(tmp_path / "out.json")
    report, _ = retrieve_file(config_for(data, images, corpus, out, clip_dir, top_k=2))
    image_records = [r for r in load_records(out) if "image" in r]
    for record in image_records:
        own = normalize_text(record["image_caption"])
        assert normalize_text(record["retrieved_caption"]) != own
        assert all(normalize_text(item["text"]) != own for item in record["retrieved_topk"])
        assert len(record["retrieved_topk"]) == 2
    assert report.flags["leak_skipped"] >= len(image_records) // 2  # the trained model ranks the own caption high


def test_pick_retrieved_skips_normalised_copies_only():
    candidates = [("A red circle.", 0.9), ("a red  disc", 0.8), ("a blue square", 0.1)]
    result = pick_retrieved(candidates, " a RED circle ", top_k=2)
    assert result.fields["retrieved_caption"] == "a red  disc" and result.flags == ("leak_skipped",)
    assert [t["text"] for t in result.fields["retrieved_topk"]] == ["a red  disc", "a blue square"]
    result = pick_retrieved(candidates, None, top_k=2)
    assert result.fields["retrieved_caption"] == "A red circle." and result.flags == ()
    assert pick_retrieved(candidates[:1], "a red circle", top_k=1).flags == ("leak_skipped", "no_text_left")
    two_copies = [("a red circle", 0.9), ("A Red Circle!", 0.8), ("a disc", 0.5), ("a blob", 0.4)]
    result = pick_retrieved(two_copies, "a red circle", top_k=2)
    assert [t["text"] for t in result.fields["retrieved_topk"]] == ["a disc", "a blob"]
    assert pick_retrieved(candidates, "a blue square", top_k=2).flags == ()  # ranked below the top 2: no change


def write_bad_records(tmp_path, images: str, data: str) -> str:
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 32)).save(outside)
    with open(os.path.join(images, "corrupt.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n not really an image")
    records = json.load(open(data))
    records += [
        {"id": "escape", "image": "../outside.png", "conversations": []},
        {"id": "absolute", "image": str(outside), "conversations": []},
        {"id": "corrupt", "image": "corrupt.png", "conversations": []},
        {"id": "missing", "image": "nope.png", "conversations": []},
    ]
    path = str(tmp_path / "bad.json")
    json.dump(records, open(path, "w"))
    return path


@pytest.mark.parametrize("bad_id", ["escape", "absolute", "corrupt", "missing"])
def test_bad_image_paths_raise_data_error_naming_the_record(tmp_path, clip_dir, bad_id):
    data, images, corpus, _ = make_world(tmp_path, count=4)
    records = [r for r in json.load(open(write_bad_records(tmp_path, images, data))) if r["id"] in ("r0", bad_id)]
    path = tmp_path / "one_bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=f"record id '{bad_id}'"):
        retrieve_file(config_for(str(path), images, corpus, str(tmp_path / "out.json"), clip_dir))


def test_skip_bad_records_skips_counts_and_keeps_them_unchanged(tmp_path, clip_dir):
    data, images, corpus, _ = make_world(tmp_path, count=6)
    bad_data = write_bad_records(tmp_path, images, data)
    out = str(tmp_path / "out.jsonl")
    report, _ = retrieve_file(config_for(bad_data, images, corpus, out, clip_dir, batch_size=4, skip_bad_records=True))
    assert report.complete
    assert sorted(report.skipped_ids) == sorted(f"id {name!r}" for name in ("escape", "absolute", "corrupt", "missing"))
    by_id = {r["id"]: r for r in load_records(out)}
    assert all("retrieved_caption" not in by_id[name] for name in ("escape", "absolute", "corrupt", "missing"))
    assert all("retrieved_caption" in by_id[f"r{n}"] for n in range(6))


class CountingEmbedder(FailingEmbedder):
    def __init__(self, inner) -> None:
        super().__init__(inner, fail_on_call=-1)
        self.text_calls = 0

    def embed_texts(self, texts):
        self.text_calls += 1
        return self.inner.embed_texts(texts)


def test_index_cache_embeds_the_corpus_once_and_refuses_another_corpus(tmp_path, clip_dir):
    texts, _ = load_corpus(make_world(tmp_path, count=1)[2])
    embedder = CountingEmbedder(build_embedder("open_clip", f"local-dir:{clip_dir}"))
    cache = str(tmp_path / "cache")
    first = load_or_build_caption_index(texts, embedder, index_path=cache)
    again = load_or_build_caption_index(texts, embedder, index_path=cache)
    ivf = load_or_build_caption_index(texts, embedder, kind="ivf", nlist=2, nprobe=2, index_path=cache)
    assert embedder.text_calls == 1
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    query = first.embeddings[:3]
    assert [c[0] for c in first.search(query, 1)] == [c[0] for c in ivf.search(query, 1)]
    assert first.search(query, 1)[0][0][0] == texts[0]  # a text is its own nearest neighbour
    with pytest.raises(ConfigError, match="--index_path"):
        load_or_build_caption_index(texts[:-1], embedder, index_path=cache)


def test_build_index_validates_kind_and_nlist():
    vectors = np.eye(4, dtype=np.float32)
    assert build_index(vectors, "flat").ntotal == 4
    with pytest.raises(ConfigError, match="--nlist"):
        build_index(vectors, "ivf", nlist=5)
    with pytest.raises(ConfigError, match="--index"):
        build_index(vectors, "hnsw")


def save_tiny_hf_clip(folder) -> None:
    """A random tiny transformers CLIPModel with a word-level tokenizer and a 32px image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + sorted({w for t in CAPTIONS + DISTRACTORS for w in t.split()})
    vocab = {word: number for number, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def test_hf_clip_backend_embeds_and_retrieves(tmp_path):
    folder = tmp_path / "hf_clip"
    save_tiny_hf_clip(folder)
    embedder = build_embedder("hf_clip", str(folder))
    texts = embedder.embed_texts(["a red circle", "a blue square", "a red circle"])
    assert texts.shape == (3, 16) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(texts[0], texts[2], atol=1e-6)
    assert not np.allclose(texts[0], texts[1])
    images = embedder.embed_images([draw_concept(0, random.Random(0)), draw_concept(2, random.Random(0))])
    assert images.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    data, image_folder, corpus, _ = make_world(tmp_path, count=4)
    out = str(tmp_path / "out.json")
    retrieve_file(
        RetrieveConfig(
            data=data, image_folder=image_folder, corpus=corpus, out=out, backend="hf_clip", model=str(folder)
        )
    )
    corpus_texts = set(load_corpus(corpus)[0])
    assert all(r["retrieved_caption"] in corpus_texts for r in load_records(out) if "image" in r)
    with pytest.raises(ConfigError, match="--model"):
        build_embedder("hf_clip", str(tmp_path / "missing"))


def run_cli(argv: list[str]) -> int:
    from tga.cli import retrieve_cmd

    parser = argparse.ArgumentParser(prog="tga")
    retrieve_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_with_a_registered_model_config_and_checkpoint(tmp_path, clip_dir, capsys):
    data, images, corpus, concepts = make_world(tmp_path, count=8)
    config_file = tmp_path / "tga-test-tiny-clip.json"  # the file stem becomes the open_clip model name
    config_file.write_text(json.dumps(TINY_CLIP))
    out = str(tmp_path / "out.json")
    status = run_cli(
        [
            "retrieve",
            "--data",
            data,
            "--image_folder",
            images,
            "--corpus",
            corpus,
            "--out",
            out,
            "--model_config",
            str(config_file),
            "--model",
            "tga-test-tiny-clip",
            "--pretrained",
            os.path.join(clip_dir, "open_clip_model.safetensors"),
            "--index",
            "ivf",
            "--nlist",
            "2",
            "--top_k",
            "2",
            "--batch_size",
            "3",
            "--index_path",
            str(tmp_path / "cache"),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "processed 8" in printed and "dropped 1 duplicate" in printed
    assert top1_accuracy(out, concepts) > 2 / len(CONCEPTS)
    assert os.path.exists(tmp_path / "cache" / "index.faiss")
    with pytest.raises(ConfigError, match="--pretrained"):
        run_cli(
            [
                "retrieve",
                "--data",
                data,
                "--image_folder",
                images,
                "--corpus",
                corpus,
                "--out",
                out,
                "--model",
                "tga-test-tiny-clip",
                "--pretrained",
                "",
            ]
        )


def test_build_embedder_validates_backend_dtype_and_half_precision_output(clip_dir):
    with pytest.raises(ConfigError, match="--backend"):
        build_embedder("siglip", "x")
    with pytest.raises(ConfigError, match="--dtype"):
        build_embedder("open_clip", f"local-dir:{clip_dir}", dtype="fp8")
    embedder = build_embedder("open_clip", f"local-dir:{clip_dir}", dtype="bfloat16")
    texts = embedder.embed_texts(CAPTIONS[:2])
    assert texts.dtype == np.float32  # faiss needs float32 whatever the model computes in
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-2)
