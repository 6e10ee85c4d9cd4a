"""Decoder side of a training step: the output head on every position vs on the answers only.

A training step scores only the answer tokens, a few dozen of a prompt's hundreds of positions,
but a causal LM's forward applies its output head (576 → 49,152 for SmolLM2) everywhere. This
times the decoder's forward and backward on the same batch two ways, side by side:

- **full logits**: ``decoder(...).logits`` ``[B, T, V]``, upcast, cross-entropy with the prompt
  positions ignored (what the training loss did before `loss.answer_logits`);
- **answer logits**: `loss.answer_logits`, the head on the answer positions only (the loss now);
- **answer logits, bf16 autocast**: the same under ``torch.autocast`` in bfloat16, what
  ``TrainConfig.mixed_precision="bf16"`` runs (on a CPU with AVX-512 BF16 too).

The batch is real: SQuAD paragraphs compressed at ratio 4 (latents made before timing, no
gradient), a question, and an answer of ``--answer-tokens`` tokens; ``--contexts`` paragraphs per
prompt (5: the mixed phases' retrieved prompts; written to ``bench_train_step_5ctx.*``). Peak
memory is measured in one untimed pass, before one warm-up round and ``--reps`` timed ones.

    python benchmarks/bench_train_step.py                  # 2-core CPU, batch 4, about 2 minutes
    python benchmarks/bench_train_step.py --large --device cuda
"""

from __future__ import annotations

import logging

import torch
from _common import Report, load_model, parser, peak_bytes, setup, squad_passages
from _timing import interleave
from torch import nn

from semidyn_rag.training.loss import answer_logits

logger = logging.getLogger("bench_train_step")
MIB = 2**20
FULL = "full logits"
ANSWER = "answer logits"
BF16 = "answer logits, bf16 autocast"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (32 with --large)")
    p.add_argument("--contexts", type=int, default=1, help="paragraphs per prompt")
    p.add_argument("--answer-tokens", type=int, default=24)
    p.add_argument("--ratio", type=float, default=4.0)
    args = p.parse_args()
    batch = args.batch_size if args.batch_size is not None else (32 if args.large else 4)
    for name, value in (("batch-size", batch), ("contexts", args.contexts)):
        if value < 1:
            p.error(f"--{name} must be at least 1, got {value}")
    if args.answer_tokens < 1 or args.ratio <= 1:
        p.error(
            f"--answer-tokens must be ≥ 1 and --ratio > 1, got {args.answer_tokens}, {args.ratio}"
        )
    passages = squad_passages(args.squad)
    need = batch * args.contexts
    if len(passages) < need:
        p.error(f"{need} paragraphs needed, the SQuAD file holds {len(passages)}")
    dtype = setup(args)
    model, what, _ = load_model(args, dtype)

    prompts, answers = [], []
    filler = model.decoder_tokenizer(" the answer is in the context", add_special_tokens=False)
    with torch.no_grad():
        for i in range(batch):
            group = passages[i * args.contexts : (i + 1) * args.contexts]
            compressed = model.compress([g.text for g in group], ratio=args.ratio)
            prompts.append(model.latent_prompt(group[0].question, [c.latents for c in compressed]))
            ids = (filler.input_ids * args.answer_tokens)[: args.answer_tokens - 1]
            answers.append([*ids, model.decoder_tokenizer.eos_token_id])
        embeds, mask, targets = model.embed_prompts(prompts, answers)
    model.train()
    positions, vocab = int(mask.sum()), model.decoder.get_output_embeddings().weight.shape[0]
    scored = int((targets[:, 1:] != -100).sum())

    def full() -> None:
        with model.adapter("decoder") as decoder:
            logits = decoder(inputs_embeds=embeds, attention_mask=mask).logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()
        model.zero_grad(set_to_none=True)

    def answer() -> None:
        with model.adapter("decoder") as decoder:
            out = answer_logits(decoder, embeds, mask, targets)
        nn.functional.cross_entropy(out.logits.float(), out.targets).backward()
        model.zero_grad(set_to_none=True)

    def answer_bf16() -> None:
        # what `TrainConfig.mixed_precision="bf16"` does through accelerate, on any device
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16):
            answer()

    variants = {FULL: full, ANSWER: answer, BF16: answer_bf16}
    peaks = {name: peak_bytes(fn, args.device)[0] for name, fn in variants.items()}
    samples = interleave(variants, reps=args.reps, device=args.device)

    name = "bench_train_step" + (f"_{args.contexts}ctx" if args.contexts > 1 else "")
    report = Report(name, "Training step: output head on answers only", args, what)
    rows = [[name, f"{samples.median(name):.3f}", f"{peaks[name] / MIB:.0f}"] for name in variants]
    report.table(
        f"Decoder forward + backward, batch {batch}, {args.contexts} paragraph(s) per prompt at "
        f"ratio {args.ratio:g}",
        ["variant", "median s", "peak MiB"],
        rows,
        note=(
            f"{positions} prompt positions in the batch, {scored} of them scored; vocabulary "
            f"{vocab}. Answer logits against full logits: "
            f"**{samples.ratio(FULL, ANSWER):.2f}× faster** (median of paired rounds; CPU time "
            f"{samples.ratio(FULL, ANSWER, key='cpu'):.2f}×), "
            f"**{peaks[FULL] / max(peaks[ANSWER], 1):.2f}× less peak memory**. The same in bf16 "
            f"autocast against float32: **{samples.ratio(ANSWER, BF16):.2f}× faster**, "
            f"{peaks[ANSWER] / max(peaks[BF16], 1):.2f}× less peak memory."
        ),
    )
    report.write()


if __name__ == "__main__":
    main()
