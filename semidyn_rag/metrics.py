"""The paper's evaluation metrics (section 4.1) as pure functions over plain numbers and strings.

* Accuracy is *substring accuracy*: an answer counts when a normalized reference occurs inside the
  normalized model output. It is lenient about phrasing ("It was in 1066." matches "1066") yet,
  unlike token F1, gives no partial credit.
* The average compression ratio is ``Σ original tokens / Σ latent tokens`` over the *correctly
  answered* samples only (the paper's strict validity filter), so that a model cannot raise its
  ratio by crushing contexts it then fails to answer from.

Beside them, :func:`reconstruction_counts` scores a decoder asked to repeat a compressed text: how
much of the text its latents carry, which bounds what any answer read from them can use.

No model objects are involved, so evaluation results can be re-scored or re-plotted offline.
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

__all__ = [
    "EvalRecord",
    "EvalSummary",
    "ReconstructionCounts",
    "average_compression_ratio",
    "mcnemar_exact",
    "normalize_answer",
    "pareto_front",
    "reconstruction_counts",
    "substring_match",
    "summarize",
]

_NOT_ALNUM = re.compile(r"[\W_]+")


def normalize_answer(text: str) -> str:
    """Reduce text to its letters and digits, case-folded: the form substring accuracy compares.

    Precisely: Unicode NFKC normalization, then ``str.casefold()``, then removal of every character
    that is not a Unicode letter or digit — punctuation, underscores *and whitespace* all go, so
    ``"New York, N.Y."`` becomes ``"newyorkny"``. Dropping whitespace follows the paper's released
    evaluation code (``re.sub(r"[^\\w]", "", text.lower())`` minus ``_``): it makes ``"U.S."``
    match ``"U. S."`` and ``"Denmark,Iceland"`` match ``"Denmark, Iceland"``. NFKC and casefold
    (instead of plain ``lower()``) only differ outside ASCII: they let a decomposed ``"é"`` match a
    composed one and ``"STRASSE"`` match ``"straße"``, where the paper's version would not.
    """
    return _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", text).casefold())


def substring_match(prediction: str, answers: Iterable[str]) -> bool:
    """Whether any reference, normalized, occurs in the normalized prediction.

    A reference that normalizes to ``""`` (e.g. ``"?"``) never matches; in the paper's code it
    would match every output.
    """
    output = normalize_answer(prediction)
    return any(ref and ref in output for ref in map(normalize_answer, answers))


def average_compression_ratio(
    original_tokens: Sequence[int],
    latent_tokens: Sequence[int],
    correct: Sequence[bool] | None = None,
) -> float | None:
    """``Σ original / Σ latent`` over all samples, or only the correct ones if ``correct`` is given.

    Summing before dividing weighs each sample by its length, as the paper does. Returns ``None``
    when no sample is selected (nothing correct, or no samples): the ratio is undefined then, and
    ``None`` — unlike ``0`` or NaN — cannot pass for a value on a plot or in an average.
    """
    if len(latent_tokens) != len(original_tokens) or (
        correct is not None and len(correct) != len(original_tokens)
    ):
        raise ValueError("original_tokens, latent_tokens and correct must have equal lengths")
    if any(n < 1 for n in latent_tokens) or any(n < 0 for n in original_tokens):
        raise ValueError("latent counts must be >= 1 and original counts >= 0")
    keep = correct if correct is not None else [True] * len(original_tokens)
    latent = sum(n for n, k in zip(latent_tokens, keep, strict=True) if k)
    original = sum(n for n, k in zip(original_tokens, keep, strict=True) if k)
    return original / latent if latent else None


class EvalRecord(BaseModel):
    """One evaluated sample: the output, its references and what compression it got.

    ``correct`` defaults to :func:`substring_match` of ``prediction`` against ``answers``; pass it
    explicitly to score with another criterion.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    prediction: str
    answers: list[str]
    correct: bool
    num_tokens: int = Field(ge=0)
    """Tokens of the original context(s)."""
    num_latents: int = Field(ge=1)
    """Latent positions that replaced them."""
    ratios: list[PositiveFloat] = Field(default_factory=list)
    """Ratio chosen per compressed segment (empty when nothing was selected, e.g. a baseline)."""
    latency_s: float | None = Field(default=None, ge=0)
    """Wall seconds spent compressing this sample's contexts (``None``: nothing was compressed,
    or a record written before latencies were kept)."""

    @model_validator(mode="before")
    @classmethod
    def _score(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "correct" not in data
            and {"prediction", "answers"} <= data.keys()
        ):
            data = {**data, "correct": substring_match(data["prediction"], data["answers"])}
        return data

    @property
    def ratio(self) -> float:
        """This sample's effective compression ``num_tokens / num_latents``."""
        return self.num_tokens / self.num_latents


class EvalSummary(BaseModel):
    """One evaluation run in numbers: one point of the paper's accuracy-vs-ratio plots."""

    model_config = ConfigDict(frozen=True)

    n: int
    accuracy: float
    """Fraction of samples answered correctly (substring accuracy)."""
    avg_ratio_correct: float | None
    """The paper's average compression ratio: ``Σ tokens / Σ latents`` over correct samples only;
    ``None`` when no sample is correct."""
    avg_ratio: float
    """``Σ tokens / Σ latents`` over all samples (what the compressor did, right or wrong)."""
    mean_sample_ratio: float
    """Unweighted mean of per-sample ratios (the released code's ``avg_comp_ratio``)."""
    log2_ratio_variance: float | None
    """Population variance of ``log2`` of every chosen segment ratio (paper Fig. 5): how much the
    selector adapts; ``None`` when no ratio was recorded."""
    latency_s: float | None = None
    """Mean compression seconds per sample over the records that carry one; ``None`` if none do."""


