"""Distillation targets (teacher answers + top-k) and the token-level distillation loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from semidyn_rag.decoder import LatentPrompt
from semidyn_rag.testing import QA_SAMPLES as SAMPLES
from semidyn_rag.testing import talkative
from semidyn_rag.training.distill import plain_prompt, teacher_answers
from semidyn_rag.training.loss import (
    TrainExample,
    answer_logits,
    compressor_loss,
    distillation_loss,
)
from semidyn_rag.training.samples import (
    TeacherTargets,
    TrainSample,
    read_jsonl,
    to_examples,
    write_jsonl,
)


@pytest.fixture
def compressor(make_compressor):
    return talkative(make_compressor())


def test_teacher_answers_are_the_base_decoders_greedy_answers(compressor):
    out = teacher_answers(compressor, SAMPLES, max_new_tokens=6, top_k=3, progress=False)
    plain = compressor.complete(
        [LatentPrompt(plain_prompt(compressor, s.question, s.contexts)) for s in SAMPLES],
        adapter=False,
        max_new_tokens=6,
    )
    assert [s.answer for s in out] == [p.strip() for p in plain]
    for sample, gold in zip(out, SAMPLES, strict=True):
        t = sample.teacher
        assert t is not None and len(t.answer_ids) == 6
        assert [row[0] for row in t.top_ids] == t.answer_ids  # greedy: each token is the top-1
        assert all(len(r) == 3 for r in t.top_ids)
        assert all(a >= b for r in t.top_logprobs for a, b in itertools.pairwise(r))
        assert all(math.exp(r[0]) <= 1.0 + 1e-6 for r in t.top_logprobs)
        assert sample.provenance["gold"] == gold.answer


def test_teacher_answers_ignore_the_decoder_adapter(compressor, make_compressor):
    other = talkative(make_compressor())
    with torch.no_grad():
        for name, p in other.decoder.named_parameters():
            if "lora_B" in name and ".decoder." in name:
                p.add_(torch.randn_like(p))
    a = teacher_answers(compressor, SAMPLES, max_new_tokens=5, progress=False)
    b = teacher_answers(other, SAMPLES, max_new_tokens=5, progress=False)
    assert [s.teacher for s in a] == [s.teacher for s in b]


def test_distilled_samples_train_on_the_teachers_exact_tokens(compressor, tmp_path):
    out = teacher_answers(compressor, SAMPLES, max_new_tokens=5, top_k=2, progress=False)
    write_jsonl(out, tmp_path / "d.jsonl")
    back = read_jsonl(tmp_path / "d.jsonl")
    assert back == out
    examples = to_examples(compressor, back)
    for ex, s in zip(examples, back, strict=True):
        assert ex.answer == s.teacher.answer_ids  # no re-tokenization, no extra <eos>
        assert ex.teacher_ids == s.teacher.top_ids


def test_teacher_targets_must_cover_every_answer_token():
    with pytest.raises(ValueError, match="2 answer tokens but 1 top-k id rows"):
        TeacherTargets(answer_ids=[1, 2], top_ids=[[1]], top_logprobs=[[0.0], [0.0]])
    with pytest.raises(ValueError, match="differ in width"):
        TeacherTargets(answer_ids=[1], top_ids=[[1, 2]], top_logprobs=[[0.0]])


def _example(answer, ids=None, logprobs=None):
    return TrainExample(
        contexts=[[1]],
        question="q",
        answer=answer,
        y=[math.nan],
        teacher_ids=ids,
        teacher_logprobs=logprobs,
    )


def test_distillation_loss_is_the_sparse_cross_entropy_to_the_teacher():
    torch.manual_seed(0)
    logits = torch.randn(5, 7)  # rows 0-1 predict example 0's answer, rows 2-4 example 1's
    rows = torch.tensor([0, 0, 1, 1, 1])
    teacher = [[4, 0], [6, 1]]
    logp = [[math.log(0.7), math.log(0.2)], [math.log(0.9), math.log(0.05)]]
    examples = [_example([4, 6], teacher, logp), _example([1, 2, 3])]  # row 1: no targets
    got = distillation_loss(logits, rows, examples)
    student = logits.log_softmax(-1)
    want = (
        -(
            (0.7 * student[0, 4] + 0.2 * student[0, 0])
            + (0.9 * student[1, 6] + 0.05 * student[1, 1])
        )
        / 2
    )
    torch.testing.assert_close(got, want)
    assert distillation_loss(logits, rows, [_example([4, 6]), _example([1, 2, 3])]) is None
    with pytest.raises(ValueError, match="cover 1 tokens, the answer has 2"):
        distillation_loss(logits, rows, [_example([4, 6], [[4]], [[0.0]]), examples[1]])


def test_answer_logits_are_the_full_logits_at_the_answer_positions(compressor):
    """The head applied where answers are scored equals slicing the full ``[B, T, V]`` logits,
    and the loss built on it equals the cross-entropy and KD computed on the full logits."""
    out = teacher_answers(compressor, SAMPLES, max_new_tokens=4, top_k=3, progress=False)
    examples = to_examples(compressor, out)
    prompts = [
        compressor.latent_prompt(ex.question, ["x y z"] * len(ex.contexts)) for ex in examples
    ]
    embeds, mask, targets = compressor.embed_prompts(prompts, [ex.answer for ex in examples])
    with compressor.adapter("decoder") as decoder:
        full = decoder(inputs_embeds=embeds, attention_mask=mask).logits
        got = answer_logits(decoder, embeds, mask, targets)
    rows, positions = (targets[:, 1:] != -100).nonzero(as_tuple=True)
    assert got.logits.shape == (sum(len(ex.answer) for ex in examples), full.shape[-1])
    torch.testing.assert_close(got.logits, full[rows, positions], rtol=1e-4, atol=1e-4)
    assert got.targets.tolist() == [t for ex in examples for t in ex.answer]
    want_lm = nn.functional.cross_entropy(
        full[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(
        nn.functional.cross_entropy(got.logits, got.targets), want_lm, rtol=1e-4, atol=1e-4
    )
    first = full[0, (targets[0, 1:] != -100).nonzero().squeeze(-1)].log_softmax(-1)
    ids, probs = torch.tensor(examples[0].teacher_ids), torch.tensor(examples[0].teacher_logprobs)
    want_kd = -(probs.exp() * first.gather(-1, ids)).sum(-1).mean()
    torch.testing.assert_close(
        distillation_loss(got.logits, got.rows, examples[:1]), want_kd, rtol=1e-4, atol=1e-4
    )


def test_answer_logits_refuse_a_model_that_transforms_its_logits(compressor):
    embeds, mask, targets = compressor.embed_prompts(
        [compressor.latent_prompt("q", ["x y z"])], [[1, 2]]
    )
    with compressor.adapter("decoder") as decoder:
        config = decoder.get_base_model().config
        config.final_logit_softcapping = 30.0
        try:
            with pytest.raises(ValueError, match=r"final_logit_softcapping=30\.0"):
                answer_logits(decoder, embeds, mask, targets)
        finally:
            del config.final_logit_softcapping


def test_compressor_loss_adds_the_weighted_distillation_term(compressor):
    out = teacher_answers(compressor, SAMPLES, max_new_tokens=4, top_k=4, progress=False)
    examples = to_examples(compressor, out)
    torch.manual_seed(0)
    plain = compressor_loss(compressor, examples, ratio=2)
    torch.manual_seed(0)
    with_kd = compressor_loss(compressor, examples, ratio=2, kd_weight=0.5)
    assert plain.kd_loss is None and with_kd.kd_loss is not None and with_kd.kd_loss > 0
    torch.testing.assert_close(with_kd.loss, plain.loss + 0.5 * with_kd.kd_loss)


def test_a_private_use_character_in_the_data_is_text(compressor):
    odd = TrainSample(
        contexts=["Paris \ue000 is the capital."], question="Capital \ue000?", answer="x"
    )
    [out] = teacher_answers(compressor, [odd], max_new_tokens=3, progress=False)
    assert out.teacher is not None and len(out.teacher.answer_ids) == 3
