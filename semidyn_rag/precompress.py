"""Offline corpus precompression: documents → chunks → latents in a `LatentStore`.

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

One job, :func:`precompress` (read and chunk first with :func:`precompress_corpus`), with the
encoder work behind an `Executor`: `LocalExecutor` in this process, or
`semidyn_rag.distributed.RayExecutor` on a Ray cluster when one machine is not enough. Planning,
the store, the sync by document and the report are the job's, whichever executor runs.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from filelock import Timeout
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from .backbones import min_latents, segment_count
from .policy import CompressionPolicy
from .readers import ReadError, json_lines, parquet_rows, parse_json_line, read_text
from .store import (
    DTYPE_SIZES,
    LatentStore,
    ManifestRow,
    SyncPlan,
    atomic_write,
    text_hash,
    torch_dtypes,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .modeling import SemiDynamicCompressor
    from .types import CompressedContext

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("text", "content", "context")
TEXT_SUFFIXES = (".txt", ".md")
MAX_SHOWN_ERRORS = 20  # input errors listed one by one in a report; the rest are counted
CPU_BATCH_TOKENS = 1024
"""``batch_tokens`` of a compressor on CPU when the config does not set it: larger CPU passes are
slower per token (SmolLM2-135M, 2 threads: 26 tokens/s at 8192, 66 at 2048, 106 at 1024, 113 at
512), and small ones move the progress bar every few seconds."""
FIRST_PASS_SHARE = 4
"""The first encoder pass gets ``1 / FIRST_PASS_SHARE`` of the budget, so the progress bar and its
rates move within seconds of the start, also on a large budget."""


class CorpusError(ValueError):
    """The corpus as a whole cannot be used (no readable document, an unknown format)."""


class CorpusRowError(ReadError):
    """One row, file or chunk of the corpus is unusable; the message names it and the problem.

    ``read_corpus`` raises it, or collects it and skips the row when given a ``skipped`` list
    (what ``semidyn precompress`` does: per-row errors are counted and reported, not fatal).
    """


class ChunkTooLongError(CorpusRowError):
    """A chunk gives more latents than the decoder has positions: it could never be read."""


@dataclass(frozen=True)
class RowError:
    """One skipped input: where it is (``file:line``, ``file row N``, a chunk id) and why."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def check_text(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, e.g. from a JSON ``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CorpusRowError(
            where,
            f"the text has a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start}, which is not valid Unicode (often half of an emoji escaped in JSON); "
            "fix the source text",
        ) from None


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
    settings are, which is what a vector store and a docstore need. The latents are keyed by the
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
        raise CorpusRowError(where, f"none of the text fields {list(text_fields)}")
    if not text.strip():  # a document without text: known only when the row names its id
        has_id = row.get(id_field) not in (None, "")
        return Document(str(row[id_field]), "", {}) if has_id else None
    check_text(text, where)
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
    skipped: list[RowError] | None = None,
    empty: list[str] | None = None,
    root: str | Path | None = None,
) -> Iterator[Document]:
    """Documents from a directory of text files (recursive), one text file, JSON lines or parquet.

    * directory: every file ending in ``suffixes`` (hidden paths skipped), id = its path relative
      to ``root`` (default: the directory);
    * ``.txt``/``.md``: the whole file is one document, id = its path relative to ``root``
      (default: the file's directory, so the id is the file name);
    * ``.jsonl``/``.parquet``: one document per row; the text is the first of ``text_fields``
      present, the id is ``id_field`` (else a hash of the text), and metadata is the row's
      ``metadata`` object plus its other fields.

    Rows are streamed, so a parquet file larger than memory can be read. A row or file that cannot
    be used (invalid JSON, not an object, no text field, text that is not valid Unicode or UTF-8)
    raises :class:`CorpusRowError` naming it; with a ``skipped`` list it is appended there and
    skipped instead (logged once, by whoever reports the run: :func:`prepare_work`). A document
    without text (an emptied file, a row with an id and blank text) is not yielded; with an
    ``empty`` list its id is appended there, so that a sync can remove its old chunks.

    **Document ids of files.** Pass the same ``root`` whenever a file may be read both through
    its directory and alone: ``read_corpus("docs/sub/a.txt", root="docs")`` gives the id
    ``sub/a.txt``, as ``read_corpus("docs")`` does. A file outside ``root`` is a
    :class:`CorpusError`. Raises ``FileNotFoundError`` for a missing path and
    :class:`CorpusError` for an unknown format or a parquet file that is not readable. Files are
    read through `semidyn_rag.readers`.
    """
    path = Path(path)
    base = Path(root).resolve() if root is not None else None

    def file_id(file: Path, default: Path) -> str:
        if base is None:
            return file.relative_to(default).as_posix()
        try:
            return file.resolve().relative_to(base).as_posix()
        except ValueError:
            raise CorpusError(f"{file} is not under the corpus root {root}") from None

    def attempt(make: Callable[[], Document | None]) -> Document | None:
        try:
            doc = make()
        except ReadError as exc:
            if skipped is None:
                raise CorpusRowError(exc.where, exc.problem) from None
            skipped.append(RowError(exc.where, exc.problem))
            logger.debug("skipped %s", exc)
            return None
        if doc is not None and not doc.text.strip():
            if empty is not None:
                empty.append(doc.id)
            return None
        return doc

    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        for file in files:
            rel = file_id(file, path)
            doc = attempt(lambda file=file, rel=rel: _file_document(file, rel))
            if doc is not None:
                yield doc
    elif path.suffix.lower() in suffixes and path.is_file():
        name = file_id(path, path.parent)
        doc = attempt(lambda: _file_document(path, name))
        if doc is not None:
            yield doc
    elif path.suffix == ".jsonl" and path.is_file():
        for number, line in json_lines(path):
            where = f"{path}:{number}"
            doc = attempt(
                lambda line=line, where=where: _json_document(line, where, text_fields, id_field)
            )
            if doc is not None:
                yield doc
    elif path.suffix == ".parquet" and path.is_file():
        try:
            for where, row in parquet_rows(path, purpose=f"reading {path}"):
                doc = attempt(
                    lambda row=row, where=where: _row_document(row, where, text_fields, id_field)
                )
                if doc is not None:
                    yield doc
        except ReadError as exc:  # the file itself, not one row
            if isinstance(exc, CorpusRowError):
                raise
            raise CorpusError(str(exc)) from None
    elif not path.exists():
        raise FileNotFoundError(f"no corpus at {path}")
    else:
        raise CorpusError(
            f"{path}: a corpus is a directory, {'/'.join(suffixes)}, .jsonl or .parquet"
        )


