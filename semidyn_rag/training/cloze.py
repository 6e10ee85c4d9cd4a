"""Cloze questions: a sentence of the context with one name or number blanked, answered by it.

Cloze data asks for the exact tokens a compressed context loses first (names, numbers) and can be
drawn from any paragraph without an LLM or annotations, so a corpus of thousands of paragraphs
becomes questions the decoder cannot answer from memory. Cloze questions as training data for
reading comprehension: Hermann et al. 2015 (CNN/Daily Mail) and Lewis et al. 2019 ("Unsupervised
Question Answering by Cloze Translation"), whose Wikipedia clozes taught SQuAD-style extraction.
Pure text logic: no model objects.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from .samples import TrainSample

CLOZE_PROMPT = "Fill in the blank from the context: {sentence}"
"""The question of a cloze sample; ``{sentence}`` holds the sentence with `BLANK` in it."""
BLANK = "_____"
MAX_SPAN_WORDS = 4
MIN_SENTENCE_WORDS = 6
MAX_CONTEXT_WORDS = 240
"""Sentences are drawn from a paragraph's first words only: a training context is cut to
``max_context_tokens`` (384 in the recipe) before the encoder reads it."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_EDGE = "\"'()[],;:.!?"
_NUMBER = re.compile(r"^\d[\d,.]*$")
_CONNECTORS = frozenset({"of", "de", "the", "von", "van", "la", "du", "del"})


def sentences(text: str) -> list[str]:
    """``text`` split after ``.``, ``!`` or ``?`` followed by space and a capital, digit or quote
    (a heuristic: abbreviations such as "St. Louis" split too, which only costs a candidate)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _is_entity_word(word: str) -> bool:
    core = word.strip(_EDGE)
    return bool(core) and (core[0].isupper() or bool(_NUMBER.match(core)))


def _is_name_word(word: str) -> bool:
    core = word.strip(_EDGE)
    return bool(core) and core[0].isupper()


def _breaks(word: str) -> bool:
    """Whether punctuation after ``word`` ends a run of names ("Paris," then "France")."""
    return word != word.rstrip(_EDGE)


def _opens(word: str) -> bool:
    """Whether punctuation before ``word`` starts another phrase ("Kornilov (Russian")."""
    return word != word.lstrip(_EDGE)


def candidate_spans(words: list[str]) -> list[tuple[int, int]]:
    """Word ranges ``[start, end)`` of a sentence's names and numbers: maximal runs of capitalised
    or numeric words ("18 August 1870"; names joined by "of", "de", ... as in "Bank of England"),
    at most `MAX_SPAN_WORDS` long, never the sentence's first word (capitalised whatever it is),
    and never across punctuation ("Paris, France" and "Kornilov (Russian" are two runs)."""
    spans: list[tuple[int, int]] = []
    i = 1
    while i < len(words):
        if not _is_entity_word(words[i]):
            i += 1
            continue
        end = i + 1
        while end < len(words) and not _breaks(words[end - 1]) and not _opens(words[end]):
            nxt = words[end]
            if _is_entity_word(nxt):
                end += 1
            elif (
                nxt.lower() in _CONNECTORS
                and end + 1 < len(words)
                and _is_name_word(words[end - 1])
                and _is_name_word(words[end + 1])
                and not _opens(words[end + 1])
            ):
                end += 2
            else:
                break
        if end - i <= MAX_SPAN_WORDS:
            spans.append((i, end))
        i = end
    return spans


def _blank(words: list[str], start: int, end: int) -> tuple[str, str]:
    """The sentence with words ``[start, end)`` blanked (outer punctuation kept) and the span."""
    first, last = words[start], words[end - 1]
    lead = first[: len(first) - len(first.lstrip(_EDGE))]
    trail = last[len(last.rstrip(_EDGE)) :]
    span = " ".join(words[start:end])[len(lead) : len(" ".join(words[start:end])) - len(trail)]
    sentence = " ".join([*words[:start], f"{lead}{BLANK}{trail}", *words[end:]])
    return sentence, span


def cloze_options(text: str) -> list[tuple[str, str]]:
    """Every ``(blanked sentence, span)`` of ``text``: a sentence within its first
    `MAX_CONTEXT_WORDS` words, of at least `MIN_SENTENCE_WORDS` words, with one name or number
    (`candidate_spans`) blanked that does not also appear elsewhere in the sentence (the blank
    would be answered in plain sight)."""
    options: list[tuple[str, str]] = []
    seen = 0
    for sentence in sentences(text):
        words = sentence.split()
        seen += len(words)
        if seen > MAX_CONTEXT_WORDS:
            break
        if len(words) < MIN_SENTENCE_WORDS:
            continue
        for start, end in candidate_spans(words):
            blanked, span = _blank(words, start, end)
            if len(span) > 1 and span.lower() not in blanked.lower():
                options.append((blanked, span))
    return options


def _sample(text: str, blanked: str, span: str, id: str, source: str) -> TrainSample:
    return TrainSample(
        id=id,
        contexts=[text],
        question=CLOZE_PROMPT.format(sentence=blanked),
        answer=span,
        source=source,
        provenance={"kind": "cloze"},
    )


def cloze_sample(
    text: str, rng: random.Random, id: str, source: str = "unknown"
) -> TrainSample | None:
    """One cloze sample on ``text`` (its context), drawn with ``rng`` from `cloze_options`, or
    ``None`` when it has none."""
    options = cloze_options(text)
    if not options:
        return None
    return _sample(text, *rng.choice(options), id, source)


def cloze_samples(
    texts: Iterable[str], per_text: int = 1, seed: int = 0, source: str = "unknown"
) -> list[TrainSample]:
    """Up to ``per_text`` cloze samples on each distinct text (distinct options of
    `cloze_options`, drawn without replacement), ids ``cloze-<text>-<k>`` by the text's position;
    deterministic for a ``seed``. More than one per text keeps a paragraph's answers from being
    learnt by heart when a long run passes over the same paragraphs many times.

    Raises:
        ValueError: ``per_text`` is below 1.
    """
    if per_text < 1:
        raise ValueError(f"per_text must be at least 1, got {per_text}")
    rng = random.Random(seed)
    out = []
    for i, text in enumerate(dict.fromkeys(texts)):
        options = cloze_options(text)
        for k, (blanked, span) in enumerate(rng.sample(options, min(per_text, len(options)))):
            out.append(_sample(text, blanked, span, f"cloze-{i}-{k}", source))
    return out
