"""Tests of the TGA guide loss (tga.align.tga_loss), caption centring and the specificity diagnostic."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.nn.functional as F

from tga.align import FORMS, CaptionCenter, guide_loss, guide_terms, pool_layers, specificity
from tga.errors import ConfigError


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain cosine of two vectors, written independently of the library code."""
    return torch.dot(a, b) / (a.norm() * b.norm())


def _states(num_layers: int = 3, batch: int = 4, hidden: int = 8, requires_grad: bool = False):
    image = torch.randn(num_layers, batch, hidden, requires_grad=requires_grad)
    caption = torch.randn(num_layers, batch, hidden)
    retrieved = torch.randn(num_layers, batch, hidden)
    return image, caption, retrieved


def _per_sample_mean(fn, image, caption, retrieved) -> torch.Tensor:
    """Mean over layers and samples of fn(cos(I, C), cos(R, C)) by explicit loops."""
    values = [
        fn(_cos(image[j, b], caption[j, b]), _cos(retrieved[j, b], caption[j, b]))
        for j in range(image.shape[0])
        for b in range(image.shape[1])
    ]
    return torch.stack(values).mean()


# ---------------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize(("w_pair", "w_hinge"), [(None, None), (0.7, 1.3)])
def test_paper_form_matches_direct_formula(w_pair, w_hinge):
    image, caption, retrieved = _states()
    loss, metrics = guide_loss(image, caption, retrieved, pair_weight=w_pair, hinge_weight=w_hinge)
    wp = 1.0 if w_pair is None else w_pair
    wh = 1.0 if w_hinge is None else w_hinge
    pair = _per_sample_mean(lambda ic, rc: -ic, image, caption, retrieved) * wp
    hinge = _per_sample_mean(lambda ic, rc: F.softplus(rc - ic), image, caption, retrieved) * wh
    torch.testing.assert_close(loss, pair + hinge)
    torch.testing.assert_close(metrics["pair"], pair)
    torch.testing.assert_close(metrics["hinge"], hinge)
    cos_ic = torch.tensor([[_cos(image[j, b], caption[j, b]) for b in range(4)] for j in range(3)]).mean(1)
    cos_rc = torch.tensor([[_cos(retrieved[j, b], caption[j, b]) for b in range(4)] for j in range(3)]).mean(1)
    torch.testing.assert_close(metrics["cos_ic"], cos_ic)
    torch.testing.assert_close(metrics["cos_rc"], cos_rc)


@pytest.mark.parametrize("step_ratio", [0.0, 0.3, 0.9])
def test_released_form_matches_direct_formula(step_ratio):
    image, caption, retrieved = _states()
    loss, metrics = guide_loss(image, caption, retrieved, form="released", step_ratio=step_ratio)
    r = step_ratio
    pair = _per_sample_mean(lambda ic, rc: 0.25 * (1 - r) * torch.exp(-ic), image, caption, retrieved)
    hinge = _per_sample_mean(lambda ic, rc: 0.1 * (1 - r) ** 2 * torch.exp(rc - ic), image, caption, retrieved)
    torch.testing.assert_close(loss, pair + hinge)
    torch.testing.assert_close(metrics["pair"], pair)
    torch.testing.assert_close(metrics["hinge"], hinge)


def test_identical_image_and_caption_give_cos_one_and_expected_values():
    caption = torch.randn(2, 3, 16)
    image = caption.clone()
    loss, metrics = guide_loss(image, caption)
    torch.testing.assert_close(metrics["cos_ic"], torch.ones(2))
    torch.testing.assert_close(loss, torch.tensor(-1.0))
    # R = C too: the hinge is softplus(1 - 1) = ln 2.
    loss, _ = guide_loss(image, caption, caption.clone())
    torch.testing.assert_close(loss, torch.tensor(-1.0) + torch.log(torch.tensor(2.0)))
    loss, _ = guide_loss(image, caption, caption.clone(), form="released")
    torch.testing.assert_close(loss, 0.25 * torch.exp(torch.tensor(-1.0)) + 0.1)


def test_released_form_vanishes_at_the_end_of_training():
    image, caption, retrieved = _states(requires_grad=True)
    loss, metrics = guide_loss(image, caption, retrieved, form="released", step_ratio=1.0)
    assert loss.item() == 0.0 and metrics["pair"].item() == 0.0 and metrics["hinge"].item() == 0.0


