"""The training objective (Eq. 7) and its types: ``LM + λ·MSE(ŷ, y)``, plus optional token KD
and hidden-state distillation.

`compressor_loss` runs one batch of `TrainExample`s through a compressor the way inference does
(encoder → backbone → converter → decoder prompt) and scores the answer tokens. It is a function of
the model, not a method: the model knows nothing of training. `LossFn` is the contract the
`Trainer` and `diagnostics.evaluate_loss` call (this function by default;
`regressor.regressor_loss` for the two-stage ratio regressor).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..encoder import predict_y

if TYPE_CHECKING:
    from ..modeling import SemiDynamicCompressor


@dataclass
class TrainExample:
    """One pre-tokenized training sample: contexts, the prompt around them, and the answer.

    Raises ``ValueError`` when ``y`` or ``as_text`` do not have one entry per context, or when
    only one of ``teacher_ids`` and ``teacher_logprobs`` is given (the distillation term would
    otherwise skip the example without a word).
    """

    contexts: list[list[int]]
    """Encoder token ids of each context (no ``<eos>``; at most ``max_segment_tokens``)."""
    question: str
    answer: list[int]
    """Decoder token ids of the answer, ending with the decoder's ``<eos>``."""
    y: list[float]
    """Density label ``log2(L_ctx / L_sum)`` per context; NaN where unknown (no MSE term)."""
    teacher_ids: list[list[int]] | None = None
    """Per answer token, the ids of the teacher's ``top_k`` next-token candidates ``[A, k]``
    (token-level distillation; ``None``: none)."""
    teacher_logprobs: list[list[float]] | None = None
    """Their log-probabilities under the teacher, same shape as ``teacher_ids``."""
    as_text: list[str | None] | None = None
    """Per context, the plain text the decoder reads in place of its latents (selective
    expansion, as ``expand_top_k`` sends the retriever's best chunks); ``None`` entries, or no
    list, are compressed. An expanded context is not encoded and adds no MSE term."""
    texts: list[str] | None = None
    """The plain text of each context, exactly what ``contexts`` tokenizes (for a teacher that
    reads the text: `hidden_state_loss`); ``None``: unknown, no hidden-state term."""

    def __post_init__(self) -> None:
        if len(self.y) != len(self.contexts):
            raise ValueError(f"{len(self.y)} labels for {len(self.contexts)} contexts")
        if self.texts is not None and len(self.texts) != len(self.contexts):
            raise ValueError(f"{len(self.texts)} texts for {len(self.contexts)} contexts")
        if self.as_text is not None and len(self.as_text) != len(self.contexts):
            raise ValueError(
                f"{len(self.as_text)} as_text entries for {len(self.contexts)} contexts"
            )
        if (self.teacher_ids is None) != (self.teacher_logprobs is None):
            given, missing = (
                ("teacher_ids", "teacher_logprobs")
                if self.teacher_logprobs is None
                else ("teacher_logprobs", "teacher_ids")
            )
            raise ValueError(
                f"{given} is set but {missing} is None: token-level distillation needs both"
            )

    def compressed(self) -> list[int]:
        """Indices of the contexts that go to the decoder as latents."""
        if self.as_text is None:
            return list(range(len(self.contexts)))
        return [i for i, text in enumerate(self.as_text) if text is None]


