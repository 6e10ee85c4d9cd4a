"""Training samples: text records on disk, pre-tokenized `TrainExample`s in memory.

A `TrainSample` is what data synthesis writes and the trainer reads (JSON lines); `to_examples`
tokenizes a list of them once, before training. The density label of each context is Eq. 6,
``y = log2(L_ctx / L_sum)`` with ``L_sum`` the token length of an ultra-concise summary.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import PreTrainedTokenizerBase

from ..data import QASample
from .loss import TrainExample

logger = logging.getLogger(__name__)


class TeacherTargets(BaseModel):
    """What a teacher decoder wrote for a sample (`distill.teacher_answers`): its answer as decoder
    token ids and, per answer token, its ``k`` most likely next tokens with their log-probs."""

    model_config = ConfigDict(extra="forbid")

    answer_ids: list[int] = Field(min_length=1)
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]

    @model_validator(mode="after")
    def _check(self) -> TeacherTargets:
        n = len(self.answer_ids)
        if len(self.top_ids) != n or len(self.top_logprobs) != n:
            raise ValueError(
                f"{n} answer tokens but {len(self.top_ids)} top-k id rows and "
                f"{len(self.top_logprobs)} log-prob rows"
            )
        if any(len(a) != len(b) for a, b in zip(self.top_ids, self.top_logprobs, strict=True)):
            raise ValueError("top-k ids and log-probs differ in width")
        return self


class TrainSample(BaseModel):
    """One supervised sample: contexts, a question (instruction) about them, the target answer.

    ``y`` holds one density label per context (``None`` where unknown: that context adds no MSE
    term); ``None`` for the whole field means no labels at all. ``provenance`` records where the
    sample came from (teacher, prompt kind, seed id, token counts behind ``y``...).
    """

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    contexts: list[str] = Field(min_length=1)
    question: str
    answer: str = Field(min_length=1)
    y: list[float | None] | None = None
    source: str = "unknown"
    provenance: dict[str, str | int | float | None] = Field(default_factory=dict)
    teacher: TeacherTargets | None = None
    """Set by distillation: ``answer`` is then the teacher's, trained on its exact token ids."""
    expanded: list[bool] | None = None
    """Per context, ``True`` where the decoder reads it as plain text instead of latents
    (selective expansion: the retriever's best chunks); ``None``: all compressed."""

    @model_validator(mode="after")
    def _check(self) -> TrainSample:
        if any(not c.strip() for c in self.contexts):
            raise ValueError("contexts must not be empty")
        if self.y is not None:
            if len(self.y) != len(self.contexts):
                raise ValueError(f"{len(self.y)} labels for {len(self.contexts)} contexts")
            if any(v is not None and not math.isfinite(v) for v in self.y):
                raise ValueError(f"labels must be finite or null, got {self.y}")
        if self.expanded is not None and len(self.expanded) != len(self.contexts):
            raise ValueError(
                f"{len(self.expanded)} expanded flags for {len(self.contexts)} contexts"
            )
        return self

    def labels(self) -> list[float]:
        """Per-context labels with NaN for unknown, as `TrainExample.y` wants them."""
        if self.y is None:
            return [math.nan] * len(self.contexts)
        return [math.nan if v is None else float(v) for v in self.y]


RECONSTRUCTION_PROMPT = "Repeat the context word for word."


def reconstruction_sample(text: str, id: str | None = None, source: str = "unknown") -> TrainSample:
    """An autoencoding sample: the decoder rewrites the context from its latents.

    Every context token becomes a target, against a handful for a short QA answer, so mixing these
    in teaches a decoder to read latents with far fewer samples (ICAE's pretraining task, here in
    the same single stage). The paper's SFT has no such task; recipes opt in.
    """
    return TrainSample(
        id=id,
        contexts=[text],
        question=RECONSTRUCTION_PROMPT,
        answer=text,
        source=source,
        provenance={"kind": "reconstruction"},
    )


