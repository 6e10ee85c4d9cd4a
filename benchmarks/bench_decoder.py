"""Decoder cost of compressed vs uncompressed context, measured side by side (issue 8, part 1).

Real SQuAD paragraphs are concatenated to a few context lengths. For each length the same question
is answered from the plain text (through the same decoder, LoRA adapter on, so every position costs
the same) and from latents at each fixed ratio and a semi-dynamic mix. Latents are computed before
timing, as a warm latent store would serve them; the encoder's cost is in ``bench_scaling.py``.

Times: time to first token (TTFT = prompt embedding + prefill + first token, read by a streamer
inside the same ``complete`` call that then generates N tokens), total time for N tokens, and the
decode time per later token. Memory: the KV cache after generation, summed over the actual
``past_key_values`` tensors, and the peak of torch allocations during the whole ``generate`` call
(see ``_common.peak_bytes``), measured in one warm-up pass before the timed rounds.

    python benchmarks/bench_decoder.py                      # 2-core CPU, a few minutes
    python benchmarks/bench_decoder.py --large --device cuda
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from _common import Report, load_model, parser, peak_bytes, setup, squad_passages, take_tokens
from _timing import interleave
from transformers.generation.streamers import BaseStreamer

from semidyn_rag.modeling import LatentPrompt, SemiDynamicCompressor

logger = logging.getLogger("bench_decoder")
MIB = 2**20
PLAIN = "plain text"
BASE = "plain text, LoRA off"
EMPTY = "no context (floor)"


class FirstTokenClock(BaseStreamer):
    """Notes when ``generate`` emits its first new token (it first puts the empty prompt ids)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.first_cpu: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if self.first is None and value.numel():
            self.first, self.first_cpu = time.perf_counter(), time.process_time()

    def end(self) -> None:
        pass


