"""Cloze questions (semidyn_rag.training.cloze): which spans are blanked, and that the answer is
never left in plain sight."""

from __future__ import annotations

import pytest

from semidyn_rag.training.cloze import (
    BLANK,
    MAX_CONTEXT_WORDS,
    candidate_spans,
    cloze_options,
    cloze_samples,
    sentences,
)


def _spans(sentence: str) -> list[str]:
    words = sentence.split()
    return [" ".join(words[a:b]) for a, b in candidate_spans(words)]


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("He was born on 18 August 1870 in Kiev.", ["18 August 1870", "Kiev."]),
        ("The Bank of England raised rates.", ["Bank of England"]),
        ("They toured Paris, France and Rome.", ["Paris,", "France", "Rome."]),
        ("In 1922 the Communist Reds won.", ["1922", "Communist Reds"]),
        ("It was Kornilov (Russian: general) who led.", ["Kornilov", "(Russian:"]),
        ("Rove goat: The Rove is a breed of goat.", ["Rove"]),  # after a colon: a clause
        ("He said: In Rome The Senate met.", ["Rome", "Senate"]),  # function words start none
        ('It aired on The Simpsons"<nowiki> once.', []),  # markup inside a word
        ("Names are what Alpha Beta Gamma Delta Epsilon lists.", []),  # over four words
        ("Nothing here is capitalised at all.", []),
    ],
)
def test_candidate_spans(sentence: str, expected: list[str]) -> None:
    assert _spans(sentence) == expected


def test_sentences_split_at_ends_only() -> None:
    text = "It opened in 1901. Its 3.5 km line runs east! Does it? yes it does."
    assert sentences(text) == [
        "It opened in 1901.",
        "Its 3.5 km line runs east!",
        "Does it? yes it does.",
    ]


def test_cloze_sample_blanks_a_span_of_its_context() -> None:
    text = "The tower stands in the old town. It was built by Gustave Eiffel in 1889 for a fair."
    (sample,) = cloze_samples([text], source="test")
    assert sample.contexts == [text] and sample.id == "cloze-0-0" and sample.source == "test"
    span = sample.provenance["span"]
    assert span in {"Gustave Eiffel", "1889"} and sample.provenance["kind"] == "cloze"
    assert BLANK in sample.question and span not in sample.question
    # the answer is the sentence as the text has it, blank filled: the decoder's answer style
    assert sample.answer == "It was built by Gustave Eiffel in 1889 for a fair."


def test_spans_and_sentences_are_substrings_of_the_text() -> None:
    # a no-break space inside a name: a span re-joined from split words would not be in the text
    text = "The road meets US\xa011 and then runs north to the old town of Ely."
    options = cloze_options(text)
    assert {o.span for o in options} == {"US\xa011", "Ely"}
    assert all(o.span in text and o.sentence in text for o in options)
    assert all(o.blanked.replace(BLANK, o.span) == o.sentence for o in options)


def test_a_span_the_prompt_itself_holds_is_never_asked() -> None:
    options = cloze_options("The film Fill was released in 1999 by a small studio.")
    assert [o.span for o in options] == ["1999"]  # "Fill" is in "Fill in the blank ..."


def test_a_span_repeated_in_its_sentence_is_never_asked() -> None:
    # "Lyon" is the only candidate and appears twice: blanking one leaves the answer visible
    text = "Trains from the south reach Lyon before they leave Lyon again."
    assert cloze_options(text) == []


def test_no_sample_without_a_name_or_number_or_in_short_sentences() -> None:
    assert cloze_options("all lower case words, and nothing else to ask.") == []
    assert cloze_options("It is Paris. Go.") == []  # under six words


def test_sentences_past_the_kept_context_are_not_asked() -> None:
    filler = " ".join(["word"] * (MAX_CONTEXT_WORDS + 10)) + "."
    text = filler + " Then it moved to the city of Madrid in the spring."
    assert cloze_options(text) == []


def test_cloze_samples_are_deterministic_one_per_distinct_text() -> None:
    texts = [
        "The river flows past Vienna and into the sea.",
        "The river flows past Vienna and into the sea.",
        "no names here at all in this one sentence.",
        "A bridge was opened in 1932 by the mayor of the town.",
    ]
    first = cloze_samples(texts, seed=3)
    assert [s.id for s in first] == ["cloze-0-0", "cloze-2-0"]
    assert [s.provenance["span"] for s in first] == ["Vienna", "1932"]
    assert [s.question for s in cloze_samples(texts, seed=3)] == [s.question for s in first]


def test_several_cloze_samples_per_text_ask_different_blanks() -> None:
    text = "It was built by Gustave Eiffel in 1889 for the fair in Paris that year."
    samples = cloze_samples([text], per_text=5)
    spans = sorted(s.provenance["span"] for s in samples)
    assert spans == ["1889", "Gustave Eiffel", "Paris"]  # all there are
    assert len({s.id for s in samples}) == 3
    with pytest.raises(ValueError, match="per_text"):
        cloze_samples([text], per_text=0)
