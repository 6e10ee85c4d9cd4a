"""Offline corpus precompression: documents → chunks → latents in a `LatentStore` (+ FAISS index).

Compressing a corpus once and serving its chunks' latents to every later query is what makes soft
compression pay off in RAG, so this job is built to run for hours and be interrupted:

* **Resumable.** Every ``put_many`` is one SQLite transaction; a rerun asks the store which keys
  are missing (``store.missing``) and compresses only those, so a killed job loses at most the batch
  it was writing.
* **Each text once.** Chunks with the same text share a key (text + compressor + ratio policy) and
  are compressed once, however often they occur in the corpus.
* **Tokenized once, batched by length.** Chunks are tokenized a single time; the token lists decide
  the batches (longest first, at most ``batch_tokens`` padded positions per encoder pass) and go
  straight to ``compress_tokens``.
* **One writer.** The run holds ``store.writer()``: two jobs never compress the same corpus at once.

`semidyn_rag.distributed` runs the same plan on a Ray cluster when one machine is not enough.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from filelock import Timeout
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from .store import (
    DTYPES,
    Embedder,
    LatentStore,
    Metric,
    StoreMismatchError,
    policy_key,
    text_hash,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .modeling import SemiDynamicCompressor
    from .types import CompressedContext

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "content", "context")
TEXT_SUFFIXES = (".txt", ".md")


# --- documents and chunks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """One source text before chunking."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """One unit of retrieval and compression.

    ``id`` is ``"{doc_id}#{index}"``: stable across reruns as long as the document and the chunking
    settings are, which is what a vector index and a docstore need. The latents are keyed by the
    text, not the id (see `semidyn_rag.store.entry_key`).
    """

    id: str
    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TextSplitter(Protocol):
    """What LangChain's ``TextSplitter`` and LlamaIndex's ``SentenceSplitter``/``TokenTextSplitter``
    have in common; anything with this method can chunk the corpus."""

    def split_text(self, text: str) -> list[str]: ...


Splitter = Any
"""Duck-typed: a `TextSplitter` (``split_text``), a LlamaIndex ``NodeParser`` (``get_nodes_from_documents``), or a plain
function ``str -> list[str]``."""


def _doc_id(row: Mapping[str, Any], text: str, id_field: str) -> str:
    """The row's own id if it has one, else a hash of its text (stable across file reorderings)."""
    value = row.get(id_field)
    return str(value) if value not in (None, "") else text_hash(text)[:16]


def _row_document(
    row: Mapping[str, Any], where: str, text_fields: Sequence[str], id_field: str
) -> Document | None:
    text = next((row[k] for k in text_fields if isinstance(row.get(k), str)), None)
    if text is None:
        raise ValueError(f"{where} has none of the text fields {list(text_fields)}")
    if not text.strip():
        return None
    metadata = dict(row["metadata"]) if isinstance(row.get("metadata"), Mapping) else {}
    skip = {*text_fields, id_field, "metadata"}
    metadata.update({k: v for k, v in row.items() if k not in skip and v is not None})
    return Document(_doc_id(row, text, id_field), text, metadata)


