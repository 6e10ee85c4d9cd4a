"""Converter alignment: start SFT from latents the decoder can already half-read.

A freshly initialised converter emits vectors that mean nothing to the decoder. Early in SFT the
cheapest way to lower the LM loss is then to make every latent the same harmless vector, after
which the decoder learns to ignore them and does not recover (latent collapse: latents identical
across positions, the loss with another context's latents equal to the loss with the right ones;
docs/experiments.md has the measurements). Fitting the converter first, by regression, to the
mean *decoder input embedding* of the tokens each window covers gives latents that are diverse,
at the right scale and roughly "bag of these tokens" to the decoder, so SFT starts from a signal
instead of noise. It needs only encoder forward passes and the small MLP's gradients, so it costs
seconds to minutes where SFT costs hours. Requires encoder and decoder to share a
tokenizer (the shared-base setting of the paper and of the bundled default).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import pooling
from ..modeling import SemiDynamicCompressor

logger = logging.getLogger(__name__)


AlignTarget = Literal["mean", "salient"]


def salient_tokens(
    ids: Sequence[int], window: int, align: pooling.Alignment, counts: Mapping[int, int]
) -> list[int]:
    """Per mean-pooling window, its rarest token under ``counts`` (the first of equally rare ones).

    Windows are those of `pooling.mean_pool` with the same ``window`` and ``align``, so the result
    lines up with the latents one to one.
    """
    n = pooling.num_windows(len(ids), window)
    first = len(ids) - n * window if align == "end" else 0  # negative: the front pad of "end"
    return [
        min(ids[max(0, first + i * window) : first + (i + 1) * window], key=lambda t: counts[t])
        for i in range(n)
    ]


@torch.no_grad()
def _features(
    model: SemiDynamicCompressor,
    contexts: Sequence[Sequence[int]],
    target: AlignTarget,
    seed: int,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled encoder states and the decoder embeddings they should map to, one ratio per context."""
    rng = random.Random(seed)
    table = model.decoder.get_input_embeddings()
    align = model.config.pooling_alignment
    counts = Counter(t for ids in contexts for t in ids)
    inputs, targets = [], []
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start : start + batch_size]
        hidden, _ = model.encode(batch)
        for row, ids in enumerate(batch):
            window = max(1, round(rng.choice(list(model.config.ratios))))
            inputs.append(pooling.mean_pool(hidden[row, : len(ids)], window, align).float())
            if target == "salient":
                picked = salient_tokens(ids, window, align, counts)
                targets.append(table(torch.as_tensor(picked, device=model.device)).float())
            else:
                embeds = table(torch.as_tensor(ids, device=model.device)).float()
                targets.append(pooling.mean_pool(embeds, window, align))
    return torch.cat(inputs), torch.cat(targets)


def align_converter(
    model: SemiDynamicCompressor,
    contexts: Sequence[Sequence[int]],
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 256,
    encode_batch_size: int = 8,
    seed: int = 0,
    target: AlignTarget = "mean",
    progress: bool = True,
) -> tuple[float, float]:
    """Fit ``model.converter`` to map pooled encoder states to decoder token embeddings.

    ``contexts`` are encoder token ids (e.g. a sample of the training contexts). Windows are drawn
    from the model's candidate ratios. ``target``: ``mean``, the mean embedding of the window's
    tokens; ``salient``, the embedding of its rarest token (counted over ``contexts``), so that the
    latents read like a telegram of the context's names and numbers — which an untrained SmolLM2
    decoder can use, where it cannot use mean embeddings (docs/experiments.md). Returns the mean
    squared error relative to the targets' variance before and after (1.0 = no better than their
    mean). Raises ``ValueError`` for a backbone other than mean pooling, tokenizers that differ, or
    no contexts.
    """
    if model.config.backbone != "mean_pooling":
        raise ValueError("converter alignment is defined for the mean_pooling backbone")
    if model.tokenizer.get_vocab() != model.decoder_tokenizer.get_vocab():
        raise ValueError("converter alignment needs encoder and decoder to share a tokenizer")
    if not contexts:
        raise ValueError("no contexts to align on")
    was_training = model.training
    model.eval()
    inputs, targets = _features(model, contexts, target, seed, encode_batch_size)
    variance = targets.var(0).sum().clamp_min(1e-12)
    converter = model.converter
    dtype = model.dtype  # fitted in float32, handed back in the model's dtype
    converter.float()
    optimizer = torch.optim.AdamW(converter.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def relative_error() -> float:
        with torch.no_grad():
            error = (converter(inputs) - targets).pow(2).sum(-1).mean()
        return float(error / variance)

    before = relative_error()
    for _ in tqdm(range(steps), desc="align converter", disable=not progress):
        pick = torch.randint(len(inputs), (min(batch_size, len(inputs)),), generator=generator)
        loss = nn.functional.mse_loss(converter(inputs[pick]), targets[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no stale gradient may leak into the SFT that follows
    after = relative_error()
    converter.to(dtype)
    model.train(was_training)
    logger.info(
        "converter aligned on %d windows: relative error %.3f -> %.3f", len(inputs), before, after
    )
    return before, after
