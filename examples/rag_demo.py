"""The main job: precompress a small corpus, answer questions through a LlamaIndex query engine.

    python examples/rag_demo.py                        # the bundled default compressor (make demo)
    python examples/rag_demo.py --compressor DIR       # any trained checkpoint (ours or the paper's)
    python examples/rag_demo.py --store DIR            # keep the latents: a rerun encodes nothing

1. *Offline*: the ten documents in ``examples/corpus/`` are split into chunks, embedded with
   all-MiniLM-L6-v2 into a FAISS-backed `VectorStoreIndex`, and every chunk is compressed once into
   a `LatentStore`; the selector picks a ratio per chunk.
2. *Online*: a new `LatentService` on that store stands for the serving process. Each question
   goes retriever → `SemiDynamicNodePostprocessor` (chunk text → marker of its stored latents, no
   encoder pass) → `SemiDynamicLLM` (markers → latent spans → decoder). The questions run twice:
   the first pass reads the store, the second the service's in-process memory.
3. *Baseline*: the same index, retrieval and prompt, but the decoder's base model with its LoRA
   adapter disabled reads the plain chunk text. That is the honest uncompressed comparison: the
   same weights a user would run without compression (the decoder adapter was trained to read
   latents, not text), on the same chunks.
4. *Selective expansion*: the compressed engine again with ``expand_top_k=1``: per question the
   best-scored chunk reaches the decoder as plain text and the others as latents, in one prompt.

The report shows each answer, the ratio chosen per chunk, the average compression ratio, the
store hits per pass, and the time of the engines: all-latent, k=1 expanded and plain text side by
side.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _pipeline import (
    CORPUS_DIR,
    build_index,
    embedding_model,
    load_compressor,
    load_nodes,
    setup_logging,
)
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.query_engine import BaseQueryEngine
from llama_index.llms.semidyn import SemiDynamicLLM
from llama_index.postprocessor.semidyn import (
    EXPANDED,
    NUM_LATENTS,
    SEGMENT_RATIOS,
    SOURCE,
    SemiDynamicNodePostprocessor,
)
from llama_index.response_synthesizers.semidyn import (
    SemiDynamicSynthesizer,
    as_semidyn_query_engine,
    qa_prompt,
)

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.metrics import average_compression_ratio, substring_match
from semidyn_rag.precompress import PrecompressReport
from semidyn_rag.service import ChunkLatents, LatentService
from semidyn_rag.store import LatentStore

logger = logging.getLogger("rag_demo")
EMPTY = "Empty Response"  # what LlamaIndex answers when the LLM returned nothing


@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]
    doc: str


@dataclass
class Answer:
    """One question through one engine: the answer and what the decoder read."""

    text: str
    docs: list[str]
    ratios: list[str]
    """The selector's ratio per chunk (``4``), per segment of a long chunk (``2+4``), or
    ``text`` for a chunk expanded to plain text; empty for the plain-text baseline."""
    sources: list[str]
    context_positions: int
    """Latent positions plus the tokens of text chunks: what the decoder read as context."""
    answer_tokens: int
    """Tokens of the answer: decoding time grows with them, so the report shows them next to it."""


@dataclass
class Pass:
    name: str
    seconds: float
    answers: list[Answer]

    def sources(self) -> Counter[str]:
        return Counter(s for a in self.answers for s in a.sources)


@dataclass
class DemoResult:
    questions: list[Question]
    chunks: list[tuple[str, ChunkLatents]]
    """(document name, latents) of every corpus chunk, from precompression."""
    precompress: PrecompressReport
    passes: list[Pass] = field(default_factory=list)
    baseline: Pass | None = None
    expansion: Pass | None = None
    """The compressed engine with ``expand_top_k`` chunks as text (None: not run)."""
    expand_top_k: int = 0


def read_questions(path: Path) -> list[Question]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Question(**json.loads(line)) for line in lines if line.strip()]


def ratio_text(segment_ratios: Sequence[float]) -> str:
    return "+".join(f"{r:g}" for r in segment_ratios)


def ask(
    engine: BaseQueryEngine,
    questions: Sequence[Question],
    name: str,
    count_tokens: Callable[[str], int],
) -> Pass:
    """Every question through ``engine``, timed as a whole (retrieval, store reads, decoding)."""
    answers = []
    start = time.perf_counter()
    for q in questions:
        response = engine.query(q.question)
        metas = [n.node.metadata for n in response.source_nodes]
        text = str(response.response or "").strip()
        # a node the postprocessor left alone (baseline) or expanded is read as its text
        latent = [NUM_LATENTS in m and not m.get(EXPANDED) for m in metas]
        positions = sum(
            m[NUM_LATENTS] if is_latent else count_tokens(n.node.get_content())
            for n, m, is_latent in zip(response.source_nodes, metas, latent)
        )
        processed = [EXPANDED in m for m in metas]
        answers.append(
            Answer(
                text=text,
                docs=[m.get("file_name", "?") for m in metas],
                ratios=[
                    ratio_text(m[SEGMENT_RATIOS]) if is_latent else "text"
                    for m, is_latent in zip(metas, latent)
                ]
                if any(processed)
                else [],
                sources=[m[SOURCE] for m, is_latent in zip(metas, latent) if is_latent],
                context_positions=positions,
                answer_tokens=count_tokens(text) if text != EMPTY else 0,
            )
        )
        logger.info("%s: %s -> %r", name, q.question, answers[-1].text)
    return Pass(name, time.perf_counter() - start, answers)


def run_demo(
    model: SemiDynamicCompressor,
    *,
    corpus: Path = CORPUS_DIR,
    store_path: Path,
    embed_model: BaseEmbedding | None = None,
    scale: float = 0.0,
    top_k: int = 2,
    max_new_tokens: int = 32,
    chunk_size: int = 160,
    limit: int | None = None,
    baseline: bool = True,
    expand_top_k: int = 1,
) -> DemoResult:
    """Index ``corpus``, precompress it into the store at ``store_path``, ask its questions.

    ``embed_model`` defaults to all-MiniLM-L6-v2; ``limit`` asks only the first questions;
    ``baseline=False`` skips the plain-text engine; ``expand_top_k`` chunks per question go as
    text in the selective-expansion pass (0: no such pass).
    """
    questions = read_questions(corpus / "questions.jsonl")[:limit]
    nodes = load_nodes(corpus, chunk_size=chunk_size, extensions=[".md"])
    embed = embed_model or embedding_model()
    index = build_index(nodes, embed)

    with LatentStore(store_path, model.fingerprint) as store:
        # 1. offline: the core's resumable precompression job, over exactly the texts and the
        #    ratio policy the postprocessor will look up
        offline = SemiDynamicNodePostprocessor(LatentService(model, store, scale=scale))
        report = offline.precompress(nodes)
        # what the selector chose per chunk, read back from the store (no encoder pass)
        chunks = LatentService(model, store, scale=scale).compress(
            [offline.node_text(n) for n in nodes]
        )
        result = DemoResult(
            questions=questions,
            chunks=[(n.metadata.get("file_name", "?"), c) for n, c in zip(nodes, chunks)],
            precompress=report,
            expand_top_k=expand_top_k,
        )

        # 2. online: a fresh service stands for the serving process; everything is in the store
        service = LatentService(model, store, scale=scale)
        llm = SemiDynamicLLM(service, max_new_tokens=max_new_tokens)
        engine = as_semidyn_query_engine(index, service, llm=llm, similarity_top_k=top_k)
        base_llm = SemiDynamicLLM(service, max_new_tokens=max_new_tokens, adapter=False)
        llm.complete("Hello.")  # warm both decoders up, so that no pass pays first-call costs
        base_llm.complete("Hello.")
        tokenizer = model.decoder_tokenizer

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        result.passes.append(ask(engine, questions, "pass 1 (store)", count_tokens))
        result.passes.append(ask(engine, questions, "pass 2 (memory)", count_tokens))
        if expand_top_k:
            expanding = as_semidyn_query_engine(
                index, service, llm=llm, similarity_top_k=top_k, expand_top_k=expand_top_k
            )
            name = f"k={expand_top_k} as text"
            result.expansion = ask(expanding, questions, name, count_tokens)

        # 3. baseline: same index, retrieval and prompt; the base decoder reads the chunk text
        if baseline:
            plain = index.as_query_engine(
                llm=base_llm,
                similarity_top_k=top_k,
                response_synthesizer=SemiDynamicSynthesizer(
                    llm=base_llm, text_qa_template=qa_prompt(service)
                ),
            )
            result.baseline = ask(plain, questions, "baseline (plain text)", count_tokens)
    return result


# ---------------------------------------------------------------------- the printed report
def _accuracy(answers: Sequence[Answer], questions: Sequence[Question]) -> str:
    hits = sum(substring_match(a.text, q.answers) for a, q in zip(answers, questions))
    found = sum(q.doc in a.docs for a, q in zip(answers, questions))
    n = len(questions)
    return f"answer contains the reference: {hits}/{n}; gold document retrieved: {found}/{n}"


def format_report(result: DemoResult) -> str:
    """The human-readable report ``main`` prints."""
    out: list[str] = []
    chunks = [c for _, c in result.chunks]
    tokens = [c.context.num_tokens for c in chunks]
    latents = [c.context.num_latents for c in chunks]
    ratios = [r for c in chunks for r in c.context.segment_ratios]  # the selector's choices
    report = result.precompress

    out.append("== Offline precompression ==")
    out.append(
        f"{report.chunks} chunks: {report.new} compressed now, {report.skipped} already in the "
        f"store, in {report.seconds:.1f} s ({report.tokens_per_s:,.0f} tokens/s)"
    )
    out.append(f"{'document':<22} {'chunk':>5} {'tokens':>7} {'ratio':>9} {'latents':>8}")
    seen: Counter[str] = Counter()
    for doc, chunk in result.chunks:
        seen[doc] += 1
        ctx = chunk.context
        out.append(
            f"{doc:<22} {seen[doc]:>5} {ctx.num_tokens:>7} "
            f"{ratio_text(ctx.segment_ratios):>9} {ctx.num_latents:>8}"
        )
    overall = average_compression_ratio(tokens, latents) or 0.0
    histogram = ", ".join(f"{r:g}x: {n}" for r, n in sorted(Counter(ratios).items()))
    out.append(
        f"average compression ratio {overall:.2f}x ({sum(tokens)} tokens -> {sum(latents)} "
        f"latents); mean chosen ratio {statistics.fmean(ratios):.2f} over {len(ratios)} "
        f"segments: {histogram}"
    )

    first = result.passes[0]
    out.append("")
    out.append("== Answers (compressed contexts, pass 1) ==")
    base = result.baseline.answers if result.baseline else [None] * len(result.questions)
    mixed = result.expansion.answers if result.expansion else [None] * len(result.questions)
    for q, a, b, e in zip(result.questions, first.answers, base, mixed):
        out.append(f"Q: {q.question}")
        out.append(f"   reference: {' / '.join(q.answers)}")
        out.append(f"   compressed: {a.text!r}")
        if e is not None:
            out.append(f"   k={result.expand_top_k} as text: {e.text!r}")
        if b is not None:
            out.append(f"   plain text: {b.text!r}")
        chosen = ", ".join(f"{d} @ {r}x ({s})" for d, r, s in zip(a.docs, a.ratios, a.sources))
        out.append(f"   chunks: {chosen}")

    out.append("")
    out.append("== Passes ==")
    n = max(len(result.questions), 1)
    extra = [p for p in (result.expansion, result.baseline) if p is not None]
    for p in [*result.passes, *extra]:
        sources = p.sources()
        cached = ", ".join(f"{k} {sources[k]}" for k in ("store", "memory", "encoder"))
        positions = sum(a.context_positions for a in p.answers) / n
        generated = sum(a.answer_tokens for a in p.answers) / n
        texts = sum(r == "text" for a in p.answers for r in a.ratios)
        unit = "latents" if sources and not texts else "positions" if sources else "tokens"
        out.append(
            f"{p.name:<22} {p.seconds:6.2f} s ({p.seconds / n:.2f} s/question); per question: "
            f"context {positions:.0f} {unit}, answer {generated:.0f} tokens"
        )
        if sources:
            out.append(f"{'':<22} latents from: {cached}")
        out.append(f"{'':<22} {_accuracy(p.answers, result.questions)}")
    if result.baseline:
        compressed, plain = result.passes[0].seconds, result.baseline.seconds
        out.append(
            f"time: compressed {compressed:.2f} s vs plain text {plain:.2f} s "
            f"(speed-up {plain / max(compressed, 1e-9):.2f}x)"
        )
    out.append("")
    out.append("== All-latent vs selective expansion vs plain text ==")
    out.append(f"{'engine':<22} {'correct':>8} {'context/question':>17} {'s/question':>11}")
    rows = [("all latent (pass 1)", result.passes[0])]
    if result.expansion:
        rows.append((f"k={result.expand_top_k} as text", result.expansion))
    if result.baseline:
        rows.append(("plain text (base)", result.baseline))
    for label, p in rows:
        hits = sum(substring_match(a.text, q.answers) for a, q in zip(p.answers, result.questions))
        positions = sum(a.context_positions for a in p.answers) / n
        out.append(f"{label:<22} {hits:>5}/{n:<2} {positions:>17.0f} {p.seconds / n:>11.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--compressor", help="checkpoint directory (default: the bundled one)")
    parser.add_argument("--store", type=Path, help="latent store directory (default: temporary)")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="*.md + questions.jsonl")
    parser.add_argument("--embedding", help="sentence-transformers model (default: MiniLM)")
    parser.add_argument("--scale", type=float, default=0.0, help="higher compresses more")
    parser.add_argument("--top-k", type=int, default=2, help="chunks retrieved per question")
    parser.add_argument("--chunk-size", type=int, default=160, help="chunk size in tokens")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, help="ask only the first N questions")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-text engine")
    parser.add_argument(
        "--expand-top-k",
        type=int,
        default=1,
        help="chunks per question sent as text in the selective-expansion pass (0: skip it)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    if args.expand_top_k < 0:
        parser.error("--expand-top-k must be >= 0")
    setup_logging(args.quiet, plain_text_corpus=True)

    model = load_compressor(args.compressor, args.device)
    embed = embedding_model(args.embedding)
    with tempfile.TemporaryDirectory() as scratch:
        result = run_demo(
            model,
            corpus=args.corpus,
            store_path=args.store or Path(scratch) / "latents",
            embed_model=embed,
            scale=args.scale,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            chunk_size=args.chunk_size,
            limit=args.limit,
            baseline=not args.no_baseline,
            expand_top_k=args.expand_top_k,
        )
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