def _file_document(file: Path, doc_id: str) -> Document | None:
    text = read_text(file)
    if not text.strip():
        return Document(doc_id, "", {"source": doc_id})
    check_text(text, str(file))
    return Document(doc_id, text, {"source": doc_id})


def _json_document(
    line: str, where: str, text_fields: Sequence[str], id_field: str
) -> Document | None:
    row = parse_json_line(line, where)
    if not isinstance(row, dict):
        raise CorpusRowError(where, "not a JSON object")
    return _row_document(row, where, text_fields, id_field)


def token_spans(
    text: str, tokenizer: PreTrainedTokenizerBase, chunk_tokens: int, overlap_tokens: int = 0
) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of ``text``, each at most ``chunk_tokens`` tokens.

    Windows are cut at character boundaries of the tokenizer's offset mapping (a byte-level BPE
    splits one CJK character or emoji into several tokens: a cut between them would repeat the
    character in two chunks), stripped of surrounding whitespace, and checked by tokenizing the
    span itself: a span whose own tokens exceed the budget (merges differ at its edges) is
    shortened. Consecutive windows share about ``overlap_tokens`` tokens; with 0 they never
    overlap. Needs a fast tokenizer (``return_offsets_mapping``); raises ``ValueError`` otherwise,
    or when one character alone has more tokens than ``chunk_tokens``.
    """
    if overlap_tokens >= chunk_tokens:
        raise ValueError(f"overlap {overlap_tokens} must be below the chunk size {chunk_tokens}")
    if overlap_tokens < 0:
        raise ValueError(f"overlap {overlap_tokens} must not be negative")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"token chunking needs a fast tokenizer (offset mapping), not "
            f"{type(tokenizer).__name__}: pass a splitter instead"
        )
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    count = len(offsets)
    # boundaries[j] is a token index where a new character starts (no character shared with
    # the tokens before it); a window [b, e) of boundary indices covers whole characters only.
    boundaries, reach = [], 0
    for i, (begin, finish) in enumerate(offsets):
        if i == 0 or begin >= reach:
            boundaries.append(i)
        reach = max(reach, finish)
    boundaries.append(count)
    char_at = [offsets[i][0] for i in boundaries[:-1]] + [len(text)]

    def fits(a: int, b: int) -> bool:
        piece = text[a:b].strip()
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        return len(ids) <= chunk_tokens

    spans: list[tuple[int, int]] = []
    first = 0  # index into boundaries
    while first < len(boundaries) - 1:
        start = boundaries[first]
        last = bisect.bisect_right(boundaries, start + chunk_tokens) - 1  # largest end in budget
        if last <= first:
            raise ValueError(
                f"chunk_tokens {chunk_tokens} is below the {boundaries[first + 1] - start} tokens "
                f"of the single character at offset {char_at[first]}"
            )
        while last > first and not fits(char_at[first], char_at[last]):
            last -= 1
        if last == first:
            raise ValueError(
                f"no span starting at character {char_at[first]} fits in {chunk_tokens} tokens"
            )
        begin, finish = char_at[first], char_at[last]
        piece = text[begin:finish]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            span = (begin + lead, begin + lead + len(stripped))
            # stripping whitespace can make a window start where the last one did, or end inside
            # it: keep the larger of the two, never a chunk contained in its neighbour
            if spans and span[0] <= spans[-1][0]:
                spans[-1] = span
            elif not spans or span[1] > spans[-1][1]:
                spans.append(span)
        if last == len(boundaries) - 1:
            break
        if overlap_tokens:
            back = bisect.bisect_right(boundaries, boundaries[last] - overlap_tokens) - 1
            first = max(back, first + 1)
        else:
            first = last
    return spans


def token_chunks(
    text: str, tokenizer: PreTrainedTokenizerBase, chunk_tokens: int, overlap_tokens: int = 0
) -> list[str]:
    """The texts of :func:`token_spans`: exact slices of ``text``, each within ``chunk_tokens``
    tokens when tokenized alone."""
    return [text[a:b] for a, b in token_spans(text, tokenizer, chunk_tokens, overlap_tokens)]


def split_with(splitter: Splitter, documents: Sequence[Document]) -> list[list[str]]:
    """Each document's chunk texts from a user's splitter, duck-typed (no framework is needed
    unless its splitter is given).

    ``split_text`` (LangChain ``TextSplitter``, LlamaIndex text splitters) is preferred; a LlamaIndex
    ``NodeParser`` without it gets LlamaIndex ``Document``s (so LlamaIndex is imported then); any
    other callable is called per text.
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