def mixed_contexts(model: SemiDynamicCompressor, chunks: list[list[int]], trained: bool):
    """Semi-dynamic: the DRS picks each chunk's ratio (scale 0) when the head is trained.

    An untrained head's choice means nothing, so then the chunks take the candidate ratios in turn
    (2, 4, 8, 16, 32, 2, ...): a mix with the same per-chunk structure a trained model produces.
    """
    if trained:
        return model.compress_tokens(chunks, scale=0.0)
    ratios = model.config.ratios
    out = [None] * len(chunks)
    for k, ratio in enumerate(ratios):
        mine = list(range(k, len(chunks), len(ratios)))
        if mine:
            for i, ctx in zip(mine, model.compress_tokens([chunks[i] for i in mine], ratio=ratio)):
                out[i] = ctx
    return out


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help="context tokens (default 512 1024 2048)")
    p.add_argument("--new-tokens", type=int, help="tokens to generate (default 8; --large 64)")
    args = p.parse_args()
    lengths = args.lengths or ([1024, 2048, 4096, 7680] if args.large else [512, 1024, 2048])
    n_new = args.new_tokens or (64 if args.large else 8)
    dtype = setup(args)
    model, what, trained = load_model(args, dtype)
    passages = squad_passages(args.squad)
    tok = model.decoder_tokenizer
    report = Report("bench_decoder", "Decoder: compressed vs uncompressed context", args, what)
    ttft_rows, gen_rows, mem_rows, worst = [], [], [], {}

    for length in lengths:
        chunks = take_tokens(model, passages, length)
        question = passages[0].question
        plain_text = model.config.prompt_template.format(
            context="\n".join(tok.decode(c) for c in chunks), question=question
        )
        plain = LatentPrompt(plain_text, [])
        empty = LatentPrompt(model.config.prompt_template.format(context="", question=question))
        prompts = {PLAIN: plain, BASE: plain, EMPTY: empty}
        latents = {PLAIN: 0, BASE: 0, EMPTY: 0}
        contexts = {f"r={r:g}": model.compress_tokens(chunks, ratio=r) for r in model.config.ratios}
        contexts["semi-dynamic" if trained else "mix 2..32"] = mixed_contexts(
            model, chunks, trained
        )
        for name, ctxs in contexts.items():
            prompts[name] = LatentPrompt(
                model.format_prompt(question, len(ctxs)), [c.latents for c in ctxs]
            )
            latents[name] = sum(c.num_latents for c in ctxs)

        def generate(prompt: LatentPrompt, adapter: bool):
            """``complete``'s path, returning the KV cache and the prompt's position count."""
            kwargs = model.latent_decoder.generation_kwargs(
                {"max_new_tokens": n_new, "min_new_tokens": n_new}
            )
            with torch.inference_mode():
                embeds, mask, _ = model.embed_prompts([prompt])
                with (
                    model.adapter("decoder") as dec,
                    contextlib.nullcontext() if adapter else dec.disable_adapter(),
                ):
                    out = dec.generate(
                        inputs_embeds=embeds,
                        attention_mask=mask,
                        return_dict_in_generate=True,
                        **kwargs,
                    )
            return out, embeds.shape[1]

        # memory pass (one run per variant; also the warm-up)
        memory, positions = {}, {}
        for name, prompt in prompts.items():
            peak, (out, positions[name]) = peak_bytes(
                lambda p=prompt, a=name != BASE: generate(p, a), args.device
            )
            kv = sum(t.nbytes for lay in out.past_key_values.layers for t in (lay.keys, lay.values))
            memory[name] = (kv, peak)
            del out

        def timed(prompt: LatentPrompt, adapter: bool):
            def run() -> dict[str, float]:
                clock = FirstTokenClock()
                start, cpu = time.perf_counter(), time.process_time()
                model.complete(
                    [prompt], adapter=adapter, max_new_tokens=n_new, min_new_tokens=n_new,
                    streamer=clock,
                )  # fmt: skip
                total = time.perf_counter() - start
                ttft = clock.first - start
                decode = (total - ttft) / max(n_new - 1, 1)
                return {
                    "ttft": ttft,
                    "ttft_cpu": clock.first_cpu - cpu,
                    "total": total,
                    "decode": decode,
                }

            return run

        logger.info("context %d tokens: %s", length, {k: positions[k] for k in prompts})
        variants = {k: timed(v, k != BASE) for k, v in prompts.items()}
        samples = interleave(variants, reps=args.reps, warmup=0, device=args.device)
        base = PLAIN
        for name in prompts:
            lat = latents[name]
            n_ctx = 0 if name == EMPTY else lat or length
            other = positions[name] - n_ctx  # template + question positions, not compressed
            ctx_ideal = length / n_ctx if n_ctx else None
            whole_ideal = positions[base] / positions[name]
            speedup = samples.ratio(base, name, "ttft")
            if lat:
                worst[length] = min(worst.get(length, 9e9), speedup / whole_ideal)
            ttft_rows.append([
                length, name, n_ctx, other, positions[name],
                samples.median(name, "ttft") * 1e3, speedup, ctx_ideal or "-", whole_ideal,
                f"{100 * speedup / ctx_ideal:.0f}%" if lat else "-",
                f"{100 * speedup / whole_ideal:.0f}%" if name != BASE else "-",
                samples.ratio(base, name, "ttft_cpu"), samples.ratio(BASE, name, "ttft"),
            ])  # fmt: skip
            gen_rows.append([
                length, name, samples.median(name, "total") * 1e3,
                samples.ratio(base, name, "total"), samples.ratio(BASE, name, "total"),
                samples.median(name, "decode") * 1e3,
                samples.ratio(base, name, "decode"), f"{100 * samples.spread(name, 'total'):.0f}%",
            ])  # fmt: skip
            kv, peak = memory[name]
            mem_rows.append([
                length, name, positions[name] + n_new - 1, kv / MIB, memory[base][0] / kv,
                peak / MIB, memory[base][1] / peak,
            ])  # fmt: skip

    report.table(
        "Time to first token (prefill + first token)",
        ["ctx tokens", "variant", "ctx positions", "other positions", "prompt positions",
         "TTFT ms", "speed-up", "ideal (ctx only)", "ideal (whole prompt)",
         "% of ctx ideal", "% of whole-prompt ideal", "speed-up (CPU time)",
         "speed-up vs LoRA off"],
        ttft_rows,
        "*ctx positions*: context tokens (plain) or latents. *other positions*: chat template, "
        "prompt template and question, never compressed. *ideal (ctx only)* = context tokens / "
        "latents, the compression ratio actually realised (ceil per chunk); *ideal (whole prompt)* "
        "= plain prompt positions / compressed prompt positions, what a cost linear in positions "
        "allows. *speed-up* = plain TTFT / variant TTFT, paired per round, both through the same "
        "decoder (LoRA on: each position costs the same); *(CPU time)*: the same ratio of this "
        "process's CPU seconds up to the first token. *vs LoRA off*: against the plain text "
        "on the untouched base (`complete(adapter=False)`), what an uncompressed deployment runs; "
        "unmerged LoRA makes every decoder position dearer. Target: >= 80% of the whole-prompt "
        "ideal. *no context (floor)*: the same prompt without context, the most any compression "
        "can approach (its shortfall from the ideal is the fixed cost of a `generate` call). Above "
        "100%: cost grows faster than linearly in positions (attention). Lowest % of "
        "whole-prompt ideal per length: "
        + ", ".join(f"{k}: {100 * v:.0f}%" for k, v in worst.items()) + ".",
    )  # fmt: skip
    report.table(
        f"Generating {n_new} tokens",
        ["ctx tokens", "variant", "total ms", "speed-up", "speed-up vs LoRA off",
         "decode ms/token", "decode speed-up", "total spread"],
        gen_rows,
        f"*total*: one `complete` call, prefill + {n_new} tokens (min_new_tokens forces all). "
        "*decode ms/token*: (total - TTFT) / (N - 1); later tokens attend to a shorter KV cache. "
        "*total spread*: (max - min) / median of the absolute time over rounds (load noise).",
    )  # fmt: skip
    report.table(
        "Memory",
        ["ctx tokens", "variant", "cached positions", "KV cache MiB", "KV saving",
         "peak MiB", "peak saving"],
        mem_rows,
        "*KV cache*: bytes of the `past_key_values` tensors after generation (exact). *peak*: "
        "the highest total of torch allocations during embed + prefill + decode above the level "
        "before the call (CPU: profiler allocation events; CUDA: max_memory_allocated) - KV "
        "cache, activations, logits; model weights excluded. *saving* = plain / variant.",
    )  # fmt: skip
    report.write()


if __name__ == "__main__":
    main()
