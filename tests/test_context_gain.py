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
    with pytest.raises(ValueError, match=r"cap must be at least 1, got 0\.5"):
        context_gain_weights(with_context, without, cap=0.5)
    torch.testing.assert_close(
        context_gain_weights(with_context, without, cap=1.0), torch.tensor([1.0, 1.0, *want[2:]])
    )


def test_the_loss_weighs_taught_tokens_and_reports_the_plain_means(compressor, taught) -> None:
    plain = compressor_loss(compressor, taught, ratio=2, kd_weight=1.0)
    weighted = compressor_loss(compressor, taught, ratio=2, kd_weight=1.0, gain_cap=5.0)
    # Both logged terms are the unweighted means, comparable across runs; the loss is weighted.
    torch.testing.assert_close(weighted.lm_loss, plain.lm_loss)
    torch.testing.assert_close(weighted.kd_loss, plain.kd_loss)
    assert not torch.allclose(weighted.loss, plain.loss)


def bare_logprobs(model, ex) -> torch.Tensor:
    """The base decoder's (adapter off) log-probability of each answer token of ``ex`` ``[A]``
    after its question alone: one unpadded prompt, full logits, read at the last positions."""
    prompt = model.latent_prompt(ex.question, [])
    embeds, mask, targets = model.embed_prompts([prompt], [ex.answer])
    n = len(ex.answer)
    assert targets[0, -n:].tolist() == ex.answer and bool(mask.all())
    with torch.no_grad(), model.adapter("decoder") as decoder, decoder.disable_adapter():
        logits = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    lp = logits[0, -n - 1 : -1].float().log_softmax(-1)
    return lp[torch.arange(n), torch.tensor(ex.answer)]


def expected_weights(model, batch, cap: float) -> torch.Tensor:
    """Per answer token of ``batch``, in order: 1 for an example without teacher targets, else
    ``min(exp(lp_teacher − lp_base), cap)`` normalised to mean 1 over the example's tokens."""
    out = []
    for ex in batch:
        if ex.teacher_ids is None:
            out.append(torch.ones(len(ex.answer)))
            continue
        teacher = torch.tensor(
            [
                lps[ids.index(tok)]
                for tok, ids, lps in zip(ex.answer, ex.teacher_ids, ex.teacher_logprobs)
            ]
        )
        gain = (teacher - bare_logprobs(model, ex)).exp().clamp(max=cap)
        out.append(gain / gain.mean())
    return torch.cat(out)


@pytest.fixture
def interleaved(compressor):
    """``[gold, taught_a, gold, taught_b]``: taught examples at odd rows, answers of 2 and 5
    tokens (gold answers: 3)."""
    gold = to_examples(compressor, SAMPLES)
    a, b = (
        to_examples(
            compressor, teacher_answers(compressor, [s], max_new_tokens=n, top_k=4, progress=False)
        )[0]
        for s, n in ((SAMPLES[0], 2), (SAMPLES[1], 5))
    )
    assert [len(ex.answer) for ex in (a, b)] == [2, 5]
    return [gold[0], a, gold[1], b]


