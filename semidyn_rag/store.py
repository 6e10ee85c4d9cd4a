"""Persistent latents: compress a corpus once, serve its chunks' latents to many queries.

A store is a directory::

    DIR/latents.sqlite     entries (one row per chunk and policy) and meta, SQLite in WAL mode
    DIR/writer.lock        taken by :meth:`LatentStore.writer` for jobs that must write alone
    DIR/faiss_index.npz    the optional :class:`VectorIndex` of the chunks' retrieval embeddings

Why SQLite: every ``put_many`` is one transaction, so a process killed mid-write leaves the last
committed state (the next open ignores the WAL's uncommitted pages), and WAL lets any number of readers in
other processes read while one writer commits. There is no separate meta file, because a file
written beside the database could disagree with it after a crash.

A row's key is :func:`entry_key` of the chunk text, the compressor fingerprint and the ratio policy;
a store is bound to one fingerprint, so latents of other weights are never served from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sqlite3
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch
from filelock import FileLock
from pydantic import BaseModel

from .types import CompressedContext

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DB_NAME = "latents.sqlite"
LOCK_NAME = "writer.lock"
INDEX_NAME = "faiss_index.npz"
APPLICATION_ID = 0x53445247  # "SDRG" in the SQLite header: tells our files from other databases
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_BATCH = 500  # keys per ``IN (...)`` query, below SQLite's oldest limit of 999 parameters

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    key TEXT PRIMARY KEY,
    text_hash TEXT NOT NULL,
    policy TEXT NOT NULL,
    num_tokens INTEGER NOT NULL,
    num_latents INTEGER NOT NULL,
    hidden INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    ratios TEXT NOT NULL,
    ys TEXT NOT NULL,
    latents BLOB NOT NULL,
    created REAL NOT NULL
);
"""
_COLUMNS = "key, num_tokens, num_latents, hidden, dtype, ratios, ys, latents"

Metric = Literal["cosine", "ip", "l2"]
Embedder = Callable[[Sequence[str]], np.ndarray | Sequence[Sequence[float]]]
"""Any text embedding function, e.g. LangChain's ``embed_documents`` or a sentence-transformer's
``encode``: the index stores vectors and never depends on a particular embedding model."""


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreMismatchError(StoreError):
    """The store was written by another compressor (or in another dtype) than the caller's."""


class StoreCorruptError(StoreError):
    """The files are not a store this code can read, or an entry does not decode."""


