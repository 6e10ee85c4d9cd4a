"""Ask questions about your own documents through LlamaIndex, with soft-compressed contexts.

    python examples/own_documents.py ~/notes --question "What did we decide about X?"
    python examples/own_documents.py ~/notes --store ~/.cache/notes-latents   # then type questions

The directory is read with LlamaIndex's `SimpleDirectoryReader` (text and Markdown out of the box;
install ``llama-index-readers-file`` for PDF, DOCX and more), split into chunks and embedded into a
FAISS index. Every chunk is precompressed into a persistent latent store: the first run compresses
the whole directory, later runs only what changed, because latents are keyed by chunk text. Each
answer streams token by token; the chunks it read are listed with the ratio the selector chose and
where their latents came from.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from _pipeline import build_index, embedding_model, load_compressor, load_nodes, setup_logging
from llama_index.llms.semidyn import SemiDynamicLLM
from llama_index.postprocessor.semidyn import (
    NUM_LATENTS,
    RATIO,
    SOURCE,
    SemiDynamicNodePostprocessor,
)
from llama_index.response_synthesizers.semidyn import as_semidyn_query_engine

from semidyn_rag.precompress import PrecompressConfig
from semidyn_rag.service import LatentService
from semidyn_rag.store import LatentStore

logger = logging.getLogger("own_documents")


def questions_from(args: argparse.Namespace) -> Iterable[str]:
    """The ``--question`` values, or lines typed on stdin (an empty line or EOF ends)."""
    if args.question:
        yield from args.question
        return
    sys.stderr.write("Ask a question (empty line to quit).\n")
    for line in sys.stdin:
        if not line.strip():
            return
        yield line.strip()


NEEDS_READERS = {".pdf", ".docx", ".pptx", ".ppt", ".pptm", ".hwp", ".epub", ".mbox", ".ipynb"}
NEEDS_READERS |= {".csv", ".xls", ".xlsx", ".gif", ".jpg", ".jpeg", ".png", ".webp", ".mp3", ".mp4"}
"""Suffixes SimpleDirectoryReader hands to ``llama-index-readers-file`` (else: read as text)."""


def warn_missing_readers(directory: Path) -> None:
    """One warning (not LlamaIndex's one per file) when files need ``llama-index-readers-file``."""
    try:
        import llama_index.readers.file  # noqa: F401
    except ImportError:
        pass
    else:
        return
    others = sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in NEEDS_READERS
    )
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        logger.warning(
            "llama-index-readers-file is not installed: %d files (%s) are read as plain text; "
            "pip install llama-index-readers-file to parse PDF, DOCX and the like",
            len(others),
            shown,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("directory", type=Path, help="your documents (read recursively)")
    parser.add_argument("--store", type=Path, default=Path("semidyn_store"), help="latent store")
    parser.add_argument("--compressor", help="checkpoint directory (default: the bundled one)")
    parser.add_argument("--embedding", help="sentence-transformers model (default: MiniLM)")
    parser.add_argument("--question", action="append", help="ask this (repeatable)")
    parser.add_argument("--scale", type=float, default=0.0, help="higher compresses more")
    parser.add_argument("--top-k", type=int, default=3, help="chunks retrieved per question")
    parser.add_argument("--chunk-size", type=int, default=256, help="chunk size in tokens")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    # LlamaIndex warns once per file when llama-index-readers-file is missing: said once below
    setup_logging(args.quiet, plain_text_corpus=True)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")
    warn_missing_readers(args.directory)

    model = load_compressor(args.compressor, args.device)
    nodes = load_nodes(args.directory, chunk_size=args.chunk_size)
    index = build_index(nodes, embedding_model(args.embedding))
    with LatentStore(args.store, model.fingerprint) as store:
        service = LatentService(model, store, scale=args.scale)
        compressor = SemiDynamicNodePostprocessor(service)
        # small passes on CPU: the progress bar moves every few seconds, at the same throughput
        batch_tokens = 2048 if args.device == "cpu" else 8192
        config = PrecompressConfig(progress=not args.quiet, batch_tokens=batch_tokens)
        report = compressor.precompress(nodes, config)
        logger.info(
            "%d chunks: %d compressed now, %d from the store",
            report.chunks,
            report.new,
            report.skipped,
        )

        llm = SemiDynamicLLM(service, max_new_tokens=args.max_new_tokens)
        engine = as_semidyn_query_engine(
            index, service, llm=llm, similarity_top_k=args.top_k, streaming=True
        )
        for question in questions_from(args):
            sys.stdout.write(f"\nQ: {question}\nA: ")
            response = engine.query(question)
            for piece in response.response_gen:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            for node in response.source_nodes:
                meta = node.node.metadata
                sys.stdout.write(
                    f"   - {meta.get('file_name', node.node.node_id)} (score {node.score:.2f}): "
                    f"{meta[RATIO]:g}x, {meta[NUM_LATENTS]} latents, from {meta[SOURCE]}\n"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
