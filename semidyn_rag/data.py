"""Loaders that turn real reading-comprehension data into one sample type, :class:`QASample`.

Training, evaluation and the benchmarks all consume ``QASample``; the loaders are the only place
that knows the source layouts (SQuAD JSON, Hugging Face ``hotpot_qa`` rows, the paper's released
evaluation parquet). Raw rows are validated with private pydantic models so that a malformed file
fails with a :class:`DataFormatError` naming the file, the location and the problem, instead of a
``KeyError`` deep inside an evaluation run.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .readers import ReadError, json_lines, parquet_columns, parquet_rows, parse_json_line

logger = logging.getLogger(__name__)

__all__ = [
    "DataFormatError",
    "QASample",
    "load_eval_parquet",
    "load_hotpotqa",
    "load_jsonl_samples",
    "load_samples",
    "load_squad",
    "sample",
    "save_jsonl_samples",
    "squad_article_split",
]


class DataFormatError(ValueError):
    """A data file is unreadable or lacks the expected layout; the message names file and spot."""


class QASample(BaseModel):
    """One question with the passages it should be answered from.

    Each entry of ``contexts`` is compressed into its own latent span, so a multi-hop question keeps
    its paragraphs apart. ``answers`` lists every accepted reference (any one counts as correct); it
    is empty only for an unanswerable SQuAD 2.0 question loaded with ``answerable_only=False``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    question: str
    contexts: list[str] = Field(min_length=1)
    answers: list[str]
    source: str
    title: str | None = None


# --- raw layouts ---------------------------------------------------------------------------------


class _SquadAnswer(BaseModel):
    text: str


class _SquadQA(BaseModel):
    id: str
    question: str
    answers: list[_SquadAnswer]
    is_impossible: bool = False  # absent in SQuAD 1.1, where every question is answerable


class _SquadParagraph(BaseModel):
    context: str
    qas: list[_SquadQA]


class _SquadArticle(BaseModel):
    title: str
    paragraphs: list[_SquadParagraph]


class _SquadFile(BaseModel):
    data: list[_SquadArticle] = Field(min_length=1)


class _HotpotFacts(BaseModel):
    title: list[str]
    sent_id: list[int]


class _HotpotContext(BaseModel):
    title: list[str]
    sentences: list[list[str]]

    @model_validator(mode="after")
    def _parallel(self) -> _HotpotContext:
        if len(self.title) != len(self.sentences):
            raise ValueError(f"{len(self.title)} titles but {len(self.sentences)} sentence lists")
        return self


class _HotpotRow(BaseModel):
    id: str
    question: str
    answer: str
    supporting_facts: _HotpotFacts
    context: _HotpotContext


def _describe(error: ValidationError) -> str:
    """Pydantic's errors as ``a.b.0.c: message`` (at most three), for a one-line exception."""
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()[:3]
    ]
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _read_json_lines(path: Path) -> list[tuple[int, Any]]:
    """Parsed non-blank lines with their 1-based line numbers; a file without rows is an error."""
    rows = []
    for number, line in json_lines(path):
        try:
            rows.append((number, parse_json_line(line, f"{path}: line {number}")))
        except ReadError as e:
            raise DataFormatError(str(e)) from None
    if not rows:
        raise DataFormatError(f"{path}: empty file, no rows")
    return rows


def _distinct(texts: Iterable[str]) -> list[str]:
    """Texts in first-seen order without duplicates or blanks (a blank reference matches all)."""
    return list(dict.fromkeys(t for t in texts if t.strip()))


# --- SQuAD ---------------------------------------------------------------------------------------


def _read_squad(path: Path) -> list[_SquadArticle]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        problem = "empty file" if not e.doc.strip() else f"invalid JSON ({e.msg}, line {e.lineno})"
        raise DataFormatError(f"{path}: {problem}") from e
    try:
        return _SquadFile.model_validate(raw).data
    except ValidationError as e:
        raise DataFormatError(f"{path}: not SQuAD JSON: {_describe(e)}") from e


def _squad_samples(
    path: Path, articles: Iterable[_SquadArticle], answerable_only: bool
) -> list[QASample]:
    samples = []
    for article in articles:
        for paragraph in article.paragraphs:
            for qa in paragraph.qas:
                if qa.is_impossible and answerable_only:
                    continue
                answers = _distinct(a.text for a in qa.answers)
                if not qa.is_impossible and not answers:
                    raise DataFormatError(
                        f"{path}: question {qa.id!r} is answerable but has no answer"
                    )
                samples.append(
                    QASample(
                        id=qa.id,
                        question=qa.question,
                        contexts=[paragraph.context],
                        answers=answers,
                        source="squad",
                        title=article.title,
                    )
                )
    return samples


