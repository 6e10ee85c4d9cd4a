"""How the costs grow with context length and with the number of retrieved chunks (issue 8, part 3).

A fixed-size chunker cuts the SQuAD token stream into chunks of ``--chunk`` tokens; a prompt
holds 1, 2, 4 or 8 of them (one latent span each), or the same number of tokens as ONE context.
Per layout, in the same rounds: the encoder's ``compress_tokens`` (all chunks in one batch),
the decoder's time to first token on the plain text and on the latents at ``--ratio``, and the
cold-store total (compress, then prefill) against plain. Storage per original token is exact:
latent bytes in float16 / context tokens, beside what a float16 KV cache of the plain text costs.

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --large --device cuda
"""

from __future__ import annotations

import logging

from _common import Report, load_model, parser, setup, squad_passages, take_tokens
from _timing import interleave

from semidyn_rag import pooling
from semidyn_rag.modeling import LatentPrompt, SemiDynamicCompressor

logger = logging.getLogger("bench_scaling")


def layouts(model, passages, chunk: int, counts: list[int], singles: list[int]):
    """``{series: {label: token lists}}``: k chunks of ``chunk`` tokens, or one of k * chunk."""
    stream = [t for ids in take_tokens(model, passages, chunk * max(counts + singles)) for t in ids]
    chunked = {
        f"{k} x {chunk}": [stream[i * chunk : (i + 1) * chunk] for i in range(k)] for k in counts
    }
    single = {f"1 x {k * chunk}": [stream[: k * chunk]] for k in [1, *singles]}
    return {"chunks": chunked, "one context": single}


def kv_bytes_per_token(model: SemiDynamicCompressor) -> int:
    """float16 KV cache bytes one position costs in the decoder (keys + values, all layers)."""
    cfg = model.decoder.get_base_model().config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2


