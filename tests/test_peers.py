"""Token budgets and truncation of the hard-compression peers (pure: tokenizers are callables)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from semidyn_rag.peers import HardCompression, token_budget, truncate_ids, truncate_texts


def words(text: str) -> list[int]:
    """A toy tokenizer: one id per whitespace-separated word (ids index WORDS)."""
    return [WORDS.index(w) for w in text.split()]


def unwords(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "near",
    "river",
    "bank",
]


@pytest.mark.parametrize(
    ("n", "ratio", "budget"),
    [(10, 4, 3), (8, 4, 2), (9, 4, 3), (1, 32, 1), (0, 4, 0), (7, 1, 7), (10, 2.5, 4)],
)
def test_budget_is_the_ceiling_of_n_over_r(n, ratio, budget):
    assert token_budget(n, ratio) == budget


@pytest.mark.parametrize("ratio", [0.5, 0, -2, math.nan])
def test_budget_refuses_ratios_that_do_not_compress(ratio):
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        token_budget(10, ratio)


def test_budget_refuses_negative_counts():
    with pytest.raises(ValueError, match="token count"):
        token_budget(-1, 2)


@given(st.lists(st.integers(0, 999), max_size=300), st.floats(1, 64))
def test_truncation_keeps_exactly_the_first_budget_ids(ids, ratio):
    kept = truncate_ids(ids, ratio)
    assert kept == ids[: math.ceil(len(ids) / ratio)]
    assert len(kept) * ratio >= len(ids) > (len(kept) - 1) * ratio or not ids


def test_truncate_texts_cuts_each_text_to_its_own_budget():
    texts = ["the quick brown fox jumps over a lazy dog", "near river bank"]
    out = truncate_texts(texts, 4, words, unwords)
    assert out == [("the quick brown", 3, 9), ("near", 1, 3)]


def test_truncation_never_splits_a_character():
    """A byte-level cut inside "é" backs off before it: the kept text is a prefix, at most budget."""

    def encode(text: str) -> list[int]:
        return list(text.encode())

    def decode(ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    text = "caf\u00e9 au lait"  # 13 bytes, "é" is bytes 3..4
    ((kept, n_kept, n),) = truncate_texts([text], 13 / 4, encode, decode)
    assert n == 13 and n_kept == 3 and kept == "caf"
    ((kept, n_kept, _),) = truncate_texts([text], 13 / 5, encode, decode)
    assert kept == "caf\u00e9" and n_kept == 5


def test_hard_compression_reports_the_ratio_it_reached():
    assert HardCompression("x", original_tokens=100, kept_tokens=30, seconds=0.1).ratio == 100 / 30
    assert HardCompression("", original_tokens=5, kept_tokens=0, seconds=0.0).ratio == math.inf
