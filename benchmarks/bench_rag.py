"""End to end: a RAG query through the LlamaIndex and LangChain engines, compressed vs plain text.

The shipped corpus (``examples/corpus/``) is chunked and embedded (all-MiniLM-L6-v2) into FAISS
(a LlamaIndex `VectorStoreIndex` and a LangChain `FAISS` store over the same chunks) and, for the
warm variants, precompressed offline into one `LatentStore` that both frameworks read. Each round
asks every question of the corpus through every variant, interleaved, and times whole queries:
retrieval, postprocessing, store reads or encoder passes, prompt building and decoding.

- ``plain``: the same retrieval and prompt; the base decoder (adapter off) reads the chunk text;
- ``warm``: latents read from the store (no in-process cache: every query reads the store);
- ``cold``: no store, empty cache: the encoder compresses the retrieved chunks at query time.

Every variant decodes exactly ``--new-tokens`` tokens (``min_new_tokens``), so the times compare
the same amount of decoding and differ only in what the decoder reads and how it got there.

    python benchmarks/bench_rag.py                  # CPU, a few minutes
    python benchmarks/bench_rag.py --top-k 8 --reps 5
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from _common import Report, load_model, parser, setup
from _timing import interleave
from langchain_community.vectorstores import FAISS
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import RunnablePassthrough
from langchain_huggingface import HuggingFaceEmbeddings
from langchain_semidyn import SemiDynamicDocumentCompressor, create_semidyn_rag_chain, format_docs
from langchain_semidyn import SemiDynamicLLM as ChainLLM
from langchain_semidyn import qa_prompt as chain_prompt
from llama_index.core.schema import BaseNode
from llama_index.llms.semidyn import SemiDynamicLLM
from llama_index.postprocessor.semidyn import SOURCE
from llama_index.response_synthesizers.semidyn import (
    SemiDynamicSynthesizer,
    as_semidyn_query_engine,
    qa_prompt,
)

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.embeddings import default_model_path
from semidyn_rag.service import LatentService
from semidyn_rag.store import LatentStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _pipeline import CORPUS_DIR, build_index, embedding_model, load_nodes
from rag_demo import read_questions

Ask = Callable[[str], object]
VARIANTS = ("plain", "warm", "cold")


def llama_index_engines(
    model: SemiDynamicCompressor,
    index,
    store: LatentStore,
    top_k: int,
    new_tokens: int,
    scale: float,
) -> dict[str, Ask]:
    gen = {"min_new_tokens": new_tokens}

    def compressed(service: LatentService) -> Ask:
        llm = SemiDynamicLLM(service, max_new_tokens=new_tokens, generate_kwargs=gen)
        engine = as_semidyn_query_engine(index, service, llm=llm, similarity_top_k=top_k)
        return engine.query

    warm_service = LatentService(model, store, scale=scale, memory_entries=0)
    base = SemiDynamicLLM(
        LatentService(model), max_new_tokens=new_tokens, generate_kwargs=gen, adapter=False
    )
    plain = index.as_query_engine(
        llm=base,
        similarity_top_k=top_k,
        response_synthesizer=SemiDynamicSynthesizer(
            llm=base, text_qa_template=qa_prompt(warm_service)
        ),
    )
    warm = compressed(warm_service)

    def checked_warm(question: str) -> object:
        response = warm(question)
        sources = {n.node.metadata[SOURCE] for n in response.source_nodes}
        assert sources == {"store"}, f"warm query ran the encoder: {sources}"
        return response

    return {
        "plain": plain.query,
        "warm": checked_warm,
        "cold": lambda q: compressed(LatentService(model, scale=scale))(
            q
        ),  # new service: nothing cached
    }


def langchain_chains(
    model: SemiDynamicCompressor,
    nodes: Sequence[BaseNode],
    store: LatentStore,
    top_k: int,
    new_tokens: int,
    scale: float,
) -> dict[str, Ask]:
    documents = [Document(page_content=n.get_content(), metadata=n.metadata) for n in nodes]
    embeddings = HuggingFaceEmbeddings(
        model_name=default_model_path(),
        model_kwargs={"device": "cpu"},
        encode_kwargs={"normalize_embeddings": True},
    )
    retriever = FAISS.from_documents(documents, embeddings).as_retriever(search_kwargs={"k": top_k})

    def compressed(service: LatentService) -> Ask:
        llm = ChainLLM(service=service, max_new_tokens=new_tokens)
        compressor = SemiDynamicDocumentCompressor(service=service)
        chain = create_semidyn_rag_chain(retriever, compressor, llm.bind(min_new_tokens=new_tokens))
        return chain.invoke

    warm_service = LatentService(model, store, scale=scale, memory_entries=0)
    base = ChainLLM(service=LatentService(model), max_new_tokens=new_tokens, adapter=False)
    plain = (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | chain_prompt(warm_service)
        | base.bind(min_new_tokens=new_tokens)
        | StrOutputParser()
    )
    warm = compressed(warm_service)

    def checked_warm(question: str) -> object:
        out = warm(question)
        sources = {d.metadata["semidyn_source"] for d in out["documents"]}
        assert sources == {"store"}, f"warm chain ran the encoder: {sources}"
        return out

    return {
        "plain": plain.invoke,
        "warm": checked_warm,
        "cold": lambda q: compressed(LatentService(model, scale=scale))(q),
    }


def context_sizes(
    service: LatentService, index, questions: Sequence[str], top_k: int
) -> tuple[float, float]:
    """Mean chunk tokens and mean latent positions the decoder reads per question."""
    retriever = index.as_retriever(similarity_top_k=top_k)
    model = service.compressor
    tokens, latents = [], []
    for question in questions:
        texts = [n.node.get_content() for n in retriever.retrieve(question)]
        tokens.append(sum(map(len, model.tokenize(texts))))
        latents.append(sum(c.context.num_latents for c in service.compress(texts)))
    return statistics.fmean(tokens), statistics.fmean(latents)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--top-k", type=int, default=4, help="chunks retrieved per question")
    p.add_argument("--chunk-size", type=int, default=160, help="chunk size (tokens)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per answer")
    p.add_argument("--questions", type=int, default=None, help="ask only the first N")
    p.add_argument("--scale", type=float, default=0.0, help="DRS scale (higher compresses more)")
    args = p.parse_args()
    dtype = setup(args)
    model, description, _ = load_model(args, dtype)
    questions = [q.question for q in read_questions(CORPUS_DIR / "questions.jsonl")]
    questions = questions[: args.questions]
    nodes = load_nodes(CORPUS_DIR, chunk_size=args.chunk_size, extensions=[".md"])
    index = build_index(nodes, embedding_model())

    with tempfile.TemporaryDirectory() as tmp, LatentStore(Path(tmp), model.fingerprint) as store:
        offline = LatentService(model, store, scale=args.scale)
        offline.compress([n.get_content() for n in nodes])  # the offline precompression step
        tokens, latents = context_sizes(offline, index, questions, args.top_k)
        frameworks = {
            "LlamaIndex query engine": llama_index_engines(
                model, index, store, args.top_k, args.new_tokens, args.scale
            ),
            "LangChain LCEL chain": langchain_chains(
                model, nodes, store, args.top_k, args.new_tokens, args.scale
            ),
        }
        variants = {
            f"{fw}/{v}": (lambda ask=asks[v]: [ask(q) for q in questions])
            for fw, asks in frameworks.items()
            for v in VARIANTS
        }
        samples = interleave(variants, reps=args.reps, device=args.device)

    report = Report(
        "bench_rag", "End-to-end RAG query: compressed vs plain text", args, description
    )
    n = len(questions)
    rows = []
    for fw in frameworks:
        plain = f"{fw}/plain"
        for v in VARIANTS:
            name = f"{fw}/{v}"
            rows.append(
                [
                    fw,
                    v,
                    f"{samples.median(name) / n * 1000:.0f}",
                    f"{samples.spread(name):.0%}",
                    "1.00" if v == "plain" else f"{samples.ratio(plain, name):.2f}",
                    "1.00" if v == "plain" else f"{samples.ratio(plain, name, 'cpu'):.2f}",
                ]
            )
    report.table(
        "Per query, whole pipeline",
        ["framework", "variant", "ms / query", "spread", "speed-up (wall)", "speed-up (CPU)"],
        rows,
        note=(
            f"{n} questions, top-{args.top_k} chunks of <= {args.chunk_size} tokens, "
            f"{args.new_tokens} decoded tokens each. The decoder reads {tokens:.0f} chunk tokens "
            f"(plain) or {latents:.0f} latent positions (compressed, {tokens / latents:.2f}x) per "
            "question. Speed-ups are paired per round against the same framework's plain "
            "variant (> 1: faster than plain)."
        ),
    )
    print(report.write())


if __name__ == "__main__":
    main()