class CorpusChunks(list[Chunk]):
    """The chunks of a corpus (:func:`load_chunks`), and the ids of its documents with no chunk.

    A list of `Chunk`; ``empty_documents`` travel with it so that every job that syncs the
    store by document (:func:`precompress`, the Ray job) removes those documents' old chunks.
    """

    def __init__(self, chunks: Iterable[Chunk] = (), *, empty_documents: Iterable[str] = ()):
        super().__init__(chunks)
        self.empty_documents: list[str] = list(empty_documents)


def documents_path(chunks_path: str | Path) -> Path:
    """Where :func:`save_chunks` writes the documents' metadata: ``NAME.documents.jsonl``."""
    path = Path(chunks_path)
    return path.with_name(f"{path.stem}.documents{path.suffix or '.jsonl'}")


def save_chunks(chunks: Sequence[Chunk], keys: Sequence[str], path: str | Path) -> Path:
    """Write chunks with their latent keys as JSON lines (a docstore by chunk id).

    A chunk row holds ``id``, ``doc_id``, ``key``, ``text`` and only the metadata of its own
    (``chunk_index`` and any key whose value differs from its document's); each document's
    metadata is written once, to :func:`documents_path` (``doc_id``, ``metadata``), so a document
    with large metadata does not multiply it by its number of chunks. Both files are written to
    temporary names and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    doc_meta: dict[str, dict[str, Any]] = {}
    for chunk in chunks:
        if chunk.doc_id not in doc_meta:
            own = {k: v for k, v in chunk.metadata.items() if k not in ("doc_id", "chunk_index")}
            doc_meta[chunk.doc_id] = own

    def own_metadata(chunk: Chunk) -> dict[str, Any]:
        shared = doc_meta[chunk.doc_id]
        return {
            k: v
            for k, v in chunk.metadata.items()
            if k != "doc_id" and (k not in shared or (shared[k] is not v and shared[k] != v))
        }

    def write_chunks(handle: Any) -> None:
        for chunk, key in zip(chunks, keys, strict=True):
            row = {"id": chunk.id, "doc_id": chunk.doc_id, "key": key, "text": chunk.text}
            row["metadata"] = own_metadata(chunk)
            handle.write((json.dumps(row, default=str) + "\n").encode("utf-8", "surrogatepass"))

    def write_documents(handle: Any) -> None:
        for doc_id, metadata in doc_meta.items():
            line = json.dumps({"doc_id": doc_id, "metadata": metadata}, default=str) + "\n"
            handle.write(line.encode("utf-8", "surrogatepass"))

    atomic_write(documents_path(path), write_documents)
    return atomic_write(path, write_chunks)


# --- configuration and report -----------------------------------------------------------------


class PrecompressConfig(BaseModel):
    """How a corpus is chunked, batched and written (every field is a ``semidyn precompress`` flag)."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(0.0, description="DRS scale: higher compresses more")
    ratio: float | None = Field(None, description="fixed ratio instead of the selector")
    chunk_tokens: int = Field(256, ge=1, description="chunk size in compressor tokens")
    chunk_overlap: int = Field(32, ge=0, description="tokens shared by consecutive chunks")
    batch_tokens: int = Field(
        8192,
        ge=1,
        description="padded token positions per encoder pass (rows x longest row); a compressor "
        f"on CPU uses {CPU_BATCH_TOKENS} unless this is set",
    )
    max_batch_rows: int = Field(64, ge=1, description="at most this many segments per pass")
    write_batch: int = Field(256, ge=1, description="entries per store transaction")
    prune: bool = Field(
        False,
        description="the corpus is complete: delete stored documents it no longer has",
    )
    progress: bool = Field(True, description="show a tqdm progress bar")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> PrecompressConfig:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("chunk_overlap must be below chunk_tokens")
        CompressionPolicy(scale=self.scale, ratio=self.ratio)  # an unusable one raises here
        return self

    @property
    def compression(self) -> CompressionPolicy:
        """``scale`` and ``ratio`` as the `CompressionPolicy` a `LatentService` would use."""
        return CompressionPolicy(scale=self.scale, ratio=self.ratio)

    @property
    def policy(self) -> str:
        """The store policy key, as `LatentService` computes it for the same scale/ratio."""
        return self.compression.key


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
    seconds: float
    backend: str = "local"
    removed_chunks: int = 0
    """Chunk ids of the run's documents that vanished (or of pruned documents): out of the
    manifest."""
    changed_chunks: int = 0
    """Chunk ids whose text changed since the last run: compressed again."""
    pruned_documents: int = 0
    emptied_documents: int = 0
    """Documents of the run that have no text any more: their old chunks were removed."""
    deleted_entries: int = 0
    """Stored latents of vanished or edited text, deleted."""
    invalid: list[str] = []
    """Inputs skipped, each naming itself and its problem (lone surrogates, too long, bad rows)."""
    invalid_count: int = 0

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
            ("chunk ids removed", f"{self.removed_chunks:,}"),
            ("chunks changed", f"{self.changed_chunks:,}"),
            ("documents pruned", f"{self.pruned_documents:,}"),
            ("documents emptied (old chunks removed)", f"{self.emptied_documents:,}"),
            ("stale entries deleted", f"{self.deleted_entries:,}"),
            ("inputs skipped (errors)", f"{self.invalid_count:,}"),
            ("seconds", f"{self.seconds:.1f}"),
            ("chunks/s", f"{self.chunks_per_s:.1f}"),
            ("tokens/s", f"{self.tokens_per_s:,.0f}"),
        ]
        table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
        if not self.invalid:
            return table
        errors = [f"- {e}" for e in self.invalid]
        if self.invalid_count > len(self.invalid):
            errors.append(f"- ... and {self.invalid_count - len(self.invalid)} more")
        return "\n".join([table, "", "Skipped inputs:", *errors])


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
    chunks: list[Chunk] = field(default_factory=list)
    """The chunks the keys belong to (inputs with errors left out)."""
    tokens: dict[str, list[int]] = field(default_factory=dict)
    """Encoder token ids of each ``todo`` text (tokenized once, by :func:`prepare_work`)."""
    invalid: list[RowError] = field(default_factory=list)
    """Inputs skipped: rows of the corpus files, chunks that are not valid text or too long."""
    empty_documents: list[str] = field(default_factory=list)
    """Documents of the run with no chunk (emptied): the sync removes their old chunks."""
    emptied: list[str] = field(default_factory=list)
    """Of those, the ones whose old chunks the sync removed (set by :func:`finish_run`)."""

    @property
    def duplicates(self) -> int:
        return len(self.keys) - self.unique

    @property
    def skipped(self) -> int:
        return self.unique - len(self.todo)

    def manifest_rows(self) -> list[ManifestRow]:
        """The corpus manifest rows of ``chunks``: what the sync by document writes."""
        return [
            ManifestRow(c.id, self.policy, c.doc_id, k, text_hash(c.text))
            for c, k in zip(self.chunks, self.keys, strict=True)
        ]

    def report(
        self,
        store: LatentStore,
        *,
        tokens: int,
        latents: int,
        start: float,
        backend: str = "local",
        sync: SyncPlan | None = None,
    ) -> PrecompressReport:
        """The run's report once this plan is carried out (``start``: its perf_counter time)."""
        sync = sync or SyncPlan([], [], [])
        return PrecompressReport(
            store=str(store.path),
            chunks=len(self.keys),
            unique=self.unique,
            duplicates=self.duplicates,
            skipped=self.skipped,
            new=len(self.todo),
            tokens=tokens,
            latents=latents,
            seconds=time.perf_counter() - start,
            backend=backend,
            removed_chunks=len(sync.removed_ids),
            changed_chunks=len(sync.changed_ids),
            pruned_documents=len(sync.pruned_docs),
            deleted_entries=sync.deleted_entries,
            emptied_documents=len(self.emptied),
            invalid=[str(e) for e in self.invalid[:MAX_SHOWN_ERRORS]],
            invalid_count=len(self.invalid),
        )