def reconstruction_samples(
    texts: Iterable[str], words: int = 80, source: str = "unknown"
) -> list[TrainSample]:
    """Reconstruction samples over distinct ``texts`` cut into consecutive ``words``-word pieces.

    Pieces keep a training step cheap (the target is as long as the context); a tail shorter
    than a quarter piece is dropped rather than trained as a near-empty context.
    """
    if words < 1:
        raise ValueError(f"words must be positive, got {words}")
    pieces = [
        " ".join(split[start : start + words])
        for split in (t.split() for t in dict.fromkeys(texts))
        for start in range(0, len(split), words)
        if len(split) - start >= max(1, words // 4)
    ]
    return [reconstruction_sample(p, f"recon-{i}", source) for i, p in enumerate(pieces)]


def density_label(ctx_tokens: int, summary_tokens: int) -> float:
    """Eq. 6: ``y = log2(L_ctx / L_sum)``; both lengths must be positive token counts."""
    if ctx_tokens <= 0 or summary_tokens <= 0:
        raise ValueError(
            f"token lengths must be positive, got L_ctx={ctx_tokens}, L_sum={summary_tokens}"
        )
    return math.log2(ctx_tokens / summary_tokens)


class _Tokenizes(Protocol):
    """What `to_examples` needs from a model (the compressor, or a ratio regressor)."""

    decoder_tokenizer: PreTrainedTokenizerBase

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...


def to_examples(
    model: _Tokenizes, samples: Sequence[TrainSample], max_context_tokens: int | None = None
) -> list[TrainExample]:
    """Tokenize all samples in two batched tokenizer calls.

    Contexts are truncated to ``max_context_tokens`` (default: the model's encoder segment size,
    so a training context is one segment); their labels are kept, as the density of a prefix is
    that of its text. An expanded context (``expanded``) is read whole, as plain text. Answers get the decoder's ``<eos>`` appended so the model learns to stop;
    a distilled sample's answer is its teacher's token ids as generated (with their top-k targets).
    Each example keeps its contexts' ``texts`` for hidden-state distillation, unless one was cut.
    """
    if max_context_tokens is None:
        max_context_tokens = model.config.max_segment_tokens  # type: ignore[attr-defined]
    flat = [c for s in samples for c in s.contexts]
    ctx_ids = iter(model.tokenize(flat)) if flat else iter(())
    dec = model.decoder_tokenizer
    answers = dec([s.answer for s in samples], add_special_tokens=False)["input_ids"]
    examples, truncated = [], 0
    for sample, answer in zip(samples, answers, strict=True):
        contexts = []
        flags = sample.expanded
        cut = False
        for i in range(len(sample.contexts)):
            ids = next(ctx_ids)
            # an expanded context reaches the decoder as its whole text: only latents are cut
            cut_here = len(ids) > max_context_tokens and not (flags and flags[i])
            truncated += cut_here
            cut = cut or cut_here
            contexts.append(ids[:max_context_tokens])
        teacher = sample.teacher
        examples.append(
            TrainExample(
                contexts=contexts,
                question=sample.question,
                answer=teacher.answer_ids if teacher else [*answer, dec.eos_token_id],
                y=sample.labels(),
                teacher_ids=teacher.top_ids if teacher else None,
                teacher_logprobs=teacher.top_logprobs if teacher else None,
                as_text=None
                if flags is None
                else [c if f else None for c, f in zip(sample.contexts, flags, strict=True)],
                # a cut context's text is not what its latents hold: no text, no hidden-state term
                texts=None if cut else list(sample.contexts),
            )
        )
    if truncated:
        logger.warning(
            "truncated %d of %d contexts to %d tokens", truncated, len(flat), max_context_tokens
        )
    return examples


# --- JSON lines -------------------------------------------------------------------------------


def write_jsonl(samples: Iterable[TrainSample], path: str | Path, *, append: bool = False) -> int:
    """Write samples as JSON lines; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(sample.model_dump_json(exclude_defaults=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[TrainSample]:
    """Read `TrainSample` JSON lines; a bad line raises ``ValueError`` naming file and line."""
    path = Path(path)
    samples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                samples.append(TrainSample.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as e:
                raise ValueError(f"{path}: line {number}: not a TrainSample: {e}") from e
    logger.info("read %d training samples from %s", len(samples), path)
    return samples


# --- adapters from evaluation-style data ----------------------------------------------------


def from_qa_sample(sample: QASample) -> TrainSample | None:
    """A `QASample` as a training sample (first reference as the target, no density labels).

    Unanswerable questions (no reference) give ``None``: there is no target to learn.
    """
    if not sample.answers:
        return None
    return TrainSample(
        id=sample.id,
        contexts=list(sample.contexts),
        question=sample.question,
        answer=sample.answers[0],
        source=sample.source,
        provenance={"kind": "qa", "title": sample.title},
    )


def from_qa_samples(samples: Iterable[QASample]) -> list[TrainSample]:
    """`from_qa_sample` over many, logging how many unanswerable ones were skipped."""
    out, skipped = [], 0
    for sample in samples:
        converted = from_qa_sample(sample)
        if converted is None:
            skipped += 1
        else:
            out.append(converted)
    if skipped:
        logger.info("skipped %d unanswerable samples", skipped)
    return out
