"""Surprisal density labels and the closed-form ratio head."""

from __future__ import annotations

import math

import pytest
import torch

from semidyn_rag.training.density import (
    Surprisal,
    bits_per_latent,
    fit_ratio_head,
    head_features,
    install_head,
    surprisal,
    surprisal_label,
)

TEXTS = [
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "the the the the the the the the the the the the",
]


def test_surprisal_is_the_base_decoders_cross_entropy_in_bits(compressor):
    got = surprisal(compressor, TEXTS, batch_size=1, progress=False)
    tok = compressor.decoder_tokenizer
    for text, s in zip(TEXTS, got, strict=True):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad(), compressor.decoder.disable_adapter():
            logits = compressor.decoder(input_ids=ids).logits[0, :-1]
        nats = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        assert s.tokens == ids.shape[1] - 1
        assert s.bits == pytest.approx(float(nats) / math.log(2), rel=1e-4)


def test_surprisal_does_not_depend_on_batching_or_padding(compressor):
    one = surprisal(compressor, TEXTS, batch_size=1, progress=False)
    both = surprisal(compressor, TEXTS, batch_size=2, progress=False)
    for a, b in zip(one, both, strict=True):
        assert a.tokens == b.tokens and a.bits == pytest.approx(b.bits, rel=1e-4)


def test_surprisal_refuses_a_text_with_nothing_to_score(compressor):
    with pytest.raises(ValueError, match="text 1 has 1 token"):
        surprisal(compressor, [TEXTS[0], "a"], progress=False)


def test_label_follows_density_and_the_calibration():
    dense, sparse = Surprisal(bits=400.0, tokens=100), Surprisal(bits=100.0, tokens=100)
    b = bits_per_latent(dense, ratio=2)
    assert surprisal_label(dense, b) == pytest.approx(1.0)  # the reference gets its ratio
    assert surprisal_label(sparse, b) == pytest.approx(3.0)  # 4x fewer bits: 4x the ratio
    with pytest.raises(ValueError, match="zero surprisal"):
        surprisal_label(Surprisal(bits=0.0, tokens=3), b)
    with pytest.raises(ValueError, match="must be positive"):
        bits_per_latent(0.0, 2)


def test_ridge_head_recovers_a_linear_rule():
    torch.manual_seed(0)
    x = torch.randn(200, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 7.0
    w = torch.tensor([0.5, -0.02, 3.0, 0.0, 1.0])
    y = x @ w + 0.25
    fit = fit_ratio_head(x, y, ridge=1e-8)
    torch.testing.assert_close(fit.weight, w, atol=1e-3, rtol=1e-3)
    assert fit.bias == pytest.approx(0.25, abs=1e-2) and fit.train_rmse < 1e-3
    shrunk = fit_ratio_head(x, y, ridge=10.0)
    assert shrunk.weight.norm() < fit.weight.norm()
    with pytest.raises(ValueError, match="need features"):
        fit_ratio_head(x, y[:-1])


def test_an_installed_head_predicts_the_fitted_labels(make_compressor):
    model = make_compressor(pool_layer=1, head_layer=1)
    texts = [f"fact number {i} is that {i} times {i} is {i * i}." for i in range(40)]
    feats = head_features(model, texts, batch_size=7)
    assert feats.shape == (40, model.ratio_head.in_features)
    labels = feats[:, :3].sum(-1) * 0.1 + 2.0  # some linear rule of the features
    install_head(model, fit_ratio_head(feats, labels, ridge=1e-8))
    _, y = model.encode(model.tokenize(texts))
    torch.testing.assert_close(y, labels, atol=1e-3, rtol=1e-3)