def load_squad(
    path: str | Path,
    *,
    answerable_only: bool = True,
    articles: slice | Sequence[str] | None = None,
) -> list[QASample]:
    """Load official SQuAD (1.1 or 2.0) JSON: one sample per question, its paragraph as the context.

    ``articles`` picks articles by position (a slice over the file's article order) or by title;
    an unknown title raises ``ValueError`` so that a typo cannot silently shrink an evaluation.
    Unanswerable 2.0 questions are skipped unless ``answerable_only=False`` (then ``answers=[]``;
    their ``plausible_answers`` are deliberately not used as references).
    """
    path = Path(path)
    all_articles = _read_squad(path)
    if isinstance(articles, slice):
        chosen = all_articles[articles]
    elif articles is not None:
        by_title = {a.title: a for a in all_articles}
        unknown = [t for t in articles if t not in by_title]
        if unknown:
            raise ValueError(f"{path}: no article titled {unknown}")
        chosen = [by_title[t] for t in articles]
    else:
        chosen = all_articles
    samples = _squad_samples(path, chosen, answerable_only)
    logger.info("Loaded %d SQuAD samples from %d articles of %s", len(samples), len(chosen), path)
    return samples


def squad_article_split(
    path: str | Path,
    *,
    n_eval_articles: int | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
    answerable_only: bool = True,
) -> tuple[list[QASample], list[QASample]]:
    """Split SQuAD into ``(train, eval)`` by whole articles, so no article is seen on both sides.

    Questions about one article share paragraphs and facts; a per-question split would leak them.
    Give exactly one of ``n_eval_articles`` or ``eval_fraction`` (rounded, at least one article);
    each side keeps at least one article. The choice depends only on ``seed`` and the article count.
    """
    path = Path(path)
    articles = _read_squad(path)
    if eval_fraction is not None:
        if n_eval_articles is not None:
            raise ValueError("give only one of n_eval_articles or eval_fraction")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
        n_eval_articles = max(1, round(eval_fraction * len(articles)))
    elif n_eval_articles is None:
        raise ValueError("give n_eval_articles or eval_fraction")
    if not 1 <= n_eval_articles < len(articles):
        raise ValueError(
            f"{path}: cannot hold out {n_eval_articles} of {len(articles)} articles "
            "and keep at least one on each side"
        )
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval_articles])
    train = _squad_samples(
        path, (a for i, a in enumerate(articles) if i not in held_out), answerable_only
    )
    evaluation = _squad_samples(
        path, (a for i, a in enumerate(articles) if i in held_out), answerable_only
    )
    logger.info(
        "Split %s: %d train / %d eval samples (%d eval articles, seed %d)",
        path,
        len(train),
        len(evaluation),
        n_eval_articles,
        seed,
    )
    return train, evaluation


# --- HotpotQA ------------------------------------------------------------------------------------


def _join_sentences(sentences: Sequence[str]) -> str:
    """Join HotpotQA sentences as the dataset intends, repairing its missing spaces.

    Sentences normally carry their own leading space (``" They play..."``) and fragments continue
    the previous one (``", is also..."``), so plain concatenation is the convention; but about 1%
    start a new sentence with no space (``"Gujarat." + "He is..."``), which glues words together.
    A space is inserted only there: before an alphanumeric start that follows a non-space.
    """
    text = ""
    for sentence in sentences:
        if text and sentence[:1].isalnum() and not text[-1].isspace():
            text += " "
        text += sentence
    return text.strip()


def load_hotpotqa(path: str | Path, *, distractors: bool = False) -> list[QASample]:
    """Load Hugging Face ``hotpot_qa`` rows (JSON lines) with one context per paragraph.

    By default only the gold paragraphs (titles named in ``supporting_facts``) are kept, in their
    context order; ``distractors=True`` keeps every paragraph of the row (usually ten). Each context
    reads ``"Title: sentence sentence ..."`` so the title, often the bridge entity, survives.
    """
    path = Path(path)
    return _hotpot_samples(path, _read_json_lines(path), distractors)


def _hotpot_samples(
    path: Path, rows: Iterable[tuple[int, Any]], distractors: bool
) -> list[QASample]:
    samples = []
    for number, raw in rows:
        try:
            row = _HotpotRow.model_validate(raw)
        except ValidationError as e:
            raise DataFormatError(
                f"{path}: line {number}: not a hotpot_qa row: {_describe(e)}"
            ) from e
        gold = set(row.supporting_facts.title)
        missing = gold - set(row.context.title)
        if missing:
            raise DataFormatError(
                f"{path}: line {number}: supporting titles {sorted(missing)} not in context"
            )
        if not row.answer.strip():
            raise DataFormatError(f"{path}: line {number}: empty answer")
        contexts = [
            f"{title}: {_join_sentences(sentences)}"
            for title, sentences in zip(row.context.title, row.context.sentences, strict=True)
            if distractors or title in gold
        ]
        samples.append(
            QASample(
                id=row.id,
                question=row.question,
                contexts=contexts,
                answers=[row.answer],
                source="hotpotqa",
            )
        )
    logger.info("Loaded %d HotpotQA samples from %s", len(samples), path)
    return samples