def spy(monkeypatch, name: str) -> list:
    """Record what ``loss.<name>`` returns on each call."""
    seen, real = [], getattr(loss, name)
    monkeypatch.setattr(loss, name, lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    return seen


def test_the_weights_of_an_interleaved_batch_match_a_computation_by_hand(
    compressor, interleaved, monkeypatch
) -> None:
    weights = spy(monkeypatch, "_gain_weights")
    compressor_loss(compressor, interleaved, ratio=2, gain_cap=2.0)
    want = expected_weights(compressor, interleaved, cap=2.0)
    torch.testing.assert_close(weights[0], want)
    taught = torch.cat([want[3:5], want[8:]])
    assert float(taught.max() - taught.min()) > 0.1  # uneven: the check can tell tokens apart
    # The adapter plays no part in the question-alone pass.
    randomize_lora(compressor.decoder, seed=1)
    compressor_loss(compressor, interleaved, ratio=2, gain_cap=2.0)
    torch.testing.assert_close(weights[1], want)


def test_the_kd_term_is_weighted_and_logged_plain(compressor, interleaved, monkeypatch) -> None:
    logits = spy(monkeypatch, "answer_logits")  # the first call is the student's
    out = compressor_loss(
        compressor, interleaved, ratio=2, mse_weight=0.0, kd_weight=1.0, gain_cap=2.0
    )
    student = logits[0]
    lp = student.logits.float().log_softmax(-1)
    ce = -lp[torch.arange(len(student.targets)), student.targets]
    w = expected_weights(compressor, interleaved, cap=2.0)
    kd, start = [], 0
    for ex in interleaved:
        rows = lp[start : start + len(ex.answer)]
        start += len(ex.answer)
        if ex.teacher_ids is None:
            continue
        for row, ids, lps in zip(rows, ex.teacher_ids, ex.teacher_logprobs):
            kd.append(-(torch.tensor(lps).exp() * row[torch.tensor(ids)]).sum())
    kd = torch.stack(kd)
    kd_w = torch.cat([w[3:5], w[8:]])
    assert float(kd_w.max() - kd_w.min()) > 0.1
    weighted_kd = (kd_w * kd).sum() / kd_w.sum()
    assert not torch.allclose(weighted_kd, kd.mean())  # a plain mean would not pass
    torch.testing.assert_close(out.loss, (w * ce).mean() + weighted_kd)
    torch.testing.assert_close(out.kd_loss, kd.mean())
    torch.testing.assert_close(out.lm_loss, ce.mean())


def test_equal_weights_leave_each_examples_contribution_unchanged(
    compressor, interleaved, monkeypatch
) -> None:
    """Weights are normalised per example: whatever their level, equal weights within a taught
    example give the plain loss, even beside gold examples (weight 1) in the same batch."""
    monkeypatch.setattr(loss, "context_gain_weights", lambda a, b, cap: torch.full_like(a, 4.0))
    plain = compressor_loss(compressor, interleaved, ratio=2, kd_weight=1.0)
    equal = compressor_loss(compressor, interleaved, ratio=2, kd_weight=1.0, gain_cap=5.0)
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


def test_teacher_ids_without_log_probabilities_are_named(compressor, taught) -> None:
    ex = taught[0]
    ids, ex.teacher_logprobs = ex.teacher_ids, None
    with pytest.raises(ValueError, match="teacher_ids is set but teacher_logprobs is None"):
        compressor_loss(compressor, [ex], ratio=2, gain_cap=5.0)
    ex.teacher_ids, ex.teacher_logprobs = None, [[0.0] * len(row) for row in ids]
    with pytest.raises(ValueError, match="teacher_logprobs is set but teacher_ids is None"):
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


def test_a_cap_below_one_is_refused() -> None:
    from pydantic import ValidationError

    from semidyn_rag.training import TrainConfig

    with pytest.raises(ValidationError, match=r"gain_cap\n.*greater than or equal to 1"):
        TrainConfig(gain_cap=0.5)
    assert TrainConfig(gain_cap=1.0).gain_cap == 1.0


def test_the_trainer_refuses_a_cap_without_teacher_targets(compressor) -> None:
    from semidyn_rag.training import TrainConfig, Trainer

    config = TrainConfig(steps=1, batch_size=2, gain_cap=3.0, progress=False)
    with pytest.raises(ValueError, match=r"gain_cap=3\.0, but no training example has teacher"):
        Trainer(compressor, SAMPLES, config)  # gold answers only


def test_half_set_teacher_targets_are_refused_without_a_cap_too(compressor, taught) -> None:
    from semidyn_rag.training.loss import TrainExample

    ex = taught[0]
    with pytest.raises(ValueError, match="teacher_ids is set but teacher_logprobs is None"):
        TrainExample(
            contexts=ex.contexts,
            question=ex.question,
            answer=ex.answer,
            y=ex.y,
            teacher_ids=ex.teacher_ids,
        )
    ex.teacher_logprobs = None  # mutated after construction: the loss itself still refuses
    with pytest.raises(ValueError, match="only one of teacher_ids and teacher_logprobs"):
        compressor_loss(compressor, [ex], ratio=2, kd_weight=1.0)