def plan_work(chunks: Sequence[Chunk], store: LatentStore, policy: str) -> WorkPlan:
    """Deduplicate by key and ask the store which keys it lacks (call inside ``store.writer()``,
    so the answer cannot go stale under another job)."""
    keys = [store.key_for(c.text, policy) for c in chunks]
    texts = dict(zip(keys, (c.text for c in chunks)))  # later duplicates map to the same text
    missing = store.missing(texts)
    return WorkPlan(policy, keys, {k: texts[k] for k in missing}, len(texts), list(chunks))


def settled_plan(
    chunks: Sequence[Chunk], store: LatentStore, config: PrecompressConfig
) -> WorkPlan | None:
    """The plan of a run that would change nothing, found without a model; else ``None``.

    Nothing to do: the store holds every chunk's latents under ``config``'s policy and its
    manifest lists exactly these chunks for their documents (none for the documents with no
    chunk, ``chunks.empty_documents``), and ``config.prune`` is off. ``semidyn precompress``
    checks this before it loads a model; the rows with errors are for the caller to rule out.
    """
    if config.prune:
        return None
    plan = plan_work(chunks, store, config.policy)
    if plan.todo:
        return None
    emptied = set(getattr(chunks, "empty_documents", ()))  # their old chunks must go
    stored = store.manifest({c.doc_id for c in chunks} | emptied)
    return plan if set(stored) == set(plan.manifest_rows()) else None


