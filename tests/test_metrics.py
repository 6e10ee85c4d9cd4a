"""The paper's metrics: substring accuracy, the correct-only compression ratio, summaries, fronts."""

from __future__ import annotations

import math
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from semidyn_rag.metrics import (
    EvalRecord,
    EvalSummary,
    ReconstructionCounts,
    average_compression_ratio,
    mcnemar_exact,
    normalize_answer,
    pareto_front,
    reconstruction_counts,
    substring_match,
    summarize,
)

ascii_words = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=12)
separators = st.text(alphabet=string.punctuation + string.whitespace, max_size=3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("New York, N.Y.", "newyorkny"),
        ("  The  answer_is:\t42!  ", "theansweris42"),
        ("Ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ", "fullwidthabc"),
        ("Straße", "strasse"),
        ("Beyonce\u0301", "beyoncé"),  # decomposed accent composes instead of being dropped
        ("東京 (Tokyo)", "東京tokyo"),
        ("?!", ""),
    ],
)
def test_normalize_answer_examples(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@given(st.text())
def test_normalize_is_idempotent_and_leaves_only_letters_and_digits(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once
    assert all(c.isalnum() for c in once)


def test_substring_match_examples() -> None:
    assert substring_match("The Normans were in Normandy in the 10th and 11th centuries.", ["10th"])
    assert substring_match("It is in FRANCE.", ["Germany", "france"])
    assert substring_match("Denmark,Iceland and Norway", ["Denmark, Iceland and Norway"])
    assert substring_match("the U. S. army", ["U.S."])
    assert not substring_match("Paris", ["France"])
    assert not substring_match("1066", ["10 67"])
    assert not substring_match("anything at all", ["", "?", "  "])  # blank references never match
    assert not substring_match("anything", [])


@given(
    prefix=st.text(max_size=20),
    answer=st.text(max_size=20),
    suffix=st.text(max_size=20),
)
def test_output_containing_the_reference_matches(prefix: str, answer: str, suffix: str) -> None:
    output = f"{prefix} {answer} {suffix}"
    assert substring_match(output, [answer]) == bool(normalize_answer(answer))


@given(
    words=st.lists(ascii_words, min_size=1, max_size=6),
    answer=ascii_words,
    seps=st.lists(separators, min_size=7, max_size=7),
    upper=st.booleans(),
)
def test_match_ignores_case_punctuation_and_spacing(
    words: list[str], answer: str, seps: list[str], upper: bool
) -> None:
    plain = " ".join(words)
    decorated = "".join(s + w for s, w in zip(seps, words, strict=False)) + seps[-1]
    decorated = decorated.upper() if upper else decorated.lower()
    assert substring_match(decorated, [answer]) == substring_match(plain, [answer])
    assert substring_match(plain, [answer.swapcase() + "."]) == substring_match(plain, [answer])


def test_average_compression_ratio_by_hand() -> None:
    tokens, latents = [100, 200, 300], [10, 50, 100]
    assert average_compression_ratio(tokens, latents) == pytest.approx(600 / 160)
    assert average_compression_ratio(tokens, latents, [True, False, True]) == pytest.approx(
        400 / 110
    )
    assert average_compression_ratio(tokens, latents, [False, False, False]) is None
    assert average_compression_ratio([], []) is None


def test_failed_aggressive_compression_does_not_inflate_the_ratio() -> None:
    """The paper's validity filter: a crushed context that fails to answer is not counted."""
    base = average_compression_ratio([400, 400], [100, 100], [True, True])
    crushed = average_compression_ratio([400, 400, 4000], [100, 100, 10], [True, True, False])
    assert crushed == base == 4.0
    assert average_compression_ratio([400, 400, 4000], [100, 100, 10]) == pytest.approx(4800 / 210)


@pytest.mark.parametrize(
    ("tokens", "latents", "correct"),
    [([1, 2], [1], None), ([1], [1], [True, False]), ([5], [0], None), ([-1], [1], None)],
)
def test_average_compression_ratio_rejects_bad_input(tokens, latents, correct) -> None:
    with pytest.raises(ValueError):
        average_compression_ratio(tokens, latents, correct)


@given(
    st.lists(
        st.tuples(st.integers(0, 5000), st.integers(1, 500), st.booleans()), min_size=1, max_size=30
    )
)
def test_ratio_over_correct_lies_between_the_correct_samples_ratios(rows) -> None:
    tokens, latents, correct = (list(c) for c in zip(*rows, strict=True))
    got = average_compression_ratio(tokens, latents, correct)
    ratios = [t / m for t, m, ok in rows if ok]
    if not ratios:
        assert got is None
    else:
        assert min(ratios) - 1e-9 <= got <= max(ratios) + 1e-9
    assert average_compression_ratio(tokens, latents, [True] * len(rows)) == pytest.approx(
        average_compression_ratio(tokens, latents)
    )


def _record(i: int, prediction: str, answers: list[str], tokens: int, latents: int, ratios):
    return EvalRecord(
        id=str(i),
        prediction=prediction,
        answers=answers,
        num_tokens=tokens,
        num_latents=latents,
        ratios=ratios,
    )


def test_summarize_by_hand() -> None:
    records = [
        _record(0, "It was Paris.", ["Paris"], 160, 20, [8.0]),
        _record(1, "London", ["Paris"], 400, 25, [16.0]),
        _record(2, "in 1066", ["1066", "1067"], 100, 50, [2.0]),
        _record(3, "no idea", ["Rome"], 300, 40, [4.0, 8.0]),  # two segments
    ]
    assert [r.correct for r in records] == [True, False, True, False]
    summary = summarize(records)
    assert summary.n == 4
    assert summary.accuracy == 0.5
    assert summary.avg_ratio_correct == pytest.approx((160 + 100) / (20 + 50))
    assert summary.avg_ratio == pytest.approx(960 / 135)
    assert summary.mean_sample_ratio == pytest.approx((8 + 16 + 2 + 7.5) / 4)
    log2s = [3, 4, 1, 2, 3]
    mean = sum(log2s) / 5
    assert summary.log2_ratio_variance == pytest.approx(sum((x - mean) ** 2 for x in log2s) / 5)


def test_summarize_without_correct_answers_or_selected_ratios() -> None:
    summary = summarize([_record(0, "no", ["yes"], 100, 10, []), _record(1, "", ["x"], 50, 10, [])])
    assert summary.accuracy == 0.0
    assert summary.avg_ratio_correct is None
    assert summary.log2_ratio_variance is None
    assert summary.avg_ratio == pytest.approx(7.5)
    assert EvalSummary.model_validate_json(summary.model_dump_json()) == summary
    with pytest.raises(ValueError):
        summarize([])


def test_single_fixed_ratio_has_zero_variance() -> None:
    records = [_record(i, "a", ["a"], 64 * (i + 1), 4 * (i + 1), [16.0]) for i in range(5)]
    assert summarize(records).log2_ratio_variance == 0.0


def test_eval_record_validation_and_explicit_correct() -> None:
    explicit = EvalRecord(
        id="x", prediction="Paris", answers=["Paris"], correct=False, num_tokens=8, num_latents=2
    )
    assert explicit.correct is False and explicit.ratio == 4.0 and explicit.ratios == []
    stored = explicit.model_dump_json()
    assert EvalRecord.model_validate_json(stored) == explicit  # a stored verdict is kept
    rescored = EvalRecord.model_validate_json(stored.replace('"correct":false,', ""))
    assert rescored.correct is True
    with pytest.raises(ValidationError):
        _record(0, "a", ["a"], 10, 0, [])
    with pytest.raises(ValidationError):
        _record(0, "a", ["a"], 10, 1, [0.0])


def test_latency_is_the_mean_over_records_that_carry_one() -> None:
    timed = [
        EvalRecord(
            id=str(i), prediction="a", answers=["a"], num_tokens=8, num_latents=2, latency_s=t
        )
        for i, t in enumerate([0.2, None, 0.4])
    ]
    assert summarize(timed).latency_s == pytest.approx(0.3)
    assert summarize(timed[1:2]).latency_s is None
    # records written before latencies were kept still load, without one
    legacy = (
        '{"id":"x","prediction":"a","answers":["a"],"correct":true,"num_tokens":4,"num_latents":1}'
    )
    assert EvalRecord.model_validate_json(legacy).latency_s is None
    with pytest.raises(ValidationError):
        EvalRecord(id="x", prediction="", answers=[], num_tokens=1, num_latents=1, latency_s=-1)


def test_pareto_front_by_hand() -> None:
    points = [(2.0, 0.80), (4.0, 0.78), (4.0, 0.70), (8.0, 0.60), (6.0, 0.55), (8.0, 0.60)]
    assert pareto_front(points) == [(2.0, 0.80), (4.0, 0.78), (8.0, 0.60)]
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 0.5), (3.0, 0.5)]) == [(3.0, 0.5)]
    with pytest.raises(ValueError):
        pareto_front([(math.nan, 0.5)])


