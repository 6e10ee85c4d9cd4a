"""Cloze questions: a sentence of the context with one name or number blanked.

Cloze data asks for the exact tokens a compressed context loses first (names, numbers) and can be
drawn from any paragraph without an LLM or annotations, so a corpus of thousands of paragraphs
becomes questions the decoder cannot answer from memory. Cloze questions as training data for
reading comprehension: Hermann et al. 2015 (CNN/Daily Mail) and Lewis et al. 2019 ("Unsupervised
Question Answering by Cloze Translation"), whose Wikipedia clozes taught SQuAD-style extraction.

The answer is the whole sentence, blank filled: the base decoder answers questions in sentences
that restate them, the distilled answers teach that style, and a bare span would teach the
fragments the substring metric misses. Pure text logic: no model objects.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

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
_WORD = re.compile(r"\S+")
_EDGE = "\"'()[],;:.!?"
_NUMBER = re.compile(r"^\d[\d,.]*$")
_CLEAN = re.compile(r"^[\w'’.&/-]+$")
"""A word of a span, outer punctuation stripped: no brackets, quotes or markup inside."""
_CONNECTORS = frozenset({"of", "de", "the", "von", "van", "la", "du", "del"})
_FUNCTION_WORDS = frozenset(
    {
        *("a", "an", "the", "in", "on", "at", "of", "to", "for", "from", "by", "with", "as"),
        *("into", "after", "before", "during", "since", "until", "according", "following"),
        *("despite", "unlike", "between", "among", "this", "that", "these", "those", "it"),
        *("its", "he", "she", "they", "his", "her", "their", "there", "when", "while"),
        *("although", "however", "but", "and", "or", "if"),
    }
)
"""Capitalised only where a clause starts (after a colon, a quote): never the start of a name."""


@dataclass(frozen=True)
class ClozeOption:
    """One blank: the sentence with it (``blanked``), the blanked words (``span``) and the
    sentence as the text has it (``sentence``, a substring of the text)."""

    blanked: str
    span: str
    sentence: str


def _sentence_offsets(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` character offsets of the sentences of ``text``: split after ``.``, ``!``
    or ``?`` followed by space and a capital, digit or quote (a heuristic: "St. Louis" splits too,
    which only costs a candidate)."""
    cuts = [0, *(m.start() for m in _SENTENCE_END.finditer(text)), len(text)]
    spans = []
    for start, end in itertools.pairwise(cuts):
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        spans.append((start + lead, start + len(piece.rstrip())))
    return [(a, b) for a, b in spans if b > a]


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (`_sentence_offsets`), each a substring of it."""
    return [text[a:b] for a, b in _sentence_offsets(text)]


def _core(word: str) -> str:
    return word.strip(_EDGE)


def _is_entity_word(word: str) -> bool:
    core = _core(word)
    if not core or core.lower() in _FUNCTION_WORDS:
        return False
    return core[0].isupper() or bool(_NUMBER.match(core))


def _is_name_word(word: str) -> bool:
    core = _core(word)
    return bool(core) and core[0].isupper()


def _breaks(word: str) -> bool:
    """Whether punctuation after ``word`` ends a run of names ("Paris," then "France")."""
    return word != word.rstrip(_EDGE)


def _opens(word: str) -> bool:
    """Whether punctuation before ``word`` starts another phrase ("Kornilov (Russian")."""
    return word != word.lstrip(_EDGE)


def _starts_clause(words: list[str], i: int) -> bool:
    """Word ``i`` is capitalised whatever it is: the sentence's first, or after a colon (the
    ``"Title: "`` that HotpotQA paragraphs start with)."""
    return i == 0 or words[i - 1].endswith(":")


def candidate_spans(words: list[str]) -> list[tuple[int, int]]:
    """Word ranges ``[start, end)`` of a sentence's names and numbers: maximal runs of capitalised
    or numeric words ("18 August 1870"; names joined by "of", "de", ... as in "Bank of England"),
    at most `MAX_SPAN_WORDS` long, never starting with a word that starts a clause or is a
    function word ("The", "In"), never across punctuation ("Paris, France" and "Kornilov
    (Russian" are two runs), and never with brackets, quotes or markup inside a word."""
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        if _starts_clause(words, i) or not _is_entity_word(words[i]):
            i += 1
            continue
        end = i + 1
        while end < len(words) and not _breaks(words[end - 1]) and not _opens(words[end]):
            nxt = words[end]
            if _is_entity_word(nxt):
                end += 1
            elif (
                nxt in _CONNECTORS  # lower case: "The" after a name starts another one
                and end + 1 < len(words)
                and _is_name_word(words[end - 1])
                and _is_name_word(words[end + 1])
                and not _opens(words[end + 1])
            ):
                end += 2
            else:
                break
        clean = all(_CLEAN.match(_core(w)) for w in words[i:end])
        if end - i <= MAX_SPAN_WORDS and clean:
            spans.append((i, end))
        i = end
    return spans


def cloze_options(text: str) -> list[ClozeOption]:
    """Every blank of ``text``: in a sentence within its first `MAX_CONTEXT_WORDS` words, of at
    least `MIN_SENTENCE_WORDS` words, one name or number (`candidate_spans`), cut out of the text
    by character offsets (so the span and the sentence are substrings of it), that the question
    does not also hold elsewhere (the blank would be answered in plain sight)."""
    options: list[ClozeOption] = []
    seen = 0
    for a, b in _sentence_offsets(text):
        sentence = text[a:b]
        matches = list(_WORD.finditer(sentence))
        seen += len(matches)
        if seen > MAX_CONTEXT_WORDS:
            break
        if len(matches) < MIN_SENTENCE_WORDS:
            continue
        words = [m.group() for m in matches]
        for start, end in candidate_spans(words):
            first, last = words[start], words[end - 1]
            lo = matches[start].start() + len(first) - len(first.lstrip(_EDGE))
            hi = matches[end - 1].end() - (len(last) - len(last.rstrip(_EDGE)))
            span = sentence[lo:hi]
            blanked = sentence[:lo] + BLANK + sentence[hi:]
            question = CLOZE_PROMPT.format(sentence=blanked)
            if len(span) > 1 and span.lower() not in question.lower():
                options.append(ClozeOption(blanked=blanked, span=span, sentence=sentence))
    return options


def _sample(text: str, option: ClozeOption, id: str, source: str) -> TrainSample:
    return TrainSample(
        id=id,
        contexts=[text],
        question=CLOZE_PROMPT.format(sentence=option.blanked),
        answer=option.sentence,
        source=source,
        provenance={"kind": "cloze", "span": option.span},
    )


def cloze_samples(
    texts: Iterable[str], per_text: int = 1, seed: int = 0, source: str = "unknown"
) -> list[TrainSample]:
    """Up to ``per_text`` cloze samples on each distinct text (distinct options of
    `cloze_options`, drawn without replacement), ids ``cloze-<text>-<k>`` by the text's position;
    deterministic for a ``seed``. Each answer is the sentence as the text has it; its
    provenance keeps the blanked ``span``. More than one per text keeps a paragraph's answers from being
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
        for k, option in enumerate(rng.sample(options, min(per_text, len(options)))):
            out.append(_sample(text, option, f"cloze-{i}-{k}", source))
    return out
