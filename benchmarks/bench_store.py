"""Precompression throughput, store size and store-hit latency, measured side by side (issue 5).

Throughput: the same SQuAD paragraphs, in the same token-budgeted, length-sorted batches, go through
(1) a bare encoder forward (``encode``: the base model with the encoder adapter plus the ratio
head), (2) ``compress_tokens`` (adds DRS, pooling and the converter MLP), and (3) the whole
``precompress`` job into a fresh store (adds tokenization, keys, the missing-key query, float16 cast
and SQLite commits). The percentages are what (2) and (3) cost on top of (1): that overhead should
stay small, since the encoder is the work we cannot avoid.

Store size: latent bytes per original token (float16) measured in the store, and per candidate
ratio from the same paragraphs' token counts, beside the text's own UTF-8 bytes and the decoder's
KV cache per token (what a plain-text context costs the decoder in memory).

Latency: ``LatentService.compress`` of one chunk that is in the store (memory cache off, so it is
a real store read) against compressing the chunk afresh through the same service without a store.

Reads: ``LatentStore.get_many`` (format version 2: every entry's checksum verified) against the
same rows read and decoded without the checksum, i.e. what the integrity check costs a read.

    python benchmarks/bench_store.py                 # SmolLM2-135M, 2 CPU threads, < 4 minutes
    python benchmarks/bench_store.py --model tiny    # tiny random Qwen3, seconds
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import Report, load_model, parser, setup, squad_passages
from _timing import interleave

from semidyn_rag.backbones import segment_count
from semidyn_rag.config import CompressorConfig
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.precompress import (
    FIRST_PASS_SHARE,
    Chunk,
    PrecompressConfig,
    pass_budget,
    plan_batches,
    precompress,
)
from semidyn_rag.service import LatentService
from semidyn_rag.store import _COLUMNS, LatentStore, _decode
from semidyn_rag.tiny import build_qwen3, build_tokenizer

logger = logging.getLogger("bench_store")


def tiny_model(texts: list[str], directory: Path, dtype: torch.dtype) -> SemiDynamicCompressor:
    """A random tiny Qwen3 (hidden 64) whose tokenizer is trained on the benchmark's paragraphs."""
    base = build_qwen3(directory / "tiny", build_tokenizer(texts, vocab_size=2000))
    config = CompressorConfig(encoder_model=str(base), converter_hidden=256)
    return SemiDynamicCompressor.from_config(config, dtype=dtype).eval()