def read_corpus(
    path: str | Path,
    *,
    text_fields: Sequence[str] = TEXT_FIELDS,
    id_field: str = "id",
    suffixes: Sequence[str] = TEXT_SUFFIXES,
) -> Iterator[Document]:
    """Documents from a directory of text files (recursive), one text file, JSON lines or parquet.

    * directory: every file ending in ``suffixes`` (hidden paths skipped), id = relative path;
    * ``.txt``/``.md``: the whole file is one document, id = file name;
    * ``.jsonl``/``.parquet``: one document per row; the text is the first of ``text_fields``
      present, the id is ``id_field`` (else a hash of the text), and metadata is the row's
      ``metadata`` object plus its other fields.

    Rows are streamed, so a parquet file larger than memory can be read.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        for file in files:
            text = file.read_text(encoding="utf-8")
            if text.strip():
                rel = file.relative_to(path).as_posix()
                yield Document(rel, text, {"source": rel})
    elif path.suffix.lower() in suffixes:
        text = path.read_text(encoding="utf-8")
        if text.strip():
            yield Document(path.name, text, {"source": path.name})
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{number} is not a JSON object")
                    doc = _row_document(row, f"{path}:{number}", text_fields, id_field)
                    if doc is not None:
                        yield doc
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                doc = _row_document(row, f"{path} row {number}", text_fields, id_field)
                if doc is not None:
                    yield doc
    elif not path.exists():
        raise FileNotFoundError(f"no corpus at {path}")
    else:
        raise ValueError(
            f"{path}: a corpus is a directory, {'/'.join(suffixes)}, .jsonl or .parquet"
        )


def token_chunks(
    text: str, tokenizer: PreTrainedTokenizerBase, chunk_tokens: int, overlap_tokens: int = 0
) -> list[str]:
    """Windows of ``chunk_tokens`` tokens that overlap by ``overlap_tokens``, as text.

    With a fast tokenizer a window is the slice of the original text its tokens cover (so the
    chunk is verbatim source text, whitespace and all); otherwise the window's tokens are decoded.
    Chunks are stripped, so a re-tokenized chunk may differ by a token at its edges from the window.
    """
    if overlap_tokens >= chunk_tokens:
        raise ValueError(f"overlap {overlap_tokens} must be below the chunk size {chunk_tokens}")
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = enc["input_ids"]
    if len(ids) <= chunk_tokens:
        return [text.strip()] if text.strip() else []
    step = chunk_tokens - overlap_tokens
    pieces = []
    for start in range(0, len(ids), step):
        end = min(start + chunk_tokens, len(ids))
        if fast:
            spans = enc["offset_mapping"]
            piece = text[spans[start][0] : spans[end - 1][1]]
        else:
            piece = tokenizer.decode(ids[start:end])
        if piece.strip():
            pieces.append(piece.strip())
        if end == len(ids):
            break
    return pieces


def split_with(splitter: Splitter, documents: Sequence[Document]) -> list[list[str]]:
    """Each document's chunk texts from a user's splitter, duck-typed (no framework import here).

    ``split_text`` (LangChain ``TextSplitter``, LlamaIndex text splitters) is preferred; a LlamaIndex
    ``NodeParser`` without it gets LlamaIndex ``Document``s; any other callable is called per text.
    """
    if hasattr(splitter, "split_text"):
        return [list(splitter.split_text(doc.text)) for doc in documents]
    if hasattr(splitter, "get_nodes_from_documents"):
        from llama_index.core import Document as LIDocument

        out: list[list[str]] = []
        for doc in documents:  # one call per document keeps the node -> document mapping exact
            nodes = splitter.get_nodes_from_documents([LIDocument(text=doc.text, id_=doc.id)])
            out.append([node.get_content() for node in nodes])
        return out
    if callable(splitter):
        return [list(splitter(doc.text)) for doc in documents]
    raise TypeError(
        f"{type(splitter).__name__} is not a splitter: give an object with split_text(str), "
        "a LlamaIndex NodeParser, or a function str -> list[str]"
    )


def chunk_documents(
    documents: Iterable[Document],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chunk_tokens: int = 256,
    overlap_tokens: int = 32,
    splitter: Splitter | None = None,
) -> list[Chunk]:
    """Chunks of every document: the user's ``splitter`` if given, else token windows measured
    with ``tokenizer`` (the compressor's, so ``chunk_tokens`` is what the encoder will see)."""
    documents = list(documents)
    if splitter is not None:
        texts = split_with(splitter, documents)
    elif tokenizer is not None:
        texts = [token_chunks(d.text, tokenizer, chunk_tokens, overlap_tokens) for d in documents]
    else:
        raise ValueError("chunking needs the compressor's tokenizer or a splitter")
    chunks = []
    for doc, pieces in zip(documents, texts, strict=True):
        pieces = [p.strip() for p in pieces if p and p.strip()]
        for index, piece in enumerate(pieces):
            meta = {**doc.metadata, "doc_id": doc.id, "chunk_index": index}
            chunks.append(Chunk(f"{doc.id}#{index}", doc.id, piece, meta))
    return chunks


def save_chunks(chunks: Sequence[Chunk], keys: Sequence[str], path: str | Path) -> Path:
    """Write chunks with their latent keys as JSON lines (a docstore for the vector index's ids).

    Written to a temporary file and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for chunk, key in zip(chunks, keys, strict=True):
                row = {"id": chunk.id, "doc_id": chunk.doc_id, "key": key, "text": chunk.text}
                handle.write(json.dumps({**row, "metadata": chunk.metadata}, default=str) + "\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


# --- configuration and report -----------------------------------------------------------------


class PrecompressConfig(BaseModel):
    """How a corpus is chunked, batched and written (every field is a ``semidyn precompress`` flag)."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(0.0, description="DRS scale: higher compresses more")
    ratio: float | None = Field(None, description="fixed ratio instead of the selector")
    chunk_tokens: int = Field(256, ge=1, description="chunk size in compressor tokens")
    chunk_overlap: int = Field(32, ge=0, description="tokens shared by consecutive chunks")
    batch_tokens: int = Field(
        8192, ge=1, description="padded token positions per encoder pass (rows x longest row)"
    )
    max_batch_rows: int = Field(64, ge=1, description="at most this many segments per pass")
    write_batch: int = Field(256, ge=1, description="entries per store transaction")
    index_metric: Metric = Field("cosine", description="metric of a new vector index")
    embed_batch: int = Field(256, ge=1, description="texts per embed call")
    progress: bool = Field(True, description="show a tqdm progress bar")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> PrecompressConfig:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be below chunk_tokens")
        return self

    @property
    def policy(self) -> str:
        """The store policy key, as `LatentService` computes it for the same scale/ratio."""
        return policy_key(None if self.ratio is not None else self.scale, self.ratio)


class PrecompressReport(BaseModel):
    """What one run did. ``chunks = unique + duplicates`` and ``unique = new + skipped``."""

    store: str
    chunks: int
    unique: int
    duplicates: int
    skipped: int
    new: int
    tokens: int
    latents: int
    embedded: int = 0
    seconds: float
    backend: str = "local"

    @property
    def chunks_per_s(self) -> float:
        return self.new / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The report with its rates, for JSON output."""
        rates = {"chunks_per_s": round(self.chunks_per_s, 2), "tokens_per_s": self.tokens_per_s}
        return {**self.model_dump(), **rates}

    def markdown(self) -> str:
        rows = [
            ("store", self.store),
            ("backend", self.backend),
            ("chunks", f"{self.chunks:,}"),
            ("unique texts", f"{self.unique:,}"),
            ("duplicates (compressed once)", f"{self.duplicates:,}"),
            ("skipped (already stored)", f"{self.skipped:,}"),
            ("compressed now", f"{self.new:,}"),
            ("tokens compressed", f"{self.tokens:,}"),
            ("latents written", f"{self.latents:,}"),
            ("chunks embedded", f"{self.embedded:,}"),
            ("seconds", f"{self.seconds:.1f}"),
            ("chunks/s", f"{self.chunks_per_s:.1f}"),
            ("tokens/s", f"{self.tokens_per_s:,.0f}"),
        ]
        return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# --- planning ---------------------------------------------------------------------------------


@dataclass
class WorkPlan:
    """Keys of all chunks and, of their distinct texts, the ones the store still lacks."""

    policy: str
    keys: list[str]
    """One per chunk, in corpus order."""
    todo: dict[str, str]
    """Missing key -> text, first occurrence order."""
    unique: int

    @property
    def duplicates(self) -> int:
        return len(self.keys) - self.unique

    @property
    def skipped(self) -> int:
        return self.unique - len(self.todo)

    def report(
        self,
        store: LatentStore,
        *,
        tokens: int,
        latents: int,
        embedded: int,
        start: float,
        backend: str = "local",
    ) -> PrecompressReport:
        """The run's report once this plan is carried out (``start``: its perf_counter time)."""
        return PrecompressReport(
            store=str(store.path),
            chunks=len(self.keys),
            unique=self.unique,
            duplicates=self.duplicates,
            skipped=self.skipped,
            new=len(self.todo),
            tokens=tokens,
            latents=latents,
            embedded=embedded,
            seconds=time.perf_counter() - start,
            backend=backend,
        )


def plan_work(chunks: Sequence[Chunk], store: LatentStore, policy: str) -> WorkPlan:
    """Deduplicate by key and ask the store which keys it lacks (call inside ``store.writer()``,
    so the answer cannot go stale under another job)."""
    keys = [store.key_for(c.text, policy) for c in chunks]
    texts = dict(zip(keys, (c.text for c in chunks)))  # later duplicates map to the same text
    missing = store.missing(texts)
    return WorkPlan(policy, keys, {k: texts[k] for k in missing}, len(texts))


def plan_batches(
    lengths: Sequence[int], *, batch_tokens: int, max_rows: int, segment_tokens: int
) -> list[list[int]]:
    """Indices grouped into encoder passes: longest first, each pass within the token budget.

    A text longer than ``segment_tokens`` is encoded as several segments; the budget counts the
    padded positions of one pass (segments x longest segment), so a pass of long texts has few
    rows and one of short texts many. Longest first: a budget too large for memory fails at once.
    A single text always gets a pass, even if it alone exceeds the budget.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    rows = width = 0
    for i in order:
        segs = segment_count(lengths[i], segment_tokens)
        w = min(max(lengths[i], 1), segment_tokens) + 1  # + the appended <eos>
        if current and ((rows + segs) * max(width, w) > batch_tokens or rows + segs > max_rows):
            batches.append(current)
            current, rows, width = [], 0, 0
        current.append(i)
        rows, width = rows + segs, max(width, w)
    if current:
        batches.append(current)
    return batches


def segment_count(num_tokens: int, segment_tokens: int) -> int:
    """How many encoder segments a text of ``num_tokens`` tokens becomes (see ``compress_tokens``)."""
    return max(1, math.ceil(num_tokens / segment_tokens))


def check_fingerprint(store: LatentStore, compressor: SemiDynamicCompressor) -> None:
    """Refuse to write one compressor's latents into another compressor's store."""
    if store.fingerprint != compressor.fingerprint:
        raise StoreMismatchError(
            f"{store.path} belongs to compressor {store.fingerprint}, not {compressor.fingerprint}"
        )


def open_store(
    store: LatentStore | str | Path, compressor: SemiDynamicCompressor, dtype: str = "float16"
) -> tuple[LatentStore, bool]:
    """The store to write (opened for ``compressor`` when given as a path) and whether we own it."""
    if isinstance(store, LatentStore):
        check_fingerprint(store, compressor)
        return store, False
    if dtype not in DTYPES:
        raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return LatentStore(store, compressor.fingerprint, dtype=DTYPES[dtype]), True


@contextmanager
def exclusive_writer(store: LatentStore) -> Iterator[LatentStore]:
    """``store.writer()``, saying so when another job holds it (else a wait looks like a hang)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(store.writer(timeout=0))
        except Timeout:
            logger.warning("another precompression job is writing %s; waiting for it", store.path)
            stack.enter_context(store.writer())
        yield store


class Throughput:
    """A tqdm bar over chunks that also shows tokens/s (tqdm's own rate is chunks/s)."""

    def __init__(self, total: int, enabled: bool, desc: str = "precompress") -> None:
        self.bar = tqdm(total=total, unit="chunk", desc=desc, disable=not enabled, smoothing=0.1)
        self.start = time.perf_counter()
        self.tokens = 0

    def update(self, chunks: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(chunks)

    def close(self) -> None:
        self.bar.close()


# --- the local job ------------------------------------------------------------------------------


def precompress(
    compressor: SemiDynamicCompressor,
    chunks: Sequence[Chunk],
    store: LatentStore | str | Path,
    config: PrecompressConfig | None = None,
    *,
    embed: Embedder | None = None,
    store_dtype: str = "float16",
) -> PrecompressReport:
    """Compress every chunk the store lacks into it; optionally embed chunks into its vector index.

    ``store`` is an open `LatentStore` of this compressor or a directory (created with
    ``store_dtype``). ``embed`` (any ``list[str] -> vectors`` function, e.g. LangChain's
    ``embed_documents``) fills ``store.vector_index()`` with the chunk ids in the same run; chunks
    already in the index are not embedded again. Safe to kill at any point and rerun.
    """
    config = config or PrecompressConfig()
    if compressor.training:
        logger.warning("the compressor is in training mode; call .eval() for stable latents")
    start = time.perf_counter()
    store, owned = open_store(store, compressor, store_dtype)
    try:
        with exclusive_writer(store):
            plan = plan_work(chunks, store, config.policy)
            logger.info(
                "%d chunks, %d distinct texts, %d already stored, %d to compress",
                len(chunks), plan.unique, plan.skipped, len(plan.todo),
            )  # fmt: skip
            tokens, latents = _compress_into(compressor, store, plan, config)
            embedded = embed_chunks(store, chunks, embed, config) if embed is not None else 0
        report = plan.report(store, tokens=tokens, latents=latents, embedded=embedded, start=start)
    finally:
        if owned:
            store.close()
    logger.info(
        "precompressed %d new chunks (%d tokens -> %d latents) in %.1f s: %.0f tokens/s",
        report.new, report.tokens, report.latents, report.seconds, report.tokens_per_s,
    )  # fmt: skip
    return report


def _compress_into(
    compressor: SemiDynamicCompressor,
    store: LatentStore,
    plan: WorkPlan,
    config: PrecompressConfig,
) -> tuple[int, int]:
    """Compress ``plan.todo`` in length-planned passes; commit every ``write_batch`` entries."""
    keys = list(plan.todo)
    if not keys:
        return 0, 0
    token_lists = compressor.tokenize([plan.todo[k] for k in keys])
    batches = plan_batches(
        [len(t) for t in token_lists],
        batch_tokens=config.batch_tokens,
        max_rows=config.max_batch_rows,
        segment_tokens=compressor.config.max_segment_tokens,
    )
    pending: list[tuple[str, CompressedContext]] = []
    tokens = latents = 0
    progress = Throughput(len(keys), config.progress)

    def flush() -> None:
        hashes = {k: text_hash(plan.todo[k]) for k, _ in pending}
        store.put_many(pending, text_hashes=hashes, policy=plan.policy)
        pending.clear()

    try:
        for batch in batches:
            ids = [token_lists[i] for i in batch]
            size = compressor.config.max_segment_tokens
            segments = sum(segment_count(len(t), size) for t in ids)
            contexts = compressor.compress_tokens(
                ids, config.scale, config.ratio, batch_size=segments
            )
            pending.extend(zip((keys[i] for i in batch), contexts))
            count = sum(len(t) for t in ids)
            tokens += count
            latents += sum(c.num_latents for c in contexts)
            if len(pending) >= config.write_batch:
                flush()
            progress.update(len(batch), count)
        if pending:
            flush()
    finally:
        progress.close()
    return tokens, latents


def embed_chunks(
    store: LatentStore,
    chunks: Sequence[Chunk],
    embed: Embedder,
    config: PrecompressConfig,
    save_every_s: float = 300.0,
) -> int:
    """Add the chunks missing from the store's vector index (by chunk id); save it atomically.

    The index is saved every ``save_every_s`` seconds and at the end, so a killed run keeps most of
    its embeddings and a rerun embeds only what the saved index lacks. Returns how many were added.
    """
    index = store.vector_index() if store.index_path.exists() else None
    todo = list({c.id: c for c in chunks if index is None or c.id not in index}.values())
    if not todo:
        return 0
    last_save = time.perf_counter()
    bar = tqdm(total=len(todo), unit="chunk", desc="embed", disable=not config.progress)
    try:
        for start in range(0, len(todo), config.embed_batch):
            batch = todo[start : start + config.embed_batch]
            vectors = embed([c.text for c in batch])
            if index is None:
                import numpy as np

                dim = int(np.asarray(vectors[0]).shape[-1])
                index = store.vector_index(dim=dim, metric=config.index_metric)
            index.add([c.id for c in batch], vectors)
            bar.update(len(batch))
            if time.perf_counter() - last_save > save_every_s:
                index.save()
                last_save = time.perf_counter()
    finally:
        bar.close()
        if index is not None:
            index.save()
    return len(todo)


def precompress_corpus(
    compressor: SemiDynamicCompressor,
    paths: Sequence[str | Path],
    store: LatentStore | str | Path,
    config: PrecompressConfig | None = None,
    *,
    splitter: Splitter | None = None,
    embed: Embedder | None = None,
) -> tuple[list[Chunk], PrecompressReport]:
    """Read, chunk and precompress corpus files in one call; returns the chunks and the report."""
    config = config or PrecompressConfig()
    chunks = load_chunks(paths, config, compressor.tokenizer, splitter)
    return chunks, precompress(compressor, chunks, store, config, embed=embed)


def load_chunks(
    paths: Sequence[str | Path],
    config: PrecompressConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    splitter: Splitter | None = None,
) -> list[Chunk]:
    """Every corpus path read and chunked; chunk ids must be unique across the corpus."""
    documents = [doc for path in paths for doc in read_corpus(path)]
    chunks = chunk_documents(
        documents,
        tokenizer=tokenizer,
        chunk_tokens=config.chunk_tokens,
        overlap_tokens=config.chunk_overlap,
        splitter=splitter,
    )
    seen: dict[str, str] = {}
    for chunk in chunks:
        if seen.setdefault(chunk.id, chunk.text) != chunk.text:
            raise ValueError(f"chunk id {chunk.id} names two different texts: document ids repeat")
    logger.info("%d documents -> %d chunks", len(documents), len(chunks))
    return chunks