def test_hinge_weight_is_irrelevant_without_retrieved_states():
    image, caption, _ = _states()
    for form in FORMS:
        low, metrics = guide_loss(image, caption, form=form, hinge_weight=0.0)
        high, _ = guide_loss(image, caption, form=form, hinge_weight=5.0)
        assert torch.equal(low, high), form
        assert metrics["hinge"].item() == 0.0 and "cos_rc" not in metrics


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("term", ["pair", "hinge"])
def test_each_term_alone_sends_gradient_to_the_image_states(form, term):
    image, caption, retrieved = _states(requires_grad=True)
    if term == "pair":
        kwargs = {"retrieved_states": None}
    else:
        kwargs = {"retrieved_states": retrieved, "pair_weight": 0.0}
    terms = guide_terms(image, caption, form=form, step_ratio=0.25, **kwargs)
    part = getattr(terms, term)
    # A Python float (the released code's math.exp bug) would fail every one of these checks.
    assert isinstance(part, torch.Tensor) and part.grad_fn is not None
    loss, metrics = guide_loss(image, caption, form=form, step_ratio=0.25, **kwargs)
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None and loss.dim() == 0
    assert all(value.grad_fn is None and not value.requires_grad for value in metrics.values())
    loss.backward()
    assert torch.isfinite(image.grad).all()
    assert image.grad.abs().sum() > 1e-6


def test_both_parts_are_graph_tensors_for_every_form():
    image, caption, retrieved = _states(requires_grad=True)
    for form in FORMS:
        terms = guide_terms(image, caption, retrieved, form=form)
        for part in (terms.pair, terms.hinge):
            assert isinstance(part, torch.Tensor) and part.grad_fn is not None, form


def test_guide_loss_gradient_reaches_a_projector_through_a_tiny_llm():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    llm = MistralForCausalLM(config).eval()
    projector = torch.nn.Linear(12, 32)
    batch, seq, patches = 2, 10, 4
    image_mask = torch.zeros(batch, seq, dtype=torch.bool)
    image_mask[:, 2 : 2 + patches] = True
    embeds = llm.get_input_embeddings()(torch.randint(0, 64, (batch, seq)))
    image_tokens = projector(torch.randn(batch, patches, 12))
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), image_tokens.reshape(-1, 32))
    hidden = llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    caption_ids = torch.randint(0, 64, (batch, 6))
    caption_mask = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])  # left-padded caption
    with torch.no_grad():
        caption_hidden = llm(input_ids=caption_ids, attention_mask=caption_mask.long(), output_hidden_states=True)
    layers = [1, 2, 3]
    image_states = pool_layers(hidden, layers, image_mask)
    caption_states = pool_layers(caption_hidden.hidden_states, layers, caption_mask)
    loss, _ = guide_loss(image_states, caption_states, form="released")
    loss.backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- contrastive


def _direct_info_nce(image, caption, temperature):
    per_layer = []
    for j in range(image.shape[0]):
        rows = []
        for b in range(image.shape[1]):
            logits = torch.stack([_cos(image[j, b], caption[j, c]) for c in range(image.shape[1])]) / temperature
            rows.append(-torch.log_softmax(logits, dim=0)[b])
        per_layer.append(torch.stack(rows).mean())
    return torch.stack(per_layer).mean()


@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_contrastive_matches_info_nce_at_the_given_temperature(temperature):
    image, caption, _ = _states(batch=5)
    loss, metrics = guide_loss(image, caption, form="contrastive", temperature=temperature)
    torch.testing.assert_close(loss, _direct_info_nce(image, caption, temperature))
    torch.testing.assert_close(metrics["pair"], loss)


def test_contrastive_temperature_changes_the_loss():
    image, caption, _ = _states(batch=5)
    sharp, _ = guide_loss(image, caption, form="contrastive", temperature=0.05)
    soft, _ = guide_loss(image, caption, form="contrastive", temperature=1.0)
    assert not torch.allclose(sharp, soft)


def test_contrastive_prefers_matched_captions():
    caption = torch.randn(2, 6, 32)
    image = caption + 0.3 * torch.randn_like(caption)
    matched, _ = guide_loss(image, caption, form="contrastive")
    shuffled, _ = guide_loss(image, caption[:, torch.tensor([1, 2, 3, 4, 5, 0])], form="contrastive")
    assert matched < shuffled
    assert matched < torch.log(torch.tensor(6.0)) < shuffled  # better / worse than chance