class EncodeClock:
    """Times every ``model.encode`` call (the encoder pass) from inside the runs being timed."""

    def __init__(self, model: SemiDynamicCompressor) -> None:
        self.model, self.seconds = model, 0.0
        self._encode = model.encode
        model.encode = self  # type: ignore[method-assign]

    def __call__(self, contexts):
        start = time.perf_counter()
        try:
            return self._encode(contexts)
        finally:
            self.seconds += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = 0.0

    def remove(self) -> None:
        del self.model.encode


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--chunks", type=int, help="SQuAD paragraphs compressed per round "
                   "(default 16; tiny 200)")  # fmt: skip
    p.add_argument("--ratio", type=float, default=2.0,
                   help="fixed ratio of the timed runs (2, the smallest candidate, gives the most "
                        "latents: an upper bound on pooling, converter and store costs); "
                        "0 lets the DRS choose (scale 0)")  # fmt: skip
    p.add_argument("--batch-tokens", type=int, default=1024, help="padded tokens per encoder pass")
    p.add_argument("--hits", type=int, default=4, help="chunks per latency round")
    p.add_argument("--read-loops", type=int, default=200,
                   help="get_many calls over every stored entry per timed read round")  # fmt: skip
    args = p.parse_args()
    dtype = setup(args)
    for chatty in ("semidyn_rag.precompress", "semidyn_rag.store"):  # one line per timed round
        logging.getLogger(chatty).setLevel(logging.WARNING)
    passages = squad_passages(args.squad)
    scratch = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        if args.model == "tiny":
            model = tiny_model([q.text for q in passages], scratch, dtype)
            what = f"tiny random Qwen3 (hidden 64, 2 layers), {str(dtype).removeprefix('torch.')}"
        else:
            model, what, *_ = load_model(args, dtype)  # (model, description, trained)
        run(args, model, what, passages, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, model: SemiDynamicCompressor, what: str, passages, scratch: Path) -> None:
    count = args.chunks or (200 if args.model == "tiny" else 16)
    if count > len(passages):
        raise SystemExit(f"{args.squad} has only {len(passages)} paragraphs")
    chunks = [Chunk(f"squad#{i}", f"squad{i}", p.text, {}) for i, p in enumerate(passages[:count])]
    ratio = args.ratio or None
    config = PrecompressConfig(ratio=ratio, batch_tokens=args.batch_tokens, progress=False)
    token_lists = model.tokenize([c.text for c in chunks])
    total = sum(len(t) for t in token_lists)
    size = model.config.max_segment_tokens
    budget = pass_budget(config, str(model.device))  # exactly the passes `precompress` plans
    batches = [
        [token_lists[i] for i in batch]
        for batch in plan_batches(
            [len(t) for t in token_lists],
            batch_tokens=budget,
            max_rows=config.max_batch_rows,
            segment_tokens=size,
            first_batch_tokens=max(1, budget // FIRST_PASS_SHARE),
        )
    ]
    logger.info("%d paragraphs, %d tokens, %d encoder passes", count, total, len(batches))

    clock = EncodeClock(model)

    def forward() -> dict[str, float]:
        clock.reset()
        with torch.inference_mode():
            for ids in batches:
                model.encode(ids)
        return {"encode": clock.seconds}

    def compress() -> dict[str, float]:
        clock.reset()
        for ids in batches:
            segments = sum(segment_count(len(t), size) for t in ids)
            model.compress_tokens(ids, config.scale, ratio, batch_size=segments)
        return {"encode": clock.seconds}

    rounds = iter(range(10**6))

    def store_job() -> dict[str, float]:
        clock.reset()
        precompress(model, chunks, scratch / f"round{next(rounds)}", config)
        return {"encode": clock.seconds}

    samples = interleave(
        {"encoder forward": forward, "compress_tokens": compress, "precompress": store_job},
        reps=args.reps,
        device=args.device,
    )
    clock.remove()
    report = Report("bench_store", "Latent store: precompression, size, hit latency", args, what)
    rows = []
    for name in ("encoder forward", "compress_tokens", "precompress"):
        seconds = samples.median(name)
        paired = samples.ratio(name, "encoder forward") - 1
        outside = 1 - 1 / samples.ratio(name, name, den_key="encode")
        rows.append(
            (name, f"{total / seconds:,.0f}", f"{count / seconds:.1f}", seconds,
             f"{100 * paired:+.1f}%", f"{100 * outside:.1f}%",
             f"{100 * samples.spread(name):.0f}%")
        )  # fmt: skip
    headers = ["path", "tokens/s", "chunks/s", "median s", "time vs bare forward"]
    headers += ["time outside encode()", "spread"]
    report.table(
        "Throughput over the same batches",
        headers,
        rows,
        f"{count} SQuAD paragraphs, {total:,} tokens, {len(batches)} encoder passes of at most "
        f"{budget} padded tokens (the first: a quarter); ratio "
        f"{ratio if ratio else 'chosen by the DRS (scale 0)'}. 'time vs bare forward': median "
        "over rounds of the paired wall-time ratio minus 1 (between runs, so it carries the "
        "machine's load noise). 'time outside encode()': the share of the same run's wall time "
        "not spent in the encoder pass (timed inside the run, so load drifts cancel): what "
        "pooling, converter, tokenization, hashing and the store cost. spread = (max-min)/median "
        "of the absolute times.",
    )
    report.data["throughput"] = {
        "tokens": total,
        "chunks": count,
        **{name: samples.data[name]["wall"] for name in samples.data},
    }

    # A store kept for the size and latency measurements (the timed rounds' stores are throwaway).
    store_dir = scratch / "kept"
    precompress(model, chunks, store_dir, config)
    with LatentStore(store_dir, model.fingerprint) as store:
        info = store.info()
        sqlite_bytes = sum(size for name, size in info.files.items() if "sqlite" in name)
        size_rows = size_table(model, chunks, token_lists, info, sqlite_bytes)
        report.table(
            "Store bytes per original token (float16 latents)",
            ["what", "bytes / token", "vs UTF-8 text", "vs decoder KV cache"],
            size_rows,
            f"measured: {info.entries} entries, {info.original_tokens:,} tokens, "
            f"{info.latents:,} latents of width {info.hidden}; 'SQLite file' includes row "
            "overhead and page slack. Per-ratio rows are exact counts on the same paragraphs: "
            "sum(ceil(n/r)) * hidden * 2 bytes / sum(n).",
        )
        report.data["store_info"] = info.model_dump()
        latency(args, model, chunks, store, ratio, report)
        reads(args, store, report)
    report.write()


def reads(args, store: LatentStore, report: Report) -> None:
    """``get_many`` of every entry (checksums verified) against the same rows decoded unverified."""
    keys = store.keys()
    query = f"SELECT {_COLUMNS} FROM entries WHERE key IN ({','.join('?' * len(keys))})"

    def verified() -> None:
        for _ in range(args.read_loops):
            assert len(store.get_many(keys)) == len(keys)

    def unverified() -> None:  # get_many's work without the checksum
        for _ in range(args.read_loops):
            with store._transaction(write=False) as conn:
                found = {
                    row[0]: _decode(row, None, verify=False) for row in conn.execute(query, keys)
                }
            assert len(found) == len(keys)

    samples = interleave(
        {"get_many (checksums verified)": verified, "same rows, no checksum": unverified},
        reps=args.reps,
        device="cpu",
    )
    per = {
        name: samples.median(name) / (args.read_loops * len(keys)) * 1e6 for name in samples.data
    }
    cost = samples.ratio("get_many (checksums verified)", "same rows, no checksum")
    blob = store.info().latent_bytes / max(len(keys), 1)
    rows = []
    for name in samples.data:
        vs = cost if name.startswith("get_many") else 1.0
        rows.append((name, per[name], f"{vs:.2f}x", f"{100 * samples.spread(name):.0f}%"))
    report.table(
        "Store reads: checksum verification",
        ["path", "µs / entry", "time vs no checksum", "spread"],
        rows,
        f"{len(keys)} entries (mean {blob:,.0f} latent bytes each) read {args.read_loops} times "
        "per round; 'no checksum' is get_many's query and decode with the sha256 check skipped "
        "(not a public switch: reads always verify). Ratio: median of paired rounds.",
    )
    report.data["read_us_per_entry"] = per


def size_table(model, chunks, token_lists, info, sqlite_bytes):
    """Rows of bytes per token: measured store, each candidate ratio, text and KV cache."""
    tokens = sum(len(t) for t in token_lists)
    text_bytes = sum(len(c.text.encode()) for c in chunks) / tokens
    dec = model.decoder.get_base_model().config
    head_dim = getattr(dec, "head_dim", None) or dec.hidden_size // dec.num_attention_heads
    kv = 2 * dec.num_hidden_layers * dec.num_key_value_heads * head_dim * 2  # K and V, fp16

    def row(name: str, per_token: float) -> tuple:
        return (
            name,
            f"{per_token:,.1f}",
            f"{per_token / text_bytes:.1f}x",
            f"{per_token / kv:.3f}x",
        )

    rows = [
        row("store latents (measured)", info.bytes_per_token),
        row("SQLite file (measured)", sqlite_bytes / tokens),
    ]
    hidden = info.hidden
    for ratio in model.config.ratios:
        latents = sum(math.ceil(len(t) / ratio) for t in token_lists)
        rows.append(row(f"ratio {ratio:g}", latents * hidden * 2 / tokens))
    rows.append(row("UTF-8 text", text_bytes))
    rows.append(row("decoder KV cache of the text (fp16)", kv))
    return rows


def latency(args, model, chunks, store: LatentStore, ratio, report: Report) -> None:
    """Per-chunk latency of a store hit against a fresh compression of the same chunk."""
    texts = [c.text for c in chunks[: args.hits]]
    hit = LatentService(model, store, ratio=ratio, memory_entries=0)
    fresh = LatentService(model, None, ratio=ratio, memory_entries=0)
    assert all(c.source == "store" for c in hit.compress(texts))

    def store_hit() -> None:
        for text in texts:
            hit.compress([text])

    def afresh() -> None:
        for text in texts:
            fresh.compress([text])

    samples = interleave(
        {"store hit": store_hit, "compress afresh": afresh}, reps=args.reps, device=args.device
    )
    per = {name: samples.median(name) / len(texts) * 1e3 for name in samples.data}
    speedup = samples.ratio("compress afresh", "store hit")
    spread = {name: f"{100 * samples.spread(name):.0f}%" for name in samples.data}
    mean_chars = sum(len(t) for t in texts) / len(texts)
    report.table(
        "LatentService.compress of one chunk",
        ["path", "ms / chunk", "speedup", "spread"],
        [
            ("compress afresh", per["compress afresh"], "1.0x", spread["compress afresh"]),
            ("store hit", per["store hit"], f"{speedup:,.0f}x", spread["store hit"]),
        ],
        f"{len(texts)} paragraphs one at a time (mean {mean_chars:.0f} characters); store hit = "
        "key hashing, one SQLite read, float16 decode; the in-memory LRU is off.",
    )
    report.data["latency_ms"] = per


if __name__ == "__main__":
    main()