def text_hash(text: str) -> str:
    """Hex sha256 of a chunk's UTF-8 text (what ``sha256sum`` gives for the text's file)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def entry_key(text: str, fingerprint: str, policy: str) -> str:
    """The store key of one chunk's latents: its text, the compressor and the ratio policy.

    Each input changes the latents, so each is part of the key; the fields are length-prefixed, so
    ``("ab", "c", p)`` and ``("a", "bc", p)`` never collide.
    """
    digest = hashlib.sha256(b"semidyn-entry-v1")
    for field in (text, fingerprint, policy):
        data = field.encode("utf-8", "surrogatepass")  # any ``str``, even with lone surrogates
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def policy_key(scale: float | None = None, ratio: float | None = None) -> str:
    """Canonical text of the ratio policy: a fixed ``ratio`` overrides the selector and its ``scale``.

    Numbers are canonical (``4`` and ``4.0``, ``0.0`` and ``-0.0`` give the same policy), so equal
    policies always share cache entries.
    """
    name, value = ("ratio", ratio) if ratio is not None else ("scale", scale or 0.0)
    value = float(value) + 0.0  # + 0.0 turns -0.0 into 0.0
    if not math.isfinite(value):
        raise ValueError(f"policy {name} must be finite, got {value}")
    return f"{name}={value!r}"


class StoreInfo(BaseModel):
    """What a store holds and what it costs on disk (for ``semidyn store info``)."""

    path: str
    fingerprint: str
    format_version: int
    dtype: str
    hidden: int | None
    entries: int
    original_tokens: int
    latents: int
    latent_bytes: int
    policies: dict[str, int]
    files: dict[str, int]

    @property
    def compression(self) -> float:
        """Original tokens per stored latent vector."""
        return self.original_tokens / max(self.latents, 1)

    @property
    def bytes_per_token(self) -> float:
        """Latent bytes per original token: the storage price of the compression."""
        return self.latent_bytes / max(self.original_tokens, 1)

    def markdown(self) -> str:
        """A two-column Markdown table, one row per fact, file sizes and policies last."""
        rows = [
            ("path", self.path),
            ("fingerprint", self.fingerprint),
            ("format version", str(self.format_version)),
            ("dtype", self.dtype),
            ("hidden size", str(self.hidden) if self.hidden is not None else "-"),
            ("entries", f"{self.entries:,}"),
            ("original tokens", f"{self.original_tokens:,}"),
            ("latents", f"{self.latents:,}"),
            ("compression", f"{self.compression:.2f}x"),
            ("latent bytes", f"{self.latent_bytes:,}"),
            ("bytes per original token", f"{self.bytes_per_token:.1f}"),
        ]
        rows += [(f"policy {name}", f"{count:,} entries") for name, count in self.policies.items()]
        rows += [(f"file {name}", f"{size:,} bytes") for name, size in self.files.items()]
        lines = ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows]
        return "\n".join(lines)


class LatentStore:
    """Latents of compressed chunks on disk, keyed by :func:`entry_key`, bound to one compressor.

    Safe for many reader processes and concurrent writers (SQLite serializes commits; each
    ``put_many`` is atomic); one instance may be shared by threads. Latents are kept in the
    store's dtype (float16 unless created otherwise) as raw native-endian bytes.
    """

    def __init__(
        self,
        path: str | Path,
        fingerprint: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        readonly: bool = False,
        create: bool = True,
        timeout: float = 30.0,
    ) -> None:
        """Open the store in directory ``path``, creating it when missing and ``create`` is set.

        ``fingerprint`` identifies the compressor (weights and config); a new store records it,
        an existing one must match it (``None`` accepts the recorded one, e.g. to inspect a store).
        ``dtype`` likewise: the dtype of a new store (default float16), checked on an old one.
        ``timeout`` is how long a write waits for another process's transaction (seconds).
        """
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._writer_lock: FileLock | None = None
        db = self.path / DB_NAME
        if not db.exists():
            if readonly or not create:
                raise FileNotFoundError(f"no latent store at {self.path}")
            if fingerprint is None:
                raise ValueError("creating a latent store needs the compressor fingerprint")
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._connect(db, timeout)
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptError(f"{db} is not a readable SQLite database: {exc}") from exc
        try:
            meta = self._read_meta()
            if meta is None:  # a new file, or a creation that crashed before its commit
                if readonly or not create or fingerprint is None:
                    raise StoreCorruptError(f"{db} was never initialized as a latent store")
                meta = self._initialize(fingerprint, dtype or torch.float16)
            self.fingerprint, self.dtype = self._check_meta(meta, fingerprint, dtype)
        except BaseException:
            self._conn.close()
            raise

    def _connect(self, db: Path, timeout: float) -> sqlite3.Connection:
        """Autocommit connection (transactions are explicit); WAL for concurrent readers."""
        target = f"{db.resolve().as_uri()}?mode=ro" if self.readonly else str(db)
        conn = sqlite3.connect(
            target,
            uri=self.readonly,
            timeout=timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            if not self.readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL is crash-safe in WAL mode; a power cut may only lose the last commits.
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except BaseException:
            conn.close()
            raise
        return conn

    def _read_meta(self) -> dict[str, str] | None:
        """The meta table, or ``None`` for an empty database; raises on a foreign or broken one."""
        try:
            tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master")}
            app_id = self._conn.execute("PRAGMA application_id").fetchone()[0]
            if not tables and app_id == 0:
                return None
            if app_id != APPLICATION_ID or not {"meta", "entries"} <= tables:
                raise StoreCorruptError(f"{self.path / DB_NAME} is not a semidyn latent store")
            return dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise StoreCorruptError(f"{self.path / DB_NAME} is unreadable: {exc}") from exc

    def _initialize(self, fingerprint: str, dtype: torch.dtype) -> dict[str, str]:
        """Create the schema and meta in one transaction (another process may be racing us)."""
        dtype_name = _dtype_name(dtype)
        with self._transaction(write=True) as conn:
            meta = self._read_meta()
            if meta is not None:
                return meta
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            meta = {
                "format_version": str(FORMAT_VERSION),
                "fingerprint": fingerprint,
                "dtype": dtype_name,
                "created": str(time.time()),
            }
            conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        logger.info("created latent store %s for compressor %s (%s)", self.path, fingerprint, dtype)
        return meta

    def _check_meta(
        self, meta: Mapping[str, str], fingerprint: str | None, dtype: torch.dtype | None
    ) -> tuple[str, torch.dtype]:
        """Refuse other format versions, other compressors and other dtypes with clear errors."""
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise StoreCorruptError(
                f"{self.path} has store format version {version}; "
                f"this semidyn-rag reads version {FORMAT_VERSION}"
            )
        stored = meta["fingerprint"]
        if fingerprint is not None and fingerprint != stored:
            raise StoreMismatchError(
                f"{self.path} holds latents of compressor {stored!r}, not of compressor "
                f"{fingerprint!r}: use another store path, or delete this one to rebuild it"
            )
        stored_dtype = DTYPES.get(meta.get("dtype", ""))
        if stored_dtype is None:
            raise StoreCorruptError(f"{self.path} has an unknown latent dtype {meta.get('dtype')}")
        if dtype is not None and dtype != stored_dtype:
            raise StoreMismatchError(f"{self.path} stores {stored_dtype}, not {dtype}")
        return stored, stored_dtype

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction; a write one takes the write lock up front (no upgrade deadlock)."""
        if write and self.readonly:
            raise StoreError(f"{self.path} is opened read-only")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back already
                    self._conn.execute("ROLLBACK")
                raise

    def key_for(self, text: str, policy: str) -> str:
        """:func:`entry_key` of ``text`` under this store's compressor."""
        return entry_key(text, self.fingerprint, policy)

    def put(
        self, key: str, ctx: CompressedContext, *, text_hash: str = "", policy: str = ""
    ) -> None:
        """Store one entry (replacing an entry of the same key); see :meth:`put_many`."""
        self.put_many([(key, ctx)], text_hashes={key: text_hash}, policy=policy)

    def put_many(
        self,
        items: Iterable[tuple[str, CompressedContext]],
        *,
        text_hashes: Mapping[str, str] | None = None,
        policy: str = "",
    ) -> int:
        """Store entries in one transaction: all of them are committed, or none (also on a crash).

        ``text_hashes`` (by key) and ``policy`` are kept for inspection only; the key decides
        lookups. Latents are cast to the store dtype; values that overflow it are refused.
        Returns the number of entries written.
        """
        text_hashes = text_hashes or {}
        count = 0
        with self._transaction(write=True) as conn:
            known = conn.execute("SELECT value FROM meta WHERE key = 'hidden'").fetchone()
            hidden = int(known[0]) if known else None
            for key, ctx in items:
                row = self._encode(key, ctx, text_hashes.get(key, ""), policy)
                width = int(ctx.latents.shape[1])  # _encode checked that latents are 2-d
                if hidden is None:
                    hidden = width
                    conn.execute("INSERT INTO meta VALUES ('hidden', ?)", (str(hidden),))
                if width != hidden:
                    raise ValueError(
                        f"entry {key}: latents of width {width}, the store holds {hidden}"
                    )
                conn.execute("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
                count += 1
        logger.debug("stored %d entries in %s", count, self.path)
        return count

    def _encode(self, key: str, ctx: CompressedContext, text_hash: str, policy: str) -> tuple:
        """The entries row of one context, latents cast to the store dtype."""
        latents = ctx.latents.detach().cpu()
        if latents.dim() != 2:
            raise ValueError(
                f"entry {key}: latents must be [num_latents, hidden], got {latents.shape}"
            )
        if not ctx.segment_ratios or len(ctx.segment_ratios) != len(ctx.segment_y):
            raise ValueError(f"entry {key}: needs one ratio and one y per segment")
        stored = latents.to(self.dtype).contiguous()
        if bool((torch.isfinite(latents) & ~torch.isfinite(stored)).any()):
            raise ValueError(f"entry {key}: latents overflow {self.dtype}; use a wider store dtype")
        blob = stored.view(torch.uint8).numpy().tobytes()
        return (
            key,
            text_hash,
            policy,
            int(ctx.num_tokens),
            int(stored.shape[0]),
            int(stored.shape[1]),
            _dtype_name(self.dtype),
            json.dumps([float(r) for r in ctx.segment_ratios]),
            json.dumps([float(y) for y in ctx.segment_y]),
            blob,
            time.time(),
        )

    def get(self, key: str, *, dtype: torch.dtype | None = None) -> CompressedContext | None:
        """The entry of ``key`` (latents in the store dtype, or cast to ``dtype``), or ``None``."""
        return self.get_many([key], dtype=dtype).get(key)

    def get_many(
        self, keys: Iterable[str], *, dtype: torch.dtype | None = None
    ) -> dict[str, CompressedContext]:
        """The stored entries among ``keys``, in the order asked, read from one snapshot."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CompressedContext] = {}
        with self._transaction(write=False) as conn:
            for start in range(0, len(wanted), _BATCH):
                batch = wanted[start : start + _BATCH]
                marks = ",".join("?" * len(batch))
                query = f"SELECT {_COLUMNS} FROM entries WHERE key IN ({marks})"
                found.update((row[0], _decode(row, dtype)) for row in conn.execute(query, batch))
        return {key: found[key] for key in wanted if key in found}

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys among ``keys`` that have no entry (in order, without repeats)."""
        wanted = list(dict.fromkeys(keys))
        present: set[str] = set()
        with self._transaction(write=False) as conn:
            for start in range(0, len(wanted), _BATCH):
                batch = wanted[start : start + _BATCH]
                marks = ",".join("?" * len(batch))
                query = f"SELECT key FROM entries WHERE key IN ({marks})"
                present.update(row[0] for row in conn.execute(query, batch))
        return [key for key in wanted if key not in present]

    def __contains__(self, key: object) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM entries").fetchone()[0]

    def keys(self) -> list[str]:
        """All keys, sorted."""
        with self._lock:
            return [row[0] for row in self._conn.execute("SELECT key FROM entries ORDER BY key")]

    def delete(self, keys: Iterable[str]) -> int:
        """Remove entries in one transaction; returns how many existed."""
        with self._transaction(write=True) as conn:
            cursor = conn.executemany("DELETE FROM entries WHERE key = ?", ((k,) for k in keys))
            return cursor.rowcount

    @contextmanager
    def writer(self, timeout: float = -1) -> Iterator[LatentStore]:
        """Hold the store's writer lock, e.g. for a precompression job that must write alone.

        Commits are atomic without it; the lock keeps two long jobs from compressing the same
        corpus at once. It excludes other ``writer()`` holders (any process), not plain ``put``.
        ``timeout`` in seconds (negative: wait forever); raises :class:`filelock.Timeout`.
        """
        if self.readonly:
            raise StoreError(f"{self.path} is opened read-only")
        if self._writer_lock is None:
            self._writer_lock = FileLock(self.path / LOCK_NAME)
        with self._writer_lock.acquire(timeout=timeout):
            yield self

    def verify(self) -> int:
        """Check the database pages and decode every entry; raises :class:`StoreCorruptError`.

        Returns the number of entries checked. Reads the whole store, so it is for ``store check``
        and tests, not for every open.
        """
        with self._transaction(write=False) as conn:
            result = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            if result != ["ok"]:
                raise StoreCorruptError(f"{self.path}: integrity check failed: {result[:5]}")
            count = 0
            for row in conn.execute(f"SELECT {_COLUMNS} FROM entries"):
                _decode(row, None)
                count += 1
        return count

    def info(self) -> StoreInfo:
        """Totals of the store, its policies and the sizes of its files."""
        with self._transaction(write=False) as conn:
            entries, tokens, latents, size = conn.execute(
                "SELECT count(*), coalesce(sum(num_tokens), 0), coalesce(sum(num_latents), 0), "
                "coalesce(sum(length(latents)), 0) FROM entries"
            ).fetchone()
            policies = dict(
                conn.execute("SELECT policy, count(*) FROM entries GROUP BY policy ORDER BY policy")
            )
            meta = dict(conn.execute("SELECT key, value FROM meta"))
        names = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", INDEX_NAME)
        files = {n: (self.path / n).stat().st_size for n in names if (self.path / n).exists()}
        return StoreInfo(
            path=str(self.path),
            fingerprint=self.fingerprint,
            format_version=int(meta["format_version"]),
            dtype=_dtype_name(self.dtype),
            hidden=int(meta["hidden"]) if "hidden" in meta else None,
            entries=entries,
            original_tokens=tokens,
            latents=latents,
            latent_bytes=size,
            policies=policies,
            files=files,
        )

    @property
    def index_path(self) -> Path:
        """Where this store keeps its :class:`VectorIndex`."""
        return self.path / INDEX_NAME

    def vector_index(
        self,
        dim: int | None = None,
        metric: Metric | None = None,
        embed: Embedder | None = None,
    ) -> VectorIndex:
        """The store's vector index: loaded if saved before (and checked against ``dim`` and
        ``metric``), else a new one (``metric`` defaults to cosine).

        Its ``save()`` writes beside the latents. The index ids are the caller's chunk ids; they
        need not be the latent keys.
        """
        if self.index_path.exists():
            index = VectorIndex.load(self.index_path, embed=embed)
            if dim is not None and dim != index.dim:
                raise ValueError(f"{self.index_path} holds {index.dim}-d vectors, not {dim}-d")
            if metric is not None and metric != index.metric:
                raise ValueError(f"{self.index_path} ranks by {index.metric}, not {metric}")
            return index
        if dim is None:
            raise ValueError(f"{self.index_path} does not exist; give dim to create it")
        return VectorIndex(dim, metric or "cosine", embed=embed, path=self.index_path)

    def close(self) -> None:
        """Close the database connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LatentStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LatentStore({str(self.path)!r}, fingerprint={self.fingerprint!r}, dtype={self.dtype})"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"latent dtype must be one of {sorted(DTYPES)}, got {dtype}")
    return name


def _decode(row: tuple, dtype: torch.dtype | None) -> CompressedContext:
    """One entries row (``_COLUMNS``) as a context; any inconsistency is an error naming the key."""
    key, num_tokens, num_latents, hidden, dtype_name, ratios, ys, blob = row
    stored = DTYPES.get(dtype_name)
    if stored is None:
        raise StoreCorruptError(f"entry {key}: unknown dtype {dtype_name!r}")
    expected = num_latents * hidden * stored.itemsize
    if len(blob) != expected:
        raise StoreCorruptError(
            f"entry {key}: latents have {len(blob)} bytes, expected {expected} "
            f"({num_latents} x {hidden} {dtype_name})"
        )
    try:
        segment_ratios = tuple(float(r) for r in json.loads(ratios))
        segment_y = tuple(float(y) for y in json.loads(ys))
    except (ValueError, TypeError) as exc:
        raise StoreCorruptError(f"entry {key}: unreadable ratios or ys: {exc}") from exc
    if not segment_ratios or len(segment_ratios) != len(segment_y):
        raise StoreCorruptError(
            f"entry {key}: {len(segment_ratios)} ratios for {len(segment_y)} ys"
        )
    if expected:
        latents = torch.frombuffer(bytearray(blob), dtype=stored).reshape(num_latents, hidden)
    else:
        latents = torch.empty(num_latents, hidden, dtype=stored)
    if dtype is not None:
        latents = latents.to(dtype)
    return CompressedContext(latents, num_tokens, segment_ratios, segment_y)


class VectorIndex:
    """A FAISS index of retrieval embeddings with string ids, persisted in one file.

    ``cosine`` normalizes vectors and ranks by inner product, ``ip`` ranks by raw inner product,
    ``l2`` by squared Euclidean distance (lower is closer). Exact search (a flat index). Mutations
    are not thread-safe; several writing processes should load, change and save it inside
    :meth:`LatentStore.writer`, or the last save wins.

    The FAISS index and the id map are saved together in one ``.npz`` written to a temporary file
    and renamed over the old one, so a crash never leaves an index whose ids disagree with it.
    """

    def __init__(
        self,
        dim: int,
        metric: Metric = "cosine",
        *,
        embed: Embedder | None = None,
        path: str | Path | None = None,
    ) -> None:
        if metric not in ("cosine", "ip", "l2"):
            raise ValueError(f"metric must be 'cosine', 'ip' or 'l2', got {metric!r}")
        self.dim = int(dim)
        self.metric: Metric = metric
        self.embed = embed
        self.path = Path(path) if path is not None else None
        flat = faiss.IndexFlatL2(self.dim) if metric == "l2" else faiss.IndexFlatIP(self.dim)
        self._index = faiss.IndexIDMap2(flat)
        self._labels: dict[str, int] = {}
        self._ids: dict[int, str] = {}
        self._next_label = 0

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._labels

    def _matrix(self, vectors: np.ndarray | Sequence[Sequence[float]], what: str) -> np.ndarray:
        """Float32 C-contiguous ``[n, dim]`` (normalized for cosine); a 1-d vector is one row."""
        matrix = np.array(vectors, dtype=np.float32, ndmin=2, order="C", copy=True)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(
                f"{what} have shape {matrix.shape}; this index holds {self.dim}-d vectors"
            )
        if self.metric == "cosine":
            faiss.normalize_L2(matrix)
        return matrix

    def add(self, ids: Sequence[str], embeddings: np.ndarray | Sequence[Sequence[float]]) -> None:
        """Add vectors under ``ids``; an id already present gets its new vector."""
        ids = list(ids)
        matrix = self._matrix(embeddings, "embeddings")
        if len(ids) != matrix.shape[0]:
            raise ValueError(f"{len(ids)} ids for {matrix.shape[0]} embeddings")
        if len(set(ids)) != len(ids):
            raise ValueError("ids repeat within one add")
        self.remove(ids)
        labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
        self._next_label += len(ids)
        self._index.add_with_ids(matrix, labels)
        for chunk_id, label in zip(ids, labels.tolist()):
            self._labels[chunk_id] = label
            self._ids[label] = chunk_id

    def add_texts(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        """Embed ``texts`` with the index's ``embed`` function and add them."""
        self.add(ids, self._embed(texts))

    def search(
        self, queries: np.ndarray | Sequence[Sequence[float]], k: int
    ) -> list[tuple[list[str], list[float]]]:
        """The ``k`` nearest ids and their scores for each query row, best first."""
        matrix = self._matrix(queries, "queries")
        k = min(k, len(self))
        if k <= 0:
            return [([], []) for _ in range(matrix.shape[0])]
        scores, labels = self._index.search(matrix, k)
        results = []
        for row_scores, row_labels in zip(scores.tolist(), labels.tolist()):
            hits = [(self._ids[lab], s) for lab, s in zip(row_labels, row_scores) if lab >= 0]
            results.append(([i for i, _ in hits], [s for _, s in hits]))
        return results

    def search_texts(self, queries: Sequence[str], k: int) -> list[tuple[list[str], list[float]]]:
        """Embed ``queries`` with the index's ``embed`` function and search."""
        return self.search(self._embed(queries), k)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.embed is None:
            raise ValueError("this index has no embed function; pass embeddings instead")
        return np.asarray(self.embed(list(texts)), dtype=np.float32)

    def remove(self, ids: Iterable[str]) -> int:
        """Remove ``ids`` (unknown ones are ignored); returns how many were present."""
        labels = [self._labels.pop(i) for i in dict.fromkeys(ids) if i in self._labels]
        for label in labels:
            del self._ids[label]
        if labels:
            self._index.remove_ids(np.asarray(labels, dtype=np.int64))
        return len(labels)

    def save(self, path: str | Path | None = None) -> Path:
        """Write index and id map atomically to ``path`` (default: where it was loaded or made)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("give a path to save an index that has none")
        items = sorted(self._labels.items(), key=lambda item: item[1])
        arrays = {
            "format_version": np.asarray(FORMAT_VERSION),
            "metric": np.asarray(self.metric),
            "index": faiss.serialize_index(self._index),
            "ids": np.asarray([i for i, _ in items], dtype=np.str_),
            "labels": np.asarray([label for _, label in items], dtype=np.int64),
            "next_label": np.asarray(self._next_label),
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path, *, embed: Embedder | None = None) -> VectorIndex:
        """Read an index written by :meth:`save`; raises :class:`StoreCorruptError` if unreadable."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no vector index at {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != FORMAT_VERSION:
                    raise StoreCorruptError(
                        f"{path} has index format version {version}; this code reads "
                        f"{FORMAT_VERSION}"
                    )
                faiss_index = faiss.deserialize_index(data["index"])
                metric = str(data["metric"])
                ids, labels = data["ids"].tolist(), data["labels"].tolist()
                next_label = int(data["next_label"])
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
            raise StoreCorruptError(f"{path} is not a readable vector index: {exc}") from exc
        if len(ids) != faiss_index.ntotal or len(ids) != len(labels):
            raise StoreCorruptError(
                f"{path}: {len(ids)} ids and {len(labels)} labels for {faiss_index.ntotal} vectors"
            )
        if not isinstance(faiss_index, faiss.IndexIDMap2):
            raise StoreCorruptError(f"{path} holds a {type(faiss_index).__name__}, not an id map")
        index = cls(faiss_index.d, metric, embed=embed, path=path)
        index._index = faiss_index
        index._labels = dict(zip(ids, labels))
        index._ids = dict(zip(labels, ids))
        index._next_label = next_label
        return index