@dataclass
class LossOutput:
    """One batch's losses: ``loss`` carries the graph, the parts are detached scalars."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    """Mean cross-entropy per answer token (nats)."""
    mse_loss: torch.Tensor
    """Mean squared error of the ratio head over the labelled compressed contexts (0: none)."""
    kd_loss: torch.Tensor | None = None
    """Token-level distillation term (before its weight), the plain mean over the taught answer
    tokens even where context-gain weights shape ``loss``; ``None`` when no example has targets."""
    hidden_loss: torch.Tensor | None = None
    """Hidden-state distillation term (before its weight); ``None`` when it is off or no example
    carries its texts."""


class LossFn(Protocol):
    """One batch's loss for a model: what the `Trainer` optimises and `evaluate_loss` averages.

    ``ratio`` fixes the compression ratio for the batch (``None``: the model's mode decides),
    ``mse_weight`` is λ of Eq. 7, ``encoder_grad=False`` builds the latents without a graph, and
    ``kd_weight`` weighs token-level distillation, ``hidden_weight`` hidden-state distillation
    and ``gain_cap`` (``None``: off) caps the context-gain weights of the answer tokens (see
    `compressor_loss`). A loss may ignore an
    argument that means nothing for its model, and raises ``ValueError`` for one it cannot honour.
    ``model`` is `Any` because each loss takes its own model class.
    """

    def __call__(
        self,
        model: Any,
        examples: Sequence[TrainExample],
        *,
        ratio: float | None,
        mse_weight: float,
        encoder_grad: bool,
        kd_weight: float,
        hidden_weight: float,
        gain_cap: float | None,
    ) -> LossOutput: ...


def distillation_loss(
    logits: torch.Tensor,
    rows: torch.Tensor,
    examples: Sequence[TrainExample],
    weights: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Sparse token-level KD: ``-Σ_k p_teacher(k) · log p_student(k)`` over the teacher's top-k,
    averaged over every answer token of the examples that carry teacher targets (weighted by
    ``weights`` ``[N]`` where given: ``Σ w·term / Σ w``).

    ``logits`` ``[N, V]`` are the student's at the positions that predict answer tokens, in order
    (`answer_logits`); ``rows`` ``[N]`` names each one's example. ``None`` when no example has
    targets. Raises ``ValueError`` when an example's targets do not cover its answer.
    """
    found = _distillation_terms(logits, rows, examples)
    if found is None:
        return None
    terms, picks = found
    if weights is None:
        return terms.mean()
    w = weights[picks]
    return (w * terms).sum() / w.sum()


def _distillation_terms(
    logits: torch.Tensor, rows: torch.Tensor, examples: Sequence[TrainExample]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`distillation_loss`'s per-token terms ``[M]`` and their positions in ``logits`` ``[M]``,
    over the answer tokens of the examples with teacher targets; ``None`` when none has any."""
    terms, picks = [], []
    for i, ex in enumerate(examples):
        if (ex.teacher_ids is None) != (ex.teacher_logprobs is None):
            raise ValueError(f"example {i}: only one of teacher_ids and teacher_logprobs is set")
        if ex.teacher_ids is None or ex.teacher_logprobs is None:
            continue
        picked = (rows == i).nonzero().squeeze(-1)
        if len(ex.teacher_ids) != picked.numel():
            raise ValueError(
                f"teacher targets cover {len(ex.teacher_ids)} tokens, the answer has "
                f"{picked.numel()}"
            )
        student = logits[picked].float().log_softmax(-1)  # [A, V]
        ids = torch.as_tensor(ex.teacher_ids, device=logits.device)
        probs = torch.as_tensor(ex.teacher_logprobs, device=logits.device).exp()
        terms.append(-(probs * student.gather(-1, ids)).sum(-1))
        picks.append(picked)
    if not terms:
        return None
    return torch.cat(terms), torch.cat(picks)


def context_gain_weights(
    with_context: torch.Tensor, without_context: torch.Tensor, cap: float
) -> torch.Tensor:
    """LongCE token weights (Fang et al., "What is Wrong with Perplexity for Long-context Language
    Modeling?", ICLR 2025): ``min(exp(log p(x | context) − log p(x | no context)), cap)``.

    ``with_context`` and ``without_context`` ``[N]`` are one model's log-probabilities (nats) of
    the same answer tokens with and without the context. A token the context makes likelier (the
    name or number an answer takes from the paragraph) weighs up to ``cap``; one the question
    alone predicts (its restatement, the answer's grammar) weighs about 1 or less. ``cap`` is at
    least 1: below 1 it would flatten every token the context helps to the weight of one it does
    not help (both at the cap), the very distinction the weights are for. Raises ``ValueError``
    when the shapes differ or ``cap`` is below 1.
    """
    if with_context.shape != without_context.shape:
        raise ValueError(f"{tuple(with_context.shape)} against {tuple(without_context.shape)}")
    if not cap >= 1:
        raise ValueError(f"cap must be at least 1, got {cap}")
    return (with_context - without_context).exp().clamp(max=cap)


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields by which some causal LMs change their logits after the output head."""


@dataclass
class AnswerLogits:
    """The decoder's logits where they are scored: ``logits`` ``[N, V]`` at the ``N`` positions
    that predict an answer token (row-major order), ``rows`` ``[N]`` their example, ``targets``
    ``[N]`` the token each predicts, and ``hidden_states`` (each ``[B, T, d]``, embeddings first)
    when asked for."""

    logits: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def answer_logits(
    decoder: Any,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    *,
    output_hidden_states: bool = False,
) -> AnswerLogits:
    """Run ``decoder`` (a causal LM, PEFT-wrapped or not) on ``embeds`` ``[B, T, d]`` and apply its
    output head only at the positions whose next label in ``targets`` ``[B, T]`` is not -100.

    Answers are a few dozen of a prompt's hundreds of positions, and the head maps each position
    to the whole vocabulary (49,152 for SmolLM2): the full ``[B, T, V]`` logits, upcast for the
    cross-entropy, were the largest tensor of a training step.

    Raises:
        ValueError: the model transforms its logits after the head (Gemma 2's soft-capping,
            Cohere's and Granite's scaling), which this bare head would silently leave out.
    """
    lm = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
    for name in _LOGIT_TRANSFORMS:
        value = getattr(lm.config, name, None)
        if value is not None and value != 1:
            raise ValueError(
                f"{type(lm).__name__} transforms its logits ({name}={value}); answer_logits "
                "applies the bare output head"
            )
    out = lm.get_decoder()(
        inputs_embeds=embeds,
        attention_mask=mask,
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )
    rows, positions = (targets[:, 1:] != -100).nonzero(as_tuple=True)
    head = lm.get_output_embeddings()
    return AnswerLogits(
        logits=head(out.last_hidden_state[rows, positions]),
        rows=rows,
        targets=targets[rows, positions + 1],
        hidden_states=out.hidden_states if output_hidden_states else None,
    )


def common_suffix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many trailing rows of ``a`` ``[n, d]`` and ``b`` ``[m, d]`` are equal, row by row from
    the end: the positions two prompts share after their contexts (question, template, answer)."""
    n = min(a.shape[0], b.shape[0])
    same = (a[a.shape[0] - n :].flip(0) == b[b.shape[0] - n :].flip(0)).all(-1)
    differs = (~same).nonzero()
    return int(differs[0]) if differs.numel() else n


def hidden_state_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    student_inputs: torch.Tensor,
    teacher_inputs: torch.Tensor,
    student_mask: torch.Tensor,
    teacher_mask: torch.Tensor,
) -> torch.Tensor:
    """Hidden-state distillation: the student (reading latents) should hold at every layer what
    the teacher (the base decoder reading the plain text) holds at the positions both share.

    ``student``/``teacher``: one ``[B, T, d]`` tensor per layer output (``hidden_states[1:]``;
    the same count), of right-padded batches whose ``*_inputs`` ``[B, T, d]`` embeddings and
    ``*_mask`` ``[B, T]`` are those the models read. Per example, the positions compared are the
    trailing ones whose input embeddings are equal in both prompts (`common_suffix`: the text
    after the last context, then the answer), where a causal decoder's state can differ only by
    what it read of the contexts. Per layer, the squared error over those positions relative to
    the teacher's mean squared norm there (layers differ in scale by orders of magnitude); the
    mean over layers. This feature-level signal is denser than the answer tokens' KL: it says what
    the question's positions should have gathered from the context. Raises ``ValueError`` when
    the layer counts differ, a batch is not right-padded or an example shares no position.
    """
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student layers against {len(teacher)} teacher layers")
    rows_s, rows_t = [], []
    for i in range(student_inputs.shape[0]):
        n_s, n_t = int(student_mask[i].sum()), int(teacher_mask[i].sum())
        if not (student_mask[i, :n_s].all() and teacher_mask[i, :n_t].all()):
            raise ValueError(f"example {i}: the batch is not right-padded")
        shared = common_suffix(student_inputs[i, :n_s], teacher_inputs[i, :n_t])
        if shared == 0:
            raise ValueError(f"example {i}: student and teacher prompts share no position")
        rows_s.append(torch.arange(n_s - shared, n_s, device=student_inputs.device))
        rows_t.append(torch.arange(n_t - shared, n_t, device=teacher_inputs.device))
    batch = torch.cat([torch.full_like(r, i) for i, r in enumerate(rows_s)])
    pos_s, pos_t = torch.cat(rows_s), torch.cat(rows_t)
    terms = []
    for s, t in zip(student, teacher, strict=True):
        picked_t = t[batch, pos_t].float()
        error = (s[batch, pos_s].float() - picked_t).pow(2).mean()
        terms.append(error / picked_t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def compressor_loss(
    model: SemiDynamicCompressor,
    examples: Sequence[TrainExample],
    *,
    ratio: float | None = None,
    mse_weight: float = 1.0,
    encoder_grad: bool = True,
    kd_weight: float = 0.0,
    hidden_weight: float = 0.0,
    gain_cap: float | None = None,
) -> LossOutput:
    """Eq. 7: ``LM + λ·MSE(ŷ, y)`` for one batch (the LM loss counts answer tokens only), plus
    ``kd_weight ×`` `distillation_loss` where examples carry teacher targets, plus
    ``hidden_weight ×`` `hidden_state_loss` against the base decoder (adapter off, no gradient)
    reading the plain ``texts`` of the examples that carry them.

    With a ``gain_cap``, the LM and KD terms weigh each answer token of an example with teacher
    targets by `context_gain_weights` (capped there): the teacher's log-probability of the token
    with the context against the base decoder's (adapter off, no gradient) from the question
    alone, normalised to mean 1 over the example's answer tokens; other tokens weigh 1. A teacher
    answer of 20-30 tokens mostly restates the question; the few tokens it takes from the context
    are what reading the latents is for. The weights move loss between an example's tokens, never
    between examples. ``lm_loss`` and ``kd_loss`` stay the unweighted means, comparable across
    runs (diagnostics; ``loss`` is what is optimised).

    ``ratio`` fixes the structure for the whole batch (multi-ratio training draws one per batch);
    ``None`` lets the mode decide, with the label ``y`` standing in for the prediction so that
    the fully dynamic baseline trains on the ratios its labels imply. ``encoder_grad=False``
    builds the latents without a graph (encoder and converter held fixed): the backward pass
    then costs the decoder and the ratio head only. Contexts an example marks ``as_text`` are
    read as plain text in the same prompt (selective expansion), without latents or MSE term.
    """
    picked = [(ex, i) for ex in examples for i in ex.compressed()]
    contexts = [ex.contexts[i] for ex, i in picked]
    labels = torch.tensor([ex.y[i] for ex, i in picked], device=model.device)
    y_hat = labels.new_zeros(0)
    spans: Iterator[torch.Tensor] = iter(())
    if contexts:  # a batch of fully expanded prompts has nothing to encode
        held = contextlib.nullcontext() if encoder_grad else torch.no_grad()
        with held:
            hidden, head_states = model.encoder_states(contexts)
        y_hat = predict_y(model.ratio_head, head_states, [len(c) for c in contexts])
        with held:
            pooled = []
            for row, (ctx, label) in enumerate(zip(contexts, labels.tolist(), strict=True)):
                guide = label if math.isfinite(label) else float(y_hat[row].detach())
                structure = model.structure(guide, len(ctx), 0.0, ratio)
                pooled.append(model.extract(hidden[row], len(ctx), structure, ratio))
            spans = iter(model.converter(torch.cat(pooled)).split([p.shape[0] for p in pooled]))
    prompts = []
    for ex in examples:
        texts = ex.as_text or [None] * len(ex.contexts)
        parts = [next(spans) if text is None else text for text in texts]
        prompts.append(model.latent_prompt(ex.question, parts))
    embeds, mask, targets = model.embed_prompts(prompts, [ex.answer for ex in examples])
    taught = [i for i, ex in enumerate(examples) if ex.texts is not None] if hidden_weight else []
    with model.adapter("decoder") as decoder:
        out = answer_logits(decoder, embeds, mask, targets, output_hidden_states=bool(taught))
        hidden = None
        if taught:
            hidden = _hidden_distillation(model, decoder, examples, taught, out, embeds, mask)
        weights = (
            None if gain_cap is None else _gain_weights(model, decoder, examples, out, gain_cap)
        )
    per_token = nn.functional.cross_entropy(out.logits.float(), out.targets, reduction="none")
    lm = per_token.mean()
    # The weights have mean 1 over each example's tokens, so over the batch too: this is still a
    # mean over the batch's tokens, each example's share of it as without weights.
    fitted = lm if weights is None else (weights * per_token).mean()
    known = torch.isfinite(labels)
    mse = nn.functional.mse_loss(y_hat[known], labels[known]) if known.any() else y_hat.sum() * 0.0
    loss = fitted + mse_weight * mse
    kd = kd_fitted = None
    found = _distillation_terms(out.logits, out.rows, examples) if kd_weight else None
    if found is not None:
        terms, picks = found
        kd = terms.mean()  # logged unweighted, as lm_loss
        kd_fitted = kd if weights is None else (weights[picks] * terms).sum() / weights[picks].sum()
        loss = loss + kd_weight * kd_fitted
    if hidden is not None:
        loss = loss + hidden_weight * hidden
    return LossOutput(
        loss=loss,
        lm_loss=lm.detach(),
        mse_loss=mse.detach(),
        kd_loss=None if kd is None else kd.detach(),
        hidden_loss=None if hidden is None else hidden.detach(),
    )


@contextlib.contextmanager
def _base_decoder(decoder: Any) -> Iterator[None]:
    """``decoder`` with its adapters disabled, every tensor's ``requires_grad`` as it was after.

    peft's ``disable_adapter`` re-enables by ``set_adapter(active)``, which freezes every other
    adapter: on a shared base the encoder's LoRA tensors, whose graph the batch has already built,
    so their gradient would be dropped at ``backward`` without a word.
    """
    flags = [(p, p.requires_grad) for p in decoder.parameters()]
    try:
        with decoder.disable_adapter():
            yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _gain_weights(
    model: SemiDynamicCompressor,
    decoder: nn.Module,
    examples: Sequence[TrainExample],
    student: AnswerLogits,
    cap: float,
) -> torch.Tensor:
    """Per answer position of ``student`` ``[N]``: `context_gain_weights` for the examples with
    teacher targets (the base decoder reading their questions alone), normalised to mean 1 over
    each example's answer tokens; 1 for the others.

    Raises ``ValueError`` when an example has only one of ``teacher_ids`` and
    ``teacher_logprobs``, when its targets do not cover its answer or do not hold the answer token
    they produced, or when its weights sum to 0 or are not finite.
    """
    weights = torch.ones(student.rows.shape[0], device=student.logits.device)
    taught, with_context = [], []
    for i, ex in enumerate(examples):
        if (ex.teacher_ids is None) != (ex.teacher_logprobs is None):
            given, missing = (
                ("teacher_ids", "teacher_logprobs")
                if ex.teacher_logprobs is None
                else ("teacher_logprobs", "teacher_ids")
            )
            raise ValueError(
                f"example {i}: {given} is set but {missing} is None; the context gain needs the "
                "teacher's log-probability of each answer token among its top-k ids"
            )
        if ex.teacher_ids is None or ex.teacher_logprobs is None:
            continue
        if not len(ex.answer) == len(ex.teacher_ids) == len(ex.teacher_logprobs):
            raise ValueError(
                f"example {i}: teacher targets cover {len(ex.teacher_ids)} tokens (ids) and "
                f"{len(ex.teacher_logprobs)} (log-probabilities), the answer has {len(ex.answer)}"
            )
        lp = []
        for t, (token, ids, lps) in enumerate(
            zip(ex.answer, ex.teacher_ids, ex.teacher_logprobs, strict=True)
        ):
            if token not in ids:
                raise ValueError(f"example {i}: answer token {t} ({token}) is not in its teacher's")
            lp.append(lps[ids.index(token)])
        taught.append(i)
        with_context.append(lp)
    if not taught:
        return weights
    prompts = [model.latent_prompt(examples[i].question, []) for i in taught]
    embeds, mask, targets = model.embed_prompts(prompts, [examples[i].answer for i in taught])
    with torch.no_grad(), _base_decoder(decoder):
        bare = answer_logits(decoder, embeds, mask, targets)
    bare_lp = bare.logits.float().log_softmax(-1).gather(-1, bare.targets[:, None]).squeeze(-1)
    for j, (i, lp) in enumerate(zip(taught, with_context, strict=True)):
        gain = context_gain_weights(
            torch.tensor(lp, device=weights.device),
            bare_lp[(bare.rows == j).nonzero().squeeze(-1)],
            cap,
        )
        total = gain.sum()
        if not (torch.isfinite(total) and total > 0):
            raise ValueError(f"example {i}: its context-gain weights sum to {float(total)}")
        # Per example, not per batch: normalised over the batch, a taught example whose tokens
        # gain much would take loss from the gold and reconstruction examples (weight 1) beside
        # it, by an amount that depends on which examples a batch drew. Mean 1 over its own
        # tokens, the weights only redistribute its share among its tokens.
        weights[(student.rows == i).nonzero().squeeze(-1)] = gain * (gain.numel() / total)
    return weights


def _hidden_distillation(
    model: SemiDynamicCompressor,
    decoder: nn.Module,
    examples: Sequence[TrainExample],
    taught: list[int],
    student: AnswerLogits,
    embeds: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """`hidden_state_loss` of the ``taught`` rows against the base decoder reading their texts."""
    prompts = [model.latent_prompt(examples[i].question, examples[i].texts) for i in taught]
    t_embeds, t_mask, _ = model.embed_prompts(prompts, [examples[i].answer for i in taught])
    with torch.no_grad(), _base_decoder(decoder):
        teacher = decoder(
            inputs_embeds=t_embeds,
            attention_mask=t_mask,
            output_hidden_states=True,
            use_cache=False,  # one pass, no generation: a KV cache would only hold memory
        ).hidden_states
    rows = torch.as_tensor(taught, device=embeds.device)
    return hidden_state_loss(
        [h[rows] for h in student.hidden_states[1:]],
        teacher[1:],
        embeds[rows],
        t_embeds,
        mask[rows],
        t_mask,
    )