def prepare_work(
    compressor: SemiDynamicCompressor,
    chunks: Sequence[Chunk],
    store: LatentStore,
    config: PrecompressConfig,
    input_errors: Sequence[RowError] = (),
    empty_documents: Sequence[str] | None = None,
) -> WorkPlan:
    """:func:`plan_work` for the chunks that can be compressed and read, their missing texts
    tokenized once; the rest are listed in ``invalid`` with the reason (and logged, once).

    ``empty_documents`` (default: ``chunks.empty_documents`` of a `CorpusChunks`) are documents
    of the run without chunks: the sync removes their old chunks.

    A chunk is refused when its text is not valid Unicode (:func:`check_text`), or when even at the
    highest ratio its latents would exceed the decoder's positions: no prompt could hold it.
    """
    invalid = list(input_errors)
    valid = []
    for chunk in chunks:
        try:
            check_text(chunk.text, f"chunk {chunk.id}")
            valid.append(chunk)
        except CorpusRowError as exc:
            invalid.append(RowError(exc.where, exc.problem))
    plan = plan_work(valid, store, config.policy)
    if plan.todo:
        keys = list(plan.todo)
        token_lists = compressor.tokenize([plan.todo[k] for k in keys])
        budget = compressor.latent_decoder.max_positions
        too_long = {}
        for key, ids in zip(keys, token_lists):
            need = min_latents(compressor.config, len(ids), config.ratio)
            if budget is not None and need > budget:
                too_long[key] = (
                    f"{len(ids):,} tokens give at least {need:,} latents, more than the "
                    f"decoder's {budget:,} positions (max_position_embeddings): split it into "
                    "smaller chunks (chunk_tokens)"
                )
        if too_long:
            kept = [(c, k) for c, k in zip(plan.chunks, plan.keys) if k not in too_long]
            for chunk, key in zip(plan.chunks, plan.keys):
                if key in too_long:
                    invalid.append(RowError(f"chunk {chunk.id}", too_long[key]))
            plan = WorkPlan(
                plan.policy,
                [k for _, k in kept],
                {k: t for k, t in plan.todo.items() if k not in too_long},
                plan.unique - len(too_long),
                [c for c, _ in kept],
            )
        plan.tokens = {k: ids for k, ids in zip(keys, token_lists) if k not in too_long}
    plan.invalid = invalid
    if empty_documents is None:
        empty_documents = getattr(chunks, "empty_documents", ())
    named = {c.doc_id for c in chunks}
    plan.empty_documents = sorted(set(empty_documents) - named)
    for error in invalid[:MAX_SHOWN_ERRORS]:
        logger.warning("skipped %s", error)
    if len(invalid) > MAX_SHOWN_ERRORS:
        logger.warning("skipped %d more inputs with errors", len(invalid) - MAX_SHOWN_ERRORS)
    return plan


