"""Each pretraining loss against an independent computation by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniter_ds.model import IGNORE_INDEX, UniterForPretraining, build_batch

from .helpers import collate, random_sample


@pytest.fixture
def setup(tiny_config):
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).eval()
    g = torch.Generator().manual_seed(7)
    samples = [random_sample(tiny_config, t, r, g) for t, r in [(6, 4), (10, 8), (4, 5)]]
    return model, samples


def _head_transform(seq, x):
    dense, _, norm = seq
    h = x @ dense.weight.T + dense.bias
    h = 0.5 * h * (1 + torch.erf(h / np.sqrt(2.0)))
    return torch.nn.functional.layer_norm(h, h.shape[-1:], norm.weight, norm.bias, norm.eps)


def _log_softmax(logits):
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def test_mlm_is_cross_entropy_at_masked_tokens_only(setup):
    model, samples = setup
    batch = collate(samples)
    with torch.no_grad():
        out = model(batch, "mlm")
        states = model.uniter(batch).per_sample()
        losses = []
        for s, st in zip(samples, states):
            positions = (s["txt_labels"] != IGNORE_INDEX).nonzero().squeeze(1)
            h = _head_transform(model.mlm_head.transform, st["text"][positions])
            logits = h @ model.uniter.embeddings.word_embeddings.weight.T + model.mlm_head.bias
            logp = _log_softmax(logits)
            losses.append(-logp[torch.arange(len(positions)), s["txt_labels"][positions]])
        expected = torch.cat(losses)
    assert out.num_items == sum(int((s["txt_labels"] != IGNORE_INDEX).sum()) for s in samples)
    torch.testing.assert_close(out.item_losses, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.mean(), atol=1e-5, rtol=1e-5)


def test_mlm_decoder_is_tied_to_word_embeddings(setup):
    model, _ = setup
    assert model.mlm_head.decoder.weight is model.uniter.embeddings.word_embeddings.weight


def test_mrfr_regresses_the_original_feature_through_the_tied_projection(setup):
    model, samples = setup
    assert model.mrfr_head.regress.weight is model.uniter.img_embeddings.img_linear.weight
    batch = collate(samples)
    with torch.no_grad():
        out = model(batch, "mrfr")
        states = model.uniter(batch).per_sample()
        expected = []
        for s, st in zip(samples, states):
            h = _head_transform(model.mrfr_head.transform, st["regions"][s["img_masks"]])
            # The image input projection's weight [H, img_dim], used transposed: H -> img_dim.
            prediction = h @ model.uniter.img_embeddings.img_linear.weight + model.mrfr_head.regress.bias
            target = s["img_feat"][s["img_masks"]]  # the unmasked feature, not the zeroed input
            expected.append(((prediction - target) ** 2).mean(-1))
        expected = torch.cat(expected)
    torch.testing.assert_close(out.item_losses, expected, atol=1e-5, rtol=1e-5)
    assert out.num_items == sum(int(s["img_masks"].sum()) for s in samples)


def test_mrc_targets_the_best_non_background_class(setup, tiny_config):
    model, samples = setup
    # Make background (class 0) the detector's top class on every region: it must never be a target.
    for s in samples:
        s["img_soft_labels"][:, 0] = 0.9
        s["img_soft_labels"] /= s["img_soft_labels"].sum(-1, keepdim=True)
    batch = collate(samples)
    with torch.no_grad():
        out = model(batch, "mrc")
        states = model.uniter(batch).per_sample()
        expected = []
        for s, st in zip(samples, states):
            h = _head_transform(model.mrc_head.transform, st["regions"][s["img_masks"]])
            logits = h @ model.mrc_head.classifier.weight.T + model.mrc_head.classifier.bias
            soft = s["img_soft_labels"][s["img_masks"]]
            target = torch.tensor([int(np.argmax(row[1:].numpy())) + 1 for row in soft])
            assert torch.all(target != 0)
            expected.append(-_log_softmax(logits)[torch.arange(len(target)), target])
        expected = torch.cat(expected)
    torch.testing.assert_close(out.item_losses, expected, atol=1e-5, rtol=1e-5)


def _kl_terms(model, samples, batch) -> torch.Tensor:
    """[masked regions, classes]: p * (log p - log q) of every masked region, by hand."""
    states = model.uniter(batch).per_sample()
    terms = []
    for s, st in zip(samples, states):
        h = _head_transform(model.mrc_head.transform, st["regions"][s["img_masks"]])
        logq = _log_softmax(h @ model.mrc_head.classifier.weight.T + model.mrc_head.classifier.bias)
        p = s["img_soft_labels"][s["img_masks"]]
        terms.append(p * (torch.log(p) - logq))
    return torch.cat(terms)


def test_mrc_kl_default_is_the_reference_objective(setup, tiny_config):
    """The reference trains on kl_div(log q, p, reduction='none').mean(): over regions AND classes."""
    model, samples = setup
    batch = collate(samples)
    with torch.no_grad():
        out = model(batch, "mrc-kl")
        terms = _kl_terms(model, samples, batch)
    assert terms.shape[1] == tiny_config.img_label_dim
    torch.testing.assert_close(out.loss, terms.mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.item_losses, terms.sum(-1) / tiny_config.img_label_dim, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.parts["kl_per_region"], terms.sum(-1).mean(), atol=1e-5, rtol=1e-5)
    # Accuracy as the reference's validation counts it for MRC-kl: argmax over all classes, background too.
    soft = torch.cat([s["img_soft_labels"][s["img_masks"]] for s in samples])
    logq = torch.log(soft) - terms / soft  # q from the KL terms: p (log p - log q)
    assert int(out.num_correct) == int((logq.argmax(-1) == soft.argmax(-1)).sum())


def test_mrc_kl_per_region_option_is_each_regions_whole_kl(setup, tiny_config):
    model, samples = setup
    per_region = UniterForPretraining(tiny_config, mrc_kl="per_region").eval()
    per_region.load_state_dict(model.state_dict())
    batch = collate(samples)
    with torch.no_grad():
        out = per_region(batch, "mrc-kl")
        expected = _kl_terms(per_region, samples, batch).sum(-1)
    torch.testing.assert_close(out.item_losses, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.mean(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mrc_kl='sum'"):
        UniterForPretraining(tiny_config, mrc_kl="sum")


def _ipot_by_hand(cost: np.ndarray, beta=0.5, iterations=50) -> np.ndarray:
    """IPOT for one unpadded problem, straight from Xie et al. (2018), Algorithm 1, in float64."""
    m, n = cost.shape
    kernel = np.exp(-cost / beta)
    plan = np.ones((m, n))
    b = np.ones(n) / n
    for _ in range(iterations):
        q = kernel * plan
        a = (1 / m) / (q @ b)
        b = (1 / n) / (q.T @ a)
        plan = a[:, None] * q * b[None, :]
    return plan


def test_itm_with_wra_is_cross_entropy_plus_tenth_of_ot(setup, tiny_config):
    model, samples = setup
    targets = [1, 0, 1]
    batch = collate(samples, itm_targets=targets)
    with torch.no_grad():
        out = model(batch, "itm")
        states = model.uniter(batch).per_sample()
        logits = torch.stack([st["pooled"] for st in states]) @ model.itm_head.weight.T + model.itm_head.bias
        ce = -_log_softmax(logits)[torch.arange(3), torch.tensor(targets)]
        distances = []
        for st in states:
            t = st["text"] / st["text"].norm(dim=-1, keepdim=True)
            r = st["regions"] / st["regions"].norm(dim=-1, keepdim=True)
            cost = (1 - t @ r.T).double().numpy()
            distances.append(float((cost * _ipot_by_hand(cost)).sum()))
    pos = sum(d for d, y in zip(distances, targets) if y == 1)
    neg = sum(d for d, y in zip(distances, targets) if y == 0)
    ot_loss = (pos - neg) / len(targets)
    # Our IPOT additionally rounds the plan onto the exact marginals: a difference of < 1% of the OT term.
    np.testing.assert_allclose(float(out.loss), float(ce.mean()) + 0.1 * ot_loss, rtol=0, atol=2e-3 * 0.1)
    np.testing.assert_allclose(float(out.parts["itm_ce"]), float(ce.mean()), rtol=1e-5)
    np.testing.assert_allclose(float(out.parts["wra_ot"]), ot_loss, rtol=1e-2)
    assert int(out.num_correct) == int((logits.argmax(-1) == torch.tensor(targets)).sum())

    plain = UniterForPretraining(tiny_config, wra_weight=0.0).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(batch, "itm").loss, ce.mean(), atol=1e-5, rtol=1e-5)


def test_losses_backpropagate_into_the_encoder(setup):
    model, samples = setup
    model.train()
    batch = collate(samples, itm_targets=[1, 0, 1])
    for task in ("mlm", "mrfr", "mrc", "mrc-kl", "itm"):
        model.zero_grad()
        model(batch, task).loss.backward()
        grad = model.uniter.encoder.layers[0].attn.qkv.weight.grad
        assert grad is not None and grad.abs().sum() > 0, task


def test_text_only_batch_has_no_region_targets(tiny_config):
    model = UniterForPretraining(tiny_config).eval()
    ids = [torch.tensor([1, 7, 8, 2])]
    batch = build_batch(ids, [torch.zeros(0, tiny_config.img_dim)], [torch.zeros(0, 7)],
                        txt_labels=[torch.tensor([IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX])])
    with torch.no_grad():
        assert model(batch, "mlm").num_items == 1