def plot(series: dict[str, list[tuple[int, float, float, float]]], path) -> None:
    """Medians (ms) of compress / plain prefill / latent prefill against context tokens."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (tag, points), style in zip(series.items(), ("-o", "--s")):
        points = sorted(points)
        for col, name in enumerate(("compress", "prefill plain", "prefill latents"), start=1):
            ys = [p[col] for p in points]
            ax.plot([p[0] for p in points], ys, style, color=f"C{col}", label=f"{name}, {tag}")
    ax.set(xlabel="context tokens", ylabel="median ms", xscale="log", yscale="log")
    ax.set_xticks(sorted({p[0] for points in series.values() for p in points}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def storage_table(report: Report, model: SemiDynamicCompressor, groups: dict, kv: int) -> None:
    """Stored bytes per original token at every candidate ratio (exact: ceil per chunk)."""
    d_dec = model.decoder.get_base_model().config.hidden_size
    chunked, single = (max(g.values(), key=lambda c: sum(map(len, c))) for g in groups.values())
    chunked_tok, single_tok = (sum(map(len, c)) for c in (chunked, single))
    rows = []
    for r in model.config.ratios:
        lat = [sum(pooling.num_windows(len(c), round(r)) for c in g) for g in (chunked, single)]
        rows.append([
            f"{r:g}", f"{d_dec * 2 * lat[0] / chunked_tok:.0f}",
            f"{d_dec * 2 * lat[1] / single_tok:.0f}", f"{kv * lat[0] / chunked_tok:.0f}",
            f"{chunked_tok / lat[0]:.2f}",
        ])  # fmt: skip
    report.table(
        "Storage per original token (float16)",
        ["ratio", f"latent B / tok, {len(chunked)} chunks", "latent B / tok, one context",
         "decoder KV B / tok", "KV saving vs plain"],
        rows,
        f"Stored latents are {d_dec} float16 values each: {2 * d_dec} B / ratio per token plus "
        f"the last partial window of each chunk. A plain-text context needs {kv} B of float16 KV "
        "cache per token in the decoder; the latents need that per latent.",
    )  # fmt: skip


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--chunk", type=int, default=200, help="tokens per retrieved chunk")
    p.add_argument("--chunks", type=int, nargs="+", help="chunk counts (default 1 2 4 8)")
    p.add_argument("--singles", type=int, nargs="*", help="k for one context of k * chunk tokens")
    p.add_argument("--ratio", type=float, default=4, help="compression ratio of the latent rows")
    p.add_argument("--no-plot", action="store_true", help="skip results/bench_scaling.png")
    args = p.parse_args()
    args.chunks = args.chunks or ([1, 4, 16, 32] if args.large else [1, 2, 4, 8])
    if args.singles is None:
        args.singles = [16, 32] if args.large else [4, 8]
    dtype = setup(args)
    model, what, _ = load_model(args, dtype)
    passages = squad_passages(args.squad)
    question = passages[0].question
    tok = model.decoder_tokenizer
    report = Report("bench_scaling", "Scaling with context length and chunk count", args, what)

    variants, facts = {}, {}
    groups = layouts(model, passages, args.chunk, args.chunks, args.singles)
    for label, chunks in {**groups["chunks"], **groups["one context"]}.items():
        ctxs = model.compress_tokens(chunks, ratio=args.ratio)
        context = "\n".join(tok.decode(c) for c in chunks)
        plain = model.config.prompt_template.format(context=context, question=question)
        latent = LatentPrompt(model.format_prompt(question, len(ctxs)), [c.latents for c in ctxs])
        n_tok = sum(len(c) for c in chunks)
        n_lat = sum(c.num_latents for c in ctxs)
        n_seg = sum(pooling.num_windows(len(c), model.config.max_segment_tokens) for c in chunks)
        facts[label] = (len(chunks), n_seg, n_tok, n_lat, len(context.encode()))
        variants[f"{label}|compress"] = lambda c=chunks: model.compress_tokens(c, ratio=args.ratio)
        for kind, prompt in (("plain", LatentPrompt(plain, [])), ("latent", latent)):
            variants[f"{label}|{kind}"] = lambda pr=prompt: model.complete([pr], max_new_tokens=1)

    def adapter(name: str):
        def select() -> None:
            with model.adapter(name):
                pass

        return select

    # the encoder/decoder adapter switch stays out of the timings (bench_encoder times it)
    prepare = {k: adapter("encoder" if k.endswith("compress") else "decoder") for k in variants}
    logger.info("%d variants per round", len(variants))
    s = interleave(variants, reps=args.reps, device=args.device, prepare=prepare)

    d_dec = model.decoder.get_base_model().config.hidden_size
    kv = kv_bytes_per_token(model)
    rows, series = [], {tag: [] for tag in groups}
    for label, (k, n_seg, n_tok, n_lat, n_bytes) in facts.items():
        ms = [s.median(f"{label}|{kind}") * 1e3 for kind in ("compress", "plain", "latent")]
        rows.append([
            label, k, n_seg, n_tok, ms[0], ms[0] / n_tok * 1e3, ms[1], ms[2],
            s.ratio(f"{label}|plain", f"{label}|latent"),
            s.ratio([f"{label}|compress", f"{label}|latent"], f"{label}|plain"),
            f"{d_dec * 2 * n_lat / n_tok:.0f}", f"{kv * n_lat / n_tok:.0f}",
            f"{n_bytes / n_tok:.1f}",
        ])  # fmt: skip
        for tag, members in groups.items():
            if label in members:
                series[tag].append((n_tok, *ms))
    report.table(
        f"Costs by layout (latents at ratio {args.ratio:g})",
        ["layout", "chunks", "encoder segments", "ctx tokens", "compress ms",
         "compress ms / 1k tok",
         "prefill plain ms", "prefill latents ms", "prefill speed-up", "cold / plain",
         "latent B / tok (fp16)", "latent KV B / tok (fp16)", "text B / tok"],
        rows,
        "*compress*: `compress_tokens` of all chunks, one encoder batch (bidirectional "
        "attention: a long single context costs more per token than the same tokens in chunks; "
        f"texts over {model.config.max_segment_tokens} tokens become several segments). "
        "*prefill*: `complete(max_new_tokens=1)`, i.e. time to first token, plain text vs latents "
        "(warm store). *cold / plain*: (compress + latent prefill) / plain prefill, paired per "
        "round (> 1: compressing on the fly is slower than reading the text; a cold query also "
        "pays two LoRA adapter switches, timed in bench_encoder and left out here). "
        "*latent B / tok*: "
        f"stored float16 latents ({d_dec} wide) per original token; *latent KV B / tok*: the "
        f"decoder KV cache those latents need, per original token (plain text: {kv} B / tok); "
        "*text B / tok*: UTF-8 bytes of the plain context per token.",
    )  # fmt: skip
    storage_table(report, model, groups, kv)
    if not args.no_plot:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(series, args.out / "bench_scaling.png")
    report.write()


if __name__ == "__main__":
    main()