# --- released evaluation parquet -----------------------------------------------------------------


def _answer_texts(value: Any) -> list[str]:
    """Reference texts from an ``answers``/``answer`` cell; ``ValueError`` for anything else.

    Cells arrive as pyarrow gives them: a string, a list of strings (a parquet list column, which
    pandas would show as a numpy array), or a SQuAD-style struct ``{"text": [...], ...}``.
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and "text" in value:
        return _answer_texts(value["text"])
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"unsupported answer value {value!r}")


def load_eval_parquet(path: str | Path, *, source: str = "parquet") -> list[QASample]:
    """Load the paper's evaluation parquet (``*_validation_cqa.parquet``) layout.

    Required columns: ``context``, ``question`` and ``answers`` (preferred) or ``answer``; ``id``
    (any type, kept as text; the row number when absent) and ``title`` are optional, and further
    columns such as ``context_len`` are ignored, because the token count depends on the tokenizer
    and is recomputed. ``source`` labels the samples (e.g. ``"squad"``) for per-dataset results.
    Needs the ``parquet`` extra (pyarrow); raises :class:`~semidyn_rag.extras.MissingExtraError`
    without it.
    """
    purpose = "reading .parquet evaluation files"
    path = Path(path)
    try:
        present = set(parquet_columns(path, purpose))
        answer_column = next((c for c in ("answers", "answer") if c in present), None)
        missing = sorted({"context", "question"} - present) + ([] if answer_column else ["answers"])
        if missing:
            raise DataFormatError(f"{path}: missing columns {missing}; has {sorted(present)}")
        columns = ["context", "question", answer_column]
        columns += [c for c in ("id", "title") if c in present]
        rows = [row for _, row in parquet_rows(path, columns=columns, purpose=purpose)]
    except ReadError as e:
        raise DataFormatError(str(e)) from None
    if not rows:
        raise DataFormatError(f"{path}: empty file, no rows")
    samples = []
    for index, row in enumerate(rows):
        where = f"{path}: row {index}"
        try:
            answers = _distinct(_answer_texts(row[answer_column]))
        except ValueError as e:
            raise DataFormatError(f"{where}: column {answer_column!r}: {e}") from e
        if not answers:
            raise DataFormatError(f"{where}: no non-empty answer")
        try:
            samples.append(
                QASample(
                    id=str(row["id"]) if row.get("id") is not None else str(index),
                    question=row["question"],
                    contexts=[row["context"]],
                    answers=answers,
                    source=source,
                    title=row.get("title"),
                )
            )
        except ValidationError as e:
            raise DataFormatError(f"{where}: {_describe(e)}") from e
    logger.info("Loaded %d samples from %s", len(samples), path)
    return samples


# --- our own JSON lines, dispatch, subsets ------------------------------------------------------


def save_jsonl_samples(samples: Iterable[QASample], path: str | Path) -> None:
    """Write samples as JSON lines that :func:`load_jsonl_samples` reads back unchanged."""
    with Path(path).open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(s.model_dump_json() + "\n")


def load_jsonl_samples(path: str | Path) -> list[QASample]:
    """Read JSON lines whose rows are :class:`QASample` fields (e.g. a prepared evaluation mix)."""
    path = Path(path)
    return _jsonl_samples(path, _read_json_lines(path))


def _jsonl_samples(path: Path, rows: Iterable[tuple[int, Any]]) -> list[QASample]:
    samples = []
    for number, raw in rows:
        try:
            samples.append(QASample.model_validate(raw))
        except ValidationError as e:
            raise DataFormatError(f"{path}: line {number}: not a QASample: {_describe(e)}") from e
    logger.info("Loaded %d samples from %s", len(samples), path)
    return samples


def load_samples(path: str | Path) -> list[QASample]:
    """Load any supported file with each loader's defaults, choosing the loader from the file.

    ``.json`` is SQuAD, ``.parquet`` the evaluation layout; ``.jsonl`` rows are HotpotQA when the
    first row has ``supporting_facts`` and :class:`QASample` rows otherwise.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_squad(path)
    if suffix == ".parquet":
        return load_eval_parquet(path)
    if suffix == ".jsonl":
        rows = _read_json_lines(path)
        first = rows[0][1]
        if isinstance(first, dict) and "supporting_facts" in first:
            return _hotpot_samples(path, rows, distractors=False)
        return _jsonl_samples(path, rows)
    raise DataFormatError(f"{path}: unsupported extension {suffix!r} (use .json, .jsonl, .parquet)")


def sample(samples: Sequence[QASample], limit: int, seed: int = 0) -> list[QASample]:
    """A deterministic random subset of at most ``limit`` samples, in their original order.

    The subset is a prefix of one seeded permutation, so a larger ``limit`` with the same seed
    contains every sample of a smaller one: growing an evaluation never swaps samples out.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    return [samples[i] for i in sorted(order[:limit])]
