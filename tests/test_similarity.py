"""Per-layer image-vs-caption similarity: the report on known tensors, pooling through a chat-model stand-in, plots."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tga.errors import DataError
from tga.safety.similarity import save_similarity, similarity_report
from tga.safety.states import chat_pooled_states, masked_mean

LAYERS, N, H = 5, 6, 16


def test_identical_states_give_cosine_one_at_every_layer():
    states = torch.randn(LAYERS, N, H)
    report = similarity_report(states, states.clone())
    assert report["num_layers"] == LAYERS - 1 and report["n"] == N
    assert report["cosine"] == pytest.approx([1.0] * LAYERS, abs=1e-6)
    # Distinct random samples: other captions are far, so the alignment is specific.
    assert all(s > 0.5 for s in report["specificity"])


def test_collapsed_states_have_cosine_one_but_zero_specificity():
    direction = torch.randn(H)
    states = direction.expand(LAYERS, N, H) * torch.rand(1, N, 1).add(0.5)  # same direction, other norms
    report = similarity_report(states, states.flip(1))
    assert report["cosine"] == pytest.approx([1.0] * LAYERS, abs=1e-6)
    assert report["specificity"] == pytest.approx([0.0] * LAYERS, abs=1e-6)


def cosines(images, captions, layer):
    """Hand computation: cosine of every image to every caption at one layer (rows = images)."""
    return torch.nn.functional.cosine_similarity(images[layer].unsqueeze(1), captions[layer].unsqueeze(0), dim=-1)


def test_report_values_match_hand_computation_and_scenes():
    images, captions = torch.randn(LAYERS, N, H), torch.randn(LAYERS, N, H)
    scenes = ["gun", "gun", "knife", "knife", "knife", "alcohol"]
    report = similarity_report(images, captions, scenes)
    for layer in range(LAYERS):
        matrix = cosines(images, captions, layer)
        own = matrix.diagonal()
        others = (matrix.sum(1) - own) / (N - 1)
        assert report["cosine"][layer] == pytest.approx(float(own.mean()), abs=1e-6)
        assert report["other_caption_cosine"][layer] == pytest.approx(float(others.mean()), abs=1e-6)
        assert report["specificity"][layer] == pytest.approx(float((own - others).mean()), abs=1e-6)
        knife = report["per_scene"]["knife"]
        assert knife["cosine"][layer] == pytest.approx(float(own[2:5].mean()), abs=1e-6)
        assert report["per_scene"]["alcohol"]["specificity"][layer] == pytest.approx(
            float(own[5] - others[5]), abs=1e-6
        )
    assert {scene: s["n"] for scene, s in report["per_scene"].items()} == {"alcohol": 1, "gun": 2, "knife": 3}


def test_single_pair_has_no_specificity_and_bad_shapes_are_rejected():
    states = torch.randn(LAYERS, 1, H)
    assert similarity_report(states, states)["specificity"] is None
    with pytest.raises(DataError):
        similarity_report(torch.randn(LAYERS, 2, H), torch.randn(LAYERS, 3, H))
    with pytest.raises(DataError):
        similarity_report(torch.randn(LAYERS, 2, H), torch.randn(LAYERS, 2, H), ["only-one-scene-label"])


class PoolingChat:
    """Stands in for `ChatModel.hidden_states`: fixed per-position states, image tokens at positions 1-2."""

    def __init__(self):
        self.calls = 0

    def hidden_states(self, images, texts):
        self.calls += 1
        batch, length = len(texts), 6
        states = tuple(
            torch.arange(batch * length * H, dtype=torch.float32).reshape(batch, length, H) * (j + 1)
            for j in range(LAYERS)
        )
        image_mask = torch.zeros(batch, length, dtype=torch.bool)
        text_mask = torch.zeros(batch, length, dtype=torch.bool)
        for b, image in enumerate(images):
            if image is not None:
                image_mask[b, 1:3] = True
            text_mask[b, 3:5] = True
        return SimpleNamespace(
            states=states, image_mask=image_mask, text_mask=text_mask, last_index=torch.full((batch,), length - 1)
        )


def test_pooling_through_a_chat_model_uses_the_masks():
    chat = PoolingChat()
    pooled = chat_pooled_states(chat, ["img"] * 3, ["q"] * 3, region="image", batch_size=2)
    assert pooled.shape == (LAYERS, 3, H) and chat.calls == 2
    full = chat.hidden_states(["img"] * 2, ["q"] * 2).states
    assert torch.equal(pooled[2, 1], full[2][1, 1:3].mean(0))
    text = chat_pooled_states(chat, [None] * 2, ["caption"] * 2, region="text", batch_size=4)
    assert torch.equal(text[0, 0], full[0][0, 3:5].mean(0))
    with pytest.raises(ValueError, match="no positions"):
        chat_pooled_states(chat, [None], ["caption"], region="image")
    with pytest.raises(ValueError):
        masked_mean(full, torch.zeros(2, 6))


def test_save_similarity_writes_json_and_overlay_plot(tmp_path):
    states = torch.randn(LAYERS, N, H)
    reports = {
        "llava": similarity_report(states, torch.randn(LAYERS, N, H)),
        "tga": similarity_report(states, states + 0.1 * torch.randn(LAYERS, N, H)),
    }
    json_path, png_path = save_similarity(reports, str(tmp_path / "sim"))
    saved = json.loads(open(json_path).read())
    assert list(saved["checkpoints"]) == ["llava", "tga"]
    assert saved["checkpoints"]["tga"]["cosine"][0] > saved["checkpoints"]["llava"]["cosine"][0]
    assert open(png_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
