"""Context-gain token weights (LongCE): answer tokens weighed by what the context adds."""

from __future__ import annotations

import math

import pytest
import torch

from semidyn_rag.testing import QA_SAMPLES as SAMPLES
from semidyn_rag.testing import randomize_lora, talkative
from semidyn_rag.training import loss
from semidyn_rag.training.distill import teacher_answers
from semidyn_rag.training.loss import compressor_loss, context_gain_weights
from semidyn_rag.training.samples import to_examples


@pytest.fixture
def compressor(make_compressor):
    return talkative(make_compressor())


@pytest.fixture
def taught(compressor):
    return to_examples(
        compressor, teacher_answers(compressor, SAMPLES, max_new_tokens=4, top_k=4, progress=False)
    )


def test_weights_are_the_capped_exponential_of_the_log_probability_gain() -> None:
    with_context = torch.tensor([-0.1, -2.0, -1.0, -5.0])
    without = torch.tensor([-3.0, -2.0, -0.5, -4.0])
    got = context_gain_weights(with_context, without, cap=5.0)
    want = [min(math.exp(2.9), 5.0), 1.0, math.exp(-0.5), math.exp(-1.0)]
    torch.testing.assert_close(got, torch.tensor(want))
    with pytest.raises(ValueError, match=r"\(3,\) against \(4,\)"):
        context_gain_weights(with_context[:3], without, cap=5.0)
    with pytest.raises(ValueError, match="cap must be above 0"):
        context_gain_weights(with_context, without, cap=0.0)


def test_the_loss_weighs_taught_tokens_and_reports_the_plain_mean(compressor, taught) -> None:
    plain = compressor_loss(compressor, taught, ratio=2, kd_weight=1.0)
    weighted = compressor_loss(compressor, taught, ratio=2, kd_weight=1.0, gain_cap=5.0)
    torch.testing.assert_close(weighted.lm_loss, plain.lm_loss)  # reported unweighted
    assert not torch.allclose(weighted.loss, plain.loss)
    # A cap below every gain gives every taught token the same weight: the plain means again.
    equal = compressor_loss(compressor, taught, ratio=2, kd_weight=1.0, gain_cap=1e-30)
    torch.testing.assert_close(equal.loss, plain.loss)
    torch.testing.assert_close(equal.kd_loss, plain.kd_loss)


def test_the_gain_is_the_teachers_log_probability_against_the_base_decoder_without_context(
    compressor, taught, monkeypatch
) -> None:
    seen = []
    real = loss.context_gain_weights
    monkeypatch.setattr(
        loss, "context_gain_weights", lambda a, b, cap: seen.append((a, b)) or real(a, b, cap)
    )
    compressor_loss(compressor, taught, ratio=2, gain_cap=5.0)
    assert len(seen) == len(taught)
    for (with_context, without), ex in zip(seen, taught, strict=True):
        first = [
            lps[ids.index(tok)]
            for tok, ids, lps in zip(ex.answer, ex.teacher_ids, ex.teacher_logprobs)
        ]
        torch.testing.assert_close(with_context, torch.tensor(first))
        assert without.shape == with_context.shape and bool((without <= 0).all())
    # The base decoder answers without context: the decoder's adapter changes nothing.
    randomize_lora(compressor.decoder)
    before = [b for _, b in seen]
    seen.clear()
    compressor_loss(compressor, taught, ratio=2, gain_cap=5.0)
    for (_, without), old in zip(seen, before, strict=True):
        torch.testing.assert_close(without, old)


def test_examples_without_teacher_targets_weigh_one(compressor, taught) -> None:
    gold = to_examples(compressor, SAMPLES)  # gold answers, no teacher
    plain = compressor_loss(compressor, gold, ratio=2)
    torch.testing.assert_close(
        compressor_loss(compressor, gold, ratio=2, gain_cap=5.0).loss, plain.loss
    )
    mixed = [taught[0], gold[1]]
    assert not torch.allclose(
        compressor_loss(compressor, mixed, ratio=2, gain_cap=5.0).loss,
        compressor_loss(compressor, mixed, ratio=2).loss,
    )


def test_an_answer_token_its_teacher_did_not_rank_is_refused(compressor, taught) -> None:
    ex = taught[0]
    ex.teacher_ids = [
        [i for i in ids if i != tok] + [-1] for tok, ids in zip(ex.answer, ex.teacher_ids)
    ]
    with pytest.raises(ValueError, match=r"answer token 0 .* is not in its teacher's"):
        compressor_loss(compressor, [ex], ratio=2, gain_cap=5.0)
    ex.teacher_ids = ex.teacher_ids[:-1]
    with pytest.raises(ValueError, match="teacher targets cover"):
        compressor_loss(compressor, [ex], ratio=2, gain_cap=5.0)


def test_the_trainer_passes_its_cap_and_the_regressor_refuses_one(compressor, monkeypatch) -> None:
    from semidyn_rag.training import TrainConfig, Trainer
    from semidyn_rag.training.regressor import regressor_loss

    out = teacher_answers(compressor, SAMPLES, max_new_tokens=4, top_k=4, progress=False)
    calls = []
    real = loss.context_gain_weights
    monkeypatch.setattr(
        loss, "context_gain_weights", lambda a, b, cap: calls.append(cap) or real(a, b, cap)
    )
    config = TrainConfig(
        steps=2, batch_size=2, kd_weight=1.0, ratio_sampling="mode", progress=False
    )
    Trainer(compressor, out, config).train()
    assert calls == []
    Trainer(compressor, out, config.model_copy(update={"gain_cap": 3.0})).train()
    assert calls and set(calls) == {3.0}
    with pytest.raises(ValueError, match=r"gain_cap=3\.0"):
        regressor_loss(None, [], gain_cap=3.0)
    with pytest.raises(ValueError, match="gain_cap"):
        TrainConfig(gain_cap=0.0)