def test_contrastive_adds_hinge_and_falls_back_for_one_sample():
    image, caption, retrieved = _states(batch=4)
    without, _ = guide_loss(image, caption, form="contrastive")
    with_r, metrics = guide_loss(image, caption, retrieved, form="contrastive", hinge_weight=0.5)
    hinge = _per_sample_mean(lambda ic, rc: 0.5 * F.softplus(rc - ic), image, caption, retrieved)
    torch.testing.assert_close(with_r - without, hinge)
    torch.testing.assert_close(metrics["hinge"], hinge)
    single, metrics = guide_loss(image[:, :1], caption[:, :1], form="contrastive", pair_weight=2.0)
    torch.testing.assert_close(single, -2.0 * metrics["cos_ic"].mean())


# ---------------------------------------------------------------------------------------------- centring


def test_center_is_subtracted_before_every_cosine():
    hidden = 16
    shared = torch.zeros(hidden)
    shared[0] = 50.0
    own_image, own_caption = torch.zeros(hidden), torch.zeros(hidden)
    own_image[1], own_caption[2] = 1.0, 1.0  # orthogonal contents
    image = (shared + own_image).expand(2, 1, hidden).clone()
    caption = (shared + own_caption).expand(2, 1, hidden).clone()
    _, plain = guide_loss(image, caption)
    assert plain["cos_ic"].min() > 0.99  # the shared direction dominates an uncentred cosine
    center = shared.expand(2, hidden).clone()
    loss, centred = guide_loss(image, caption, center=center)
    torch.testing.assert_close(centred["cos_ic"], torch.zeros(2))
    torch.testing.assert_close(loss, torch.tensor(0.0))


@pytest.mark.parametrize("form", FORMS)
def test_center_equals_guide_loss_on_shifted_states(form):
    image, caption, retrieved = _states()
    center = torch.randn(3, 8)
    loss, metrics = guide_loss(image, caption, retrieved, form=form, center=center)
    shift = center.unsqueeze(1)
    ref_loss, ref_metrics = guide_loss(image - shift, caption - shift, retrieved - shift, form=form)
    torch.testing.assert_close(loss, ref_loss)
    for key in ("cos_ic", "cos_rc", "specificity"):
        torch.testing.assert_close(metrics[key], ref_metrics[key])


def test_caption_center_ema_math_is_exact():
    center = CaptionCenter(num_layers=2, hidden_size=3, momentum=0.75)
    assert not center.initialized and torch.equal(center(), torch.zeros(2, 3))
    first = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[0.0, 4.0, 8.0], [4.0, 0.0, 0.0]]])  # [L=2, B=2, H=3]
    center.update(first)
    assert center.initialized
    expected = first.mean(dim=1)
    assert torch.equal(center(), expected)  # first update = batch mean
    second = torch.tensor([[[8.0, 0.0, 4.0]], [[0.0, 8.0, 0.0]]])  # B = 1
    center.update(second)
    expected = 0.75 * expected + 0.25 * second.mean(dim=1)
    assert torch.equal(center(), expected)  # dyadic values: exact
    lagging = CaptionCenter(2, 3, momentum=0.99)
    lagging.update(first)
    lagging.update(second)
    torch.testing.assert_close(lagging(), 0.99 * first.mean(1) + 0.01 * second.mean(1), rtol=0, atol=1e-6)


def test_caption_center_state_dtype_and_validation():
    center = CaptionCenter(2, 4)
    center.update(torch.zeros(2, 0, 4))  # empty batch: nothing to fold in
    assert not center.initialized
    states = torch.randn(2, 3, 4, requires_grad=True)
    center.update(states.to(torch.bfloat16))
    assert center().dtype == torch.float32 and not center().requires_grad
    restored = CaptionCenter(2, 4)
    restored.load_state_dict(center.state_dict())
    assert restored.initialized and torch.equal(restored(), center())
    center.to(torch.bfloat16)  # a model-wide cast also casts buffers
    center.update(states.detach())
    assert center.mean.dtype == torch.float32
    with pytest.raises(ConfigError, match="--tga_layers"):
        center.update(torch.randn(3, 2, 4))
    with pytest.raises(ConfigError, match="--tga_center_momentum"):
        CaptionCenter(2, 4, momentum=1.0)


