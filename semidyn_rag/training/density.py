"""Density labels without a teacher LLM, and a ratio head fitted to them in closed form.

The paper's label (Eq. 6) is ``y = log2(L_ctx / L_sum)`` on a teacher's ultra-concise summary. A
small offline LM (SmolLM2-135M) cannot write usable summaries, so this label measures density
directly: the information the base LM finds in a text, its surprisal. If one latent can
carry ``B`` bits, a text of ``n`` tokens holding ``I`` bits needs ``I / B`` latents, so

    ratio = n / (I / B) = B / (I / n)        y = log2(B) - log2(mean bits per token)

Repetition, boilerplate and chatter are predictable (few bits per token, high ratio); numbers,
names and lists of facts are not (low ratio). ``B`` only shifts every label by the same amount; it
is calibrated so that a chosen reference text (e.g. the median training context) gets a chosen
ratio, and the user's ``scale`` moves the operating point from there.

The head is linear on one encoder state, so with the encoder held it is fitted exactly by ridge
regression (`fit_ratio_head`) instead of by gradient steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..modeling import SemiDynamicCompressor


@dataclass(frozen=True)
class Surprisal:
    """The base LM's information content of one text."""

    bits: float
    """Total surprisal ``-Σ log2 p(token | prefix)`` of the scored tokens."""
    tokens: int
    """Scored tokens: every token but the first, which has no prefix."""

    @property
    def bits_per_token(self) -> float:
        return self.bits / self.tokens


@torch.inference_mode()
def surprisal(
    model: SemiDynamicCompressor,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> list[Surprisal]:
    """Surprisal of each text under the untouched base decoder (adapter off), each text alone.

    Texts are cut to ``max_tokens`` decoder tokens (default: the compressor's segment size).
    Raises ``ValueError`` for a text with fewer than two tokens (nothing to score).
    """
    tok = model.decoder_tokenizer
    limit = max_tokens or model.config.max_segment_tokens
    ids = [x[:limit] for x in tok(list(texts), add_special_tokens=False)["input_ids"]]
    for i, x in enumerate(ids):
        if len(x) < 2:
            raise ValueError(f"text {i} has {len(x)} token(s); surprisal needs at least two")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[Surprisal | None] = [None] * len(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="surprisal", disable=not progress, unit="batch"):
        batch = order[start : start + batch_size]
        width = max(len(ids[i]) for i in batch)
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for row, i in enumerate(batch):
            x[row, : len(ids[i])] = torch.as_tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        x, mask = x.to(model.device), mask.to(model.device)
        with model.decoder.disable_adapter():
            logits = model.decoder(input_ids=x, attention_mask=mask).logits[:, :-1].float()
        nats = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), x[:, 1:], reduction="none"
        )  # [B, T-1]
        nats = (nats * mask[:, 1:]).sum(-1)
        for row, i in enumerate(batch):
            out[i] = Surprisal(bits=float(nats[row]) / math.log(2), tokens=len(ids[i]) - 1)
    return out  # type: ignore[return-value]


def bits_per_latent(reference: Surprisal | float, ratio: float) -> float:
    """``B`` such that a text of ``reference``'s density (a `Surprisal` or bits per token) gets
    label ``log2(ratio)``."""
    density = reference.bits_per_token if isinstance(reference, Surprisal) else reference
    if density <= 0 or ratio <= 0:
        raise ValueError(f"density and ratio must be positive, got {density}, {ratio}")
    return ratio * density


def surprisal_label(s: Surprisal, bits_per_latent: float) -> float:
    """``y = log2(B / mean bits per token)`` (module docstring). Raises ``ValueError`` for a text
    with no information (zero bits)."""
    if s.bits <= 0:
        raise ValueError("a text with zero surprisal has no density to label")
    return math.log2(bits_per_latent) - math.log2(s.bits_per_token)


@torch.inference_mode()
def head_features(
    model: SemiDynamicCompressor, texts: Sequence[str], *, batch_size: int = 16
) -> torch.Tensor:
    """The ``<eos>`` states the ratio head reads, ``[N, d_enc]`` float32 (one encoder pass per
    batch, as deep as `SemiDynamicCompressor.encoder_depth`; texts cut to one segment)."""
    ids = [x[: model.config.max_segment_tokens] for x in model.tokenize(texts)]
    rows = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        rows.append(model.head_inputs(batch).float().cpu())
    return torch.cat(rows)


@dataclass(frozen=True)
class HeadFit:
    weight: torch.Tensor
    """``[d]``: the head's weight, in the features' original units."""
    bias: float
    train_rmse: float


def fit_ratio_head(features: torch.Tensor, labels: torch.Tensor, ridge: float = 1.0) -> HeadFit:
    """Ridge regression ``y ≈ w·x + b`` on standardized features, folded back to a linear layer.

    ``features`` ``[N, d]``, ``labels`` ``[N]``; ``ridge`` is the L2 penalty on the standardized
    weights (in units of N: the penalty is ``ridge · N · |w|²``). Raises ``ValueError`` on
    mismatched or empty inputs.
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],) or features.shape[0] < 2:
        raise ValueError(
            f"need features [N, d] and labels [N] with N >= 2, got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    x, y = features.double(), labels.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    n, d = z.shape
    y_mean = y.mean()
    gram = z.T @ z + ridge * n * torch.eye(d, dtype=z.dtype)
    w = torch.linalg.solve(gram, z.T @ (y - y_mean))
    rmse = float(((z @ w + y_mean - y) ** 2).mean().sqrt())
    weight = w / std
    bias = float(y_mean - (weight * mean).sum())
    return HeadFit(weight=weight.float(), bias=bias, train_rmse=rmse)


def install_head(model: SemiDynamicCompressor, fit: HeadFit) -> None:
    """Write a fitted head into ``model.ratio_head`` (before latents are stored under its fingerprint)."""
    with torch.no_grad():
        model.ratio_head.weight.copy_(fit.weight.view_as(model.ratio_head.weight))
        model.ratio_head.bias.fill_(fit.bias)