@given(st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), max_size=25))
def test_pareto_front_matches_brute_force(raw) -> None:
    points = [(float(r), a / 8) for r, a in raw]

    def dominated(p):
        return any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points)

    expected = sorted({p for p in points if not dominated(p)})
    assert pareto_front(points) == expected


def test_mcnemar_exact_by_hand() -> None:
    a = {"q1": True, "q2": True, "q3": False, "q4": True}
    b = {"q1": True, "q2": False, "q3": False, "q4": False, "q5": True}  # q5: not shared
    assert mcnemar_exact(a, b) == (2, 0, 0.5)  # 2 * P(X <= 0), X ~ Bin(2, 1/2)
    six = {f"q{i}": True for i in range(6)}
    assert mcnemar_exact({k: False for k in six}, six) == (0, 6, 2 / 64)
    assert mcnemar_exact(six, six) == (0, 0, 1.0)  # no discordant pair: no evidence either way


def test_reconstruction_counts_by_hand() -> None:
    counts = reconstruction_counts(
        "In 1986 the Court met in May. The end.", "the court met in 1986, may"
    )
    # in order: "the court met in may"; details: 1986, Court, May ("In"/"The" open sentences)
    assert counts == ReconstructionCounts(words=9, in_order=5, details=3, details_found=1)


def test_a_scrambled_reconstruction_keeps_its_words_but_not_their_order() -> None:
    text = "alpha beta gamma delta epsilon"
    assert reconstruction_counts(text, text).word_recall == 1.0
    assert reconstruction_counts(text, " ".join(reversed(text.split()))).in_order == 1
    assert reconstruction_counts(text, "").in_order == 0


@given(st.text(), st.text())
def test_reconstruction_counts_stay_within_the_reference(reference: str, generated: str) -> None:
    counts = reconstruction_counts(reference, generated)
    assert 0 <= counts.in_order <= counts.words
    assert 0 <= counts.details_found <= counts.details
    assert reconstruction_counts(reference, reference).in_order == counts.words


def test_reconstruction_counts_add_up_to_a_micro_average() -> None:
    short = reconstruction_counts("a b", "a b")
    long = reconstruction_counts("c d e f g h", "")
    total = sum([short, long])
    assert total == ReconstructionCounts(words=8, in_order=2)
    assert total.word_recall == 2 / 8  # not the mean of 1.0 and 0.0
    with pytest.raises(ZeroDivisionError):
        _ = total.detail_recall
    with pytest.raises(ValidationError, match="more than the reference"):
        ReconstructionCounts(words=1, in_order=2)
