"""Distillation targets: the base decoder, reading the uncompressed contexts, writes the answers.

Sequence-level knowledge distillation as in PISCO (Louis et al., ACL Findings 2025): the student
(decoder adapter reading latents) is trained on the answers the teacher (the same base decoder with
its adapter off, reading the full text) gives, not on gold spans. What the student then learns is
exactly what our metric measures: the share of full-context answers kept under compression, in the
teacher's answer style. For token-level distillation each answer position also keeps the teacher's
``top_k`` next-token log-probabilities (a sparse soft target for `loss.distillation_loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..decoder import LatentPrompt
from ..modeling import SemiDynamicCompressor
from .samples import TeacherTargets, TrainSample

logger = logging.getLogger(__name__)


def plain_prompt(model: SemiDynamicCompressor, question: str, contexts: Sequence[str]) -> str:
    """The teacher's prompt: the compressor's own template with the contexts as plain text."""
    return model.config.prompt_template.format(context="\n".join(contexts), question=question)


@torch.inference_mode()
def teacher_answers(
    model: SemiDynamicCompressor,
    samples: Sequence[TrainSample],
    *,
    max_new_tokens: int = 32,
    top_k: int = 8,
    batch_size: int = 8,
    progress: bool = True,
) -> list[TrainSample]:
    """Replace each sample's answer by the base decoder's greedy answer on the full contexts.

    Returns one sample per input whose teacher wrote a non-empty answer (the others are logged and
    dropped), with ``teacher`` set: the generated decoder token ids (``<eos>`` last when the teacher
    stopped within ``max_new_tokens``) and, per generated position, the ``top_k`` token ids and
    natural-log probabilities of the teacher's next-token distribution (shape ``[A, top_k]``).
    Generation is batched (``batch_size`` prompts, left-padded) and single-threaded: it does not
    take the compressor's lock, so do not run other passes on the same model concurrently.
    """
    if top_k < 1 or max_new_tokens < 1:
        raise ValueError(
            f"top_k and max_new_tokens must be positive, got {top_k}, {max_new_tokens}"
        )
    tok = model.decoder_tokenizer
    eos = tok.eos_token_id
    out: list[TrainSample] = []
    empty = 0
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="teacher", disable=not progress, unit="batch"):
        batch = samples[start : start + batch_size]
        prompts = [  # from_parts: a U+E000 in the data is text, not a latent slot
            LatentPrompt.from_parts([plain_prompt(model, s.question, s.contexts)]) for s in batch
        ]
        embeds, mask, _ = model.embed_prompts(prompts)
        with model.decoder.disable_adapter():
            gen = model.decoder.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                eos_token_id=eos,
                output_logits=True,
                return_dict_in_generate=True,
            )
        logprobs = torch.stack(gen.logits, dim=1).float().log_softmax(-1)  # [B, T, V]
        top = logprobs.topk(top_k, dim=-1)
        for row, sample in enumerate(batch):
            ids = gen.sequences[row].tolist()
            length = ids.index(eos) + 1 if eos in ids else len(ids)
            text = tok.decode(ids[:length], skip_special_tokens=True).strip()
            if not text:
                empty += 1
                continue
            targets = TeacherTargets(
                answer_ids=ids[:length],
                top_ids=top.indices[row, :length].tolist(),
                top_logprobs=[[round(v, 4) for v in r] for r in top.values[row, :length].tolist()],
            )
            provenance = {**sample.provenance, "kind": "distilled", "gold": sample.answer}
            out.append(
                sample.model_copy(
                    update={"answer": text, "teacher": targets, "provenance": provenance}
                )
            )
    if empty:
        logger.warning("the teacher gave an empty answer to %d of %d samples", empty, len(samples))
    return out