def _center_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        center = CaptionCenter(2, 3, momentum=0.5)
        # Rank 0 holds two samples and rank 1 one; at the second step rank 1 has none.
        batches = {0: [torch.ones(2, 2, 3), torch.full((2, 1, 3), 5.0)], 1: [torch.full((2, 1, 3), 4.0), None]}
        for batch in batches[rank]:
            center.update(torch.zeros(2, 0, 3) if batch is None else batch)
        torch.save(center().clone(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_caption_center_all_reduces_across_ranks():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(_center_worker, args=(2, port, out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    # Step 1: sample-weighted mean (1 + 1 + 4) / 3 = 2; step 2: only rank 0's 5 -> 0.5 * 2 + 0.5 * 5.
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], torch.full((2, 3), 3.5))


# ---------------------------------------------------------------------------------------------- specificity


def test_specificity_is_zero_for_collapsed_states_and_high_for_distinct_ones():
    direction = torch.randn(32)
    collapsed_image = direction + 1e-3 * torch.randn(2, 6, 32)
    collapsed_caption = direction + 1e-3 * torch.randn(2, 6, 32)
    _, metrics = guide_loss(collapsed_image, collapsed_caption)
    assert metrics["cos_ic"].min() > 0.99  # the guide loss looks solved...
    assert metrics["specificity"].abs().max() < 1e-3  # ...but nothing is specific
    basis = torch.eye(32)[:6]  # six orthogonal directions, image b aligned with caption b
    distinct = basis.expand(2, 6, 32).clone()
    spec = specificity(distinct, distinct + 0.01 * torch.randn(2, 6, 32))
    assert spec.min() > 0.5


def test_specificity_matches_direct_formula_and_is_nan_for_one_sample():
    image, caption, _ = _states(batch=4)
    expected = []
    for j in range(3):
        per_sample = [
            _cos(image[j, b], caption[j, b])
            - torch.stack([_cos(image[j, b], caption[j, o]) for o in range(4) if o != b]).mean()
            for b in range(4)
        ]
        expected.append(torch.stack(per_sample).mean())
    torch.testing.assert_close(specificity(image, caption), torch.stack(expected))
    _, metrics = guide_loss(image, caption)
    torch.testing.assert_close(metrics["specificity"], torch.stack(expected))
    assert torch.isnan(specificity(image[:, :1], caption[:, :1])).all()
    assert specificity(image[:, :1], caption[:, :1]).shape == (3,)


# ---------------------------------------------------------------------------------------------- validation


def test_empty_batch_gives_a_zero_loss_on_the_graph():
    image = torch.randn(3, 0, 8, requires_grad=True)
    for form in FORMS:
        loss, metrics = guide_loss(image, torch.randn(3, 0, 8), torch.randn(3, 0, 8), form=form)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        loss.backward()
        assert torch.isnan(metrics["cos_ic"]).all() and torch.isnan(metrics["specificity"]).all()


def test_zero_vectors_give_finite_loss_and_gradients():
    image = torch.zeros(2, 3, 8, requires_grad=True)
    loss, _ = guide_loss(image, torch.randn(2, 3, 8), torch.zeros(2, 3, 8), form="contrastive")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(image.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"form": "cosine"}, "--tga_form: unknown guide-loss form 'cosine'"),
        ({"caption_states": torch.randn(2, 4, 8)}, "--tga_form paper.*caption states"),
        ({"retrieved_states": torch.randn(3, 4, 9)}, "retrieved-text states"),
        ({"center": torch.randn(3, 9)}, "caption centre"),
        ({"image_states": torch.randn(4, 8), "caption_states": torch.randn(4, 8)}, "must be \\[layers"),
        ({"form": "released", "step_ratio": 1.5}, "step_ratio"),
        ({"form": "contrastive", "temperature": 0.0}, "--tga_temperature"),
        ({"pair_weight": -1.0}, "--tga_pair_weight"),
        ({"hinge_weight": float("nan")}, "--tga_hinge_weight"),
    ],
)
def test_guide_loss_validates_inputs(kwargs, message):
    image, caption, _ = _states()
    arguments = {"image_states": image, "caption_states": caption, **kwargs}
    with pytest.raises(ConfigError, match=message):
        guide_loss(**arguments)


def test_a_form_added_to_the_registry_is_computed_by_it_with_its_defaults(monkeypatch):
    """A new form is a terms function and one registry entry: guide_loss calls it with the centred states, the
    cosines and its default weights, and validates only what it declares it reads."""
    from tga.align.tga_loss import LossForm

    seen = {}

    def squared_distance(x):
        seen.update(pair_weight=x.pair_weight, hinge_weight=x.hinge_weight, retrieved=x.retrieved is not None)
        return x.pair_weight * (x.image - x.caption).pow(2).mean(), None

    monkeypatch.setitem(FORMS, "squared", LossForm(squared_distance, default_weights=(3.0, 0.5)))
    image, caption = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 4, 8)
    loss, metrics = guide_loss(image, caption, form="squared", step_ratio=5.0, temperature=0.0)
    assert torch.allclose(loss, 3.0 * (image - caption).pow(2).mean())
    assert seen == {"pair_weight": 3.0, "hinge_weight": 0.5, "retrieved": False}
    assert float(metrics["hinge"]) == 0.0
    loss.backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