def summarize(records: Sequence[EvalRecord]) -> EvalSummary:
    """Aggregate per-sample records into the paper's metrics; at least one record is required."""
    if not records:
        raise ValueError("cannot summarize zero records")
    tokens = [r.num_tokens for r in records]
    latents = [r.num_latents for r in records]
    chosen = [math.log2(x) for r in records for x in r.ratios]
    timed = [r.latency_s for r in records if r.latency_s is not None]
    plain = average_compression_ratio(tokens, latents)
    assert plain is not None  # records is non-empty
    return EvalSummary(
        n=len(records),
        accuracy=sum(r.correct for r in records) / len(records),
        avg_ratio_correct=average_compression_ratio(tokens, latents, [r.correct for r in records]),
        avg_ratio=plain,
        mean_sample_ratio=statistics.fmean(r.ratio for r in records),
        log2_ratio_variance=statistics.pvariance(chosen) if chosen else None,
        latency_s=statistics.fmean(timed) if timed else None,
    )


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated ``(ratio, accuracy)`` points, by increasing ratio (so decreasing accuracy).

    A point is dominated when another has at least its ratio and at least its accuracy and differs
    from it; duplicates appear once. Both coordinates are "higher is better", as in the paper.
    """
    candidates = list(points)
    if any(math.isnan(x) for p in candidates for x in p):
        raise ValueError("pareto_front: NaN coordinate")
    ordered = sorted(candidates, key=lambda p: (-p[0], -p[1]))
    front: list[tuple[float, float]] = []
    for ratio, accuracy in ordered:
        if not front or accuracy > front[-1][1]:
            front.append((ratio, accuracy))
    return front[::-1]


def mcnemar_exact(a: Mapping[str, bool], b: Mapping[str, bool]) -> tuple[int, int, float]:
    """Paired comparison of two settings' correctness on the same questions (by id).

    Returns the questions only ``a`` answers, those only ``b`` answers and the two-sided exact
    McNemar p-value (a binomial test of those discordant pairs at 1/2): a few points of accuracy
    on 200 questions can be noise, and the pairs say whether they are.
    """
    shared = a.keys() & b.keys()
    only_a = sum(a[i] and not b[i] for i in shared)
    only_b = sum(b[i] and not a[i] for i in shared)
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


_WORD = re.compile(r"\w+")


class ReconstructionCounts(BaseModel):
    """How much of a reference text a reconstruction reproduces, as counts that add up over texts
    (``sum(counts, ReconstructionCounts())``), so that recalls are micro-averaged over words.

    ``words``: the reference's words (case-folded ``\\w+`` runs); ``in_order``: the longest run of
    them the reconstruction reproduces in the same order (a longest common subsequence), so a
    paraphrase that keeps the words but scrambles them scores low. ``details``: the reference's
    distinct names and numbers (words that hold a digit, or start with a capital letter without
    opening a sentence; case kept), the exact tokens questions ask for; ``details_found``: those the reconstruction contains.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    words: int = Field(default=0, ge=0)
    in_order: int = Field(default=0, ge=0)
    details: int = Field(default=0, ge=0)
    details_found: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ReconstructionCounts:
        if self.in_order > self.words or self.details_found > self.details:
            raise ValueError(f"found more than the reference holds: {self}")
        return self

    def __add__(self, other: ReconstructionCounts) -> ReconstructionCounts:
        return ReconstructionCounts(
            **{k: getattr(self, k) + getattr(other, k) for k in type(self).model_fields}
        )

    def __radd__(self, other: object) -> ReconstructionCounts:
        if other == 0:  # sum()'s start value
            return self
        return NotImplemented

    @property
    def word_recall(self) -> float:
        """``in_order / words``; raises ``ZeroDivisionError`` when no reference had words."""
        return self.in_order / self.words

    @property
    def detail_recall(self) -> float:
        """``details_found / details``; raises ``ZeroDivisionError`` when no reference had one."""
        return self.details_found / self.details


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One row of the classic dynamic programme: O(len(a) * len(b)) time, O(len(b)) memory.
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _details(text: str) -> set[str]:
    # A capital that only opens a sentence marks no name.
    found = set()
    for sentence in _SENTENCE_END.split(text):
        for i, w in enumerate(_WORD.findall(sentence)):
            if any(c.isdigit() for c in w) or (i > 0 and w[0].isupper()):
                found.add(w)
    return found


def reconstruction_counts(reference: str, generated: str) -> ReconstructionCounts:
    """Score ``generated``, a decoder's attempt to repeat ``reference`` (see
    :class:`ReconstructionCounts`). Words compare after NFKC normalization; ``in_order`` ignores
    case, details keep it ("May" the name is not "may")."""
    reference, generated = (unicodedata.normalize("NFKC", t) for t in (reference, generated))
    ref, gen = _WORD.findall(reference), _WORD.findall(generated)
    details = _details(reference)
    return ReconstructionCounts(
        words=len(ref),
        in_order=_lcs_length([w.casefold() for w in ref], [w.casefold() for w in gen]),
        details=len(details),
        details_found=len(details & set(gen)),
    )