def plan_batches(
    lengths: Sequence[int],
    *,
    batch_tokens: int,
    max_rows: int,
    segment_tokens: int,
    first_batch_tokens: int | None = None,
) -> list[list[int]]:
    """Indices grouped into encoder passes: longest first, each pass within the token budget.

    A text longer than ``segment_tokens`` is encoded as several segments; the budget counts the
    padded positions of one pass (segments x longest segment), so a pass of long texts has few
    rows and one of short texts many. Longest first: a budget too large for memory fails within
    the first two passes. ``first_batch_tokens`` (default ``batch_tokens``) is the first pass's
    budget: a small first pass shows progress early. A single text always gets a pass, even if it
    alone exceeds the budget.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    rows = width = 0
    budget = batch_tokens if first_batch_tokens is None else first_batch_tokens
    for i in order:
        segs = segment_count(lengths[i], segment_tokens)
        w = min(max(lengths[i], 1), segment_tokens) + 1  # + the appended <eos>
        if current and ((rows + segs) * max(width, w) > budget or rows + segs > max_rows):
            batches.append(current)
            current, rows, width, budget = [], 0, 0, batch_tokens
        current.append(i)
        rows, width = rows + segs, max(width, w)
    if current:
        batches.append(current)
    return batches


def pass_budget(config: PrecompressConfig, device: str) -> int:
    """``config.batch_tokens``, or :data:`CPU_BATCH_TOKENS` on a CPU ``device`` (``"cpu"``,
    ``"cuda:0"``...) when the config does not set it."""
    if device.startswith("cpu") and "batch_tokens" not in config.model_fields_set:
        return min(config.batch_tokens, CPU_BATCH_TOKENS)
    return config.batch_tokens


def open_store(
    store: LatentStore | str | Path, compressor: SemiDynamicCompressor, dtype: str = "float16"
) -> tuple[LatentStore, bool]:
    """The store to write (opened for ``compressor`` when given as a path) and whether we own it."""
    if isinstance(store, LatentStore):
        store.require_fingerprint(compressor.fingerprint)
        return store, False
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"store dtype must be one of {sorted(DTYPE_SIZES)}, got {dtype!r}")
    return LatentStore(store, compressor.fingerprint, dtype=torch_dtypes()[dtype]), True


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
    """A tqdm bar over chunks with the run's chunks/s and tokens/s since its start (tqdm's own
    rate turns into s/chunk below one chunk a second, as on CPU)."""

    def __init__(self, total: int, enabled: bool, desc: str = "precompress") -> None:
        self.bar = tqdm(total=total, unit="chunk", desc=desc, disable=not enabled, smoothing=0.1)
        self.start = time.perf_counter()
        self.chunks = self.tokens = 0

    def update(self, chunks: int, tokens: int) -> None:
        """Count one finished encoder pass of ``chunks`` chunks and ``tokens`` tokens."""
        self.chunks += chunks
        self.tokens += tokens
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rates = f"{self.chunks / seconds:,.2f} chunks/s, {self.tokens / seconds:,.0f} tok/s"
        self.bar.set_postfix_str(rates, refresh=False)
        self.bar.update(chunks)

    def close(self) -> None:
        self.bar.close()


# --- executors: where the encoder work of a run happens ------------------------------------------


@runtime_checkable
class Executor(Protocol):
    """Runs the compression step of :func:`precompress`; everything around it is the job's.

    The job opens the store, takes its writer lock, calls :meth:`recover`, plans (deduplicate,
    ask the store what it lacks, tokenize once, refuse unreadable chunks), calls :meth:`run` when
    anything is missing, syncs the manifest and reports. `LocalExecutor` compresses in this
    process; `semidyn_rag.distributed.RayExecutor` on Ray actors (the ``ray`` extra).
    """

    @property
    def name(self) -> str:
        """What the report's ``backend`` says (``"local"``, ``"ray (4 workers)"``)."""
        ...

    def recover(self, store: LatentStore) -> None:
        """Before planning, under the writer lock: store what a killed run of this executor
        left finished (e.g. Ray shards), so that the plan does not compress it again."""
        ...

    def run(
        self,
        compressor: SemiDynamicCompressor,
        store: LatentStore,
        plan: WorkPlan,
        config: PrecompressConfig,
    ) -> tuple[int, int]:
        """Put the latents of every ``plan.todo`` text into ``store`` (keys ``plan.todo``,
        tokens ``plan.tokens``, policy ``config.compression``); returns (tokens, latents) done.

        Called only when ``plan.todo`` is not empty; may commit in several transactions (a kill
        loses at most the uncommitted ones). Raises when any text could not be stored.
        """
        ...


class LocalExecutor:
    """Compress in this process: length-planned encoder passes of at most ``batch_tokens`` padded
    positions (:func:`pass_budget`), longest first, committed every ``write_batch`` entries."""

    name = "local"

    def recover(self, store: LatentStore) -> None:
        """Nothing to recover: a killed local run left only committed entries."""

    def run(
        self,
        compressor: SemiDynamicCompressor,
        store: LatentStore,
        plan: WorkPlan,
        config: PrecompressConfig,
    ) -> tuple[int, int]:
        """See `Executor.run`."""
        if compressor.training:
            logger.warning("the compressor is in training mode; call .eval() for stable latents")
        return _compress_into(compressor, store, plan, config)

    def __repr__(self) -> str:
        return "LocalExecutor()"


# --- the job ----------------------------------------------------------------------------------------


def precompress(
    compressor: SemiDynamicCompressor,
    chunks: Sequence[Chunk],
    store: LatentStore | str | Path,
    config: PrecompressConfig | None = None,
    *,
    executor: Executor | None = None,
    store_dtype: str = "float16",
    input_errors: Sequence[RowError] = (),
    empty_documents: Sequence[str] | None = None,
) -> PrecompressReport:
    """Compress every chunk the store lacks into it; sync its documents.

    ``store`` is an open `LatentStore` of this compressor or a directory (created with
    ``store_dtype``). ``chunks`` must hold *every* chunk of each document they name: the store is
    synced by document, so a document's chunk ids that vanished, or whose text changed, leave the
    corpus manifest, and latents of text no chunk has any more are deleted (``config.prune``:
    documents missing from ``chunks`` are deleted too). Inputs with errors (``input_errors`` from
    :func:`read_corpus`, chunks that are not valid text or too long for the decoder) are skipped
    and listed in the report. ``empty_documents`` (default: those of a `CorpusChunks` from
    :func:`load_chunks`) are documents of the run with no chunk, an emptied file say: their old
    chunks are removed and the report counts them (``emptied_documents``). ``executor`` does the
    encoder work (default `LocalExecutor`; `semidyn_rag.distributed.RayExecutor` for a cluster);
    ``compressor`` plans (tokenizer, fingerprint, decoder positions) whichever runs. Safe to kill
    at any point and rerun. Raises `StoreMismatchError` for a store of another compressor.
    """
    config = config or PrecompressConfig()
    executor = executor or LocalExecutor()
    start = time.perf_counter()
    store, owned = open_store(store, compressor, store_dtype)
    try:
        with exclusive_writer(store):
            executor.recover(store)
            plan = prepare_work(compressor, chunks, store, config, input_errors, empty_documents)
            logger.info(
                "%d chunks, %d distinct texts, %d already stored, %d to compress (%s)",
                len(plan.keys), plan.unique, plan.skipped, len(plan.todo), executor.name,
            )  # fmt: skip
            tokens = latents = 0
            if plan.todo:
                tokens, latents = executor.run(compressor, store, plan, config)
            sync = finish_run(store, plan, config)
        report = plan.report(
            store, tokens=tokens, latents=latents, start=start, backend=executor.name, sync=sync
        )
    finally:
        if owned:
            store.close()
    logger.info(
        "precompressed %d new chunks (%d tokens -> %d latents) in %.1f s: %.0f tokens/s (%s)",
        report.new, report.tokens, report.latents, report.seconds, report.tokens_per_s,
        report.backend,
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
    token_lists = [plan.tokens[k] for k in keys]
    budget = pass_budget(config, str(compressor.device))
    batches = plan_batches(
        [len(t) for t in token_lists],
        batch_tokens=budget,
        max_rows=config.max_batch_rows,
        segment_tokens=compressor.config.max_segment_tokens,
        first_batch_tokens=max(1, budget // FIRST_PASS_SHARE),
    )
    logger.debug("%d encoder passes of at most %d padded tokens", len(batches), budget)
    pending: list[tuple[str, CompressedContext]] = []
    tokens = latents = 0
    progress = Throughput(len(keys), config.progress)
    policy = config.compression

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
                ids, policy.scale, policy.ratio, batch_size=segments
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


def finish_run(store: LatentStore, plan: WorkPlan, config: PrecompressConfig) -> SyncPlan:
    """Sync the store's documents to ``plan.chunks``, once their latents are stored.

    One transaction: a kill before it leaves the old manifest, so the rerun computes the same
    changes again. Raises :class:`CorpusError` rather than prune a store with a run that has no
    valid chunk (every document would go).
    """
    rows = plan.manifest_rows()
    if config.prune and not rows:
        raise CorpusError(
            f"refusing to prune {store.path}: the run has no valid chunk, so every stored "
            "document would be deleted"
        )
    empty = plan.empty_documents
    plan.emptied = sorted({r.doc_id for r in store.manifest(empty)}) if empty else []
    sync = store.plan_sync(rows, dry_run=False, prune=config.prune, documents=empty)
    if plan.emptied:
        logger.info(
            "%d document(s) have no text any more; their old chunks were removed: %s",
            len(plan.emptied), ", ".join(plan.emptied[:MAX_SHOWN_ERRORS]),
        )  # fmt: skip
    return sync


def precompress_corpus(
    compressor: SemiDynamicCompressor,
    paths: Sequence[str | Path],
    store: LatentStore | str | Path,
    config: PrecompressConfig | None = None,
    *,
    splitter: Splitter | None = None,
    root: str | Path | None = None,
    executor: Executor | None = None,
    store_dtype: str = "float16",
    text_fields: Sequence[str] = TEXT_FIELDS,
) -> tuple[CorpusChunks, PrecompressReport]:
    """The whole job in one call: read and chunk corpus files (:func:`load_chunks`), then
    :func:`precompress` them with ``executor``; returns the chunks and the report.

    Rows of the corpus files with errors are skipped and listed in the report; documents with no
    text any more lose their old chunks. ``root``: file document ids (see :func:`read_corpus`)."""
    config = config or PrecompressConfig()
    skipped: list[RowError] = []
    chunks = load_chunks(
        paths,
        config,
        compressor.tokenizer,
        splitter,
        skipped=skipped,
        text_fields=text_fields,
        root=root,
    )
    report = precompress(
        compressor,
        chunks,
        store,
        config,
        executor=executor,
        store_dtype=store_dtype,
        input_errors=skipped,
    )
    return chunks, report


def load_chunks(
    paths: Sequence[str | Path],
    config: PrecompressConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    splitter: Splitter | None = None,
    *,
    skipped: list[RowError] | None = None,
    text_fields: Sequence[str] = TEXT_FIELDS,
    root: str | Path | None = None,
) -> CorpusChunks:
    """Every corpus path read and chunked; chunk ids must be unique across the corpus.

    With a ``skipped`` list, rows with errors are collected there instead of raising
    :class:`CorpusRowError`; a corpus where every row failed raises :class:`CorpusError`.
    The result also names the documents that have no chunk (``empty_documents``: emptied files,
    blank rows with an id), which :func:`precompress` removes from the store. ``root``: see
    :func:`read_corpus`.
    """
    empty: list[str] = []
    documents = [
        doc
        for path in paths
        for doc in read_corpus(
            path, skipped=skipped, text_fields=text_fields, empty=empty, root=root
        )
    ]
    if not documents and skipped:
        shown = "; ".join(str(e) for e in skipped[:3])
        raise CorpusError(f"no usable document in {', '.join(map(str, paths))}: {shown}")
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
    named = {c.doc_id for c in chunks}
    empty += [d.id for d in documents if d.id not in named]  # text, but no chunk of it
    logger.info("%d documents -> %d chunks", len(documents), len(chunks))
    return CorpusChunks(chunks, empty_documents=sorted(set(empty) - named))
