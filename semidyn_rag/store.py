"""Persistent latents: compress a corpus once, serve its chunks' latents to many queries.

A store is a directory::

    DIR/latents.sqlite     entries (one row per chunk text and policy), the corpus manifest
                           (which document's chunks reference which entry) and meta; SQLite, WAL mode
    DIR/writer.lock        taken by :meth:`LatentStore.writer` for jobs that must write alone

Why SQLite: every ``put_many`` is one transaction, so a process killed mid-write leaves the last
committed state (the next open ignores the WAL's uncommitted pages), and WAL lets any number of readers in
other processes read while one writer commits. There is no separate meta file, because a file
written beside the database could disagree with it after a crash.

A row's key is :func:`entry_key` of the chunk text, the compressor fingerprint and the ratio policy;
a store is bound to one fingerprint, so latents of other weights are never served from it. Every row
carries a checksum of everything a read returns (:func:`entry_checksum`), verified on every read and
by :meth:`LatentStore.check`: a damaged entry is an error, never served.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from filelock import FileLock
from pydantic import BaseModel

from .types import CompressedContext

# torch is imported where tensors are built: `store info` and `store check` need none
if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Version 2 added per-entry checksums and the corpus manifest; version 1 stores are migrated by
the first writable open."""
DB_NAME = "latents.sqlite"
LOCK_NAME = "writer.lock"
APPLICATION_ID = 0x53445247  # "SDRG" in the SQLite header: tells our files from other databases
DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4}
"""Bytes per value of each latent dtype a store may hold, by name."""
_BATCH = 500  # keys per ``IN (...)`` query, below SQLite's oldest limit of 999 parameters
_NOT_READY_WAIT_S = 2.0  # a creation commits within milliseconds; a reader waits this long for it


def torch_dtypes() -> dict[str, torch.dtype]:
    """The torch dtype of each name in :data:`DTYPE_SIZES` (imports torch)."""
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def __getattr__(name: str) -> Any:
    # ``DTYPES`` (name -> torch dtype) is built on first use, so importing the store needs no torch
    if name == "DTYPES":
        return torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_ENTRIES = """
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
    created REAL NOT NULL,
    checksum TEXT NOT NULL
)"""
_MANIFEST = """
CREATE TABLE chunks (
    id TEXT NOT NULL,
    policy TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    key TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    PRIMARY KEY (id, policy)
);
CREATE INDEX chunks_doc ON chunks (doc_id);
CREATE INDEX chunks_key ON chunks (key)
"""
_SCHEMA = f"CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);{_ENTRIES};{_MANIFEST}"
_ROW = "key, text_hash, policy, num_tokens, num_latents, hidden, dtype, ratios, ys, latents, created, checksum"
_MARKS = ",".join("?" * 12)
_COLUMNS = "key, num_tokens, num_latents, hidden, dtype, ratios, ys, latents, checksum"
_CORRUPT_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
_BUSY_CODES = {"SQLITE_BUSY", "SQLITE_LOCKED"}


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreMismatchError(StoreError):
    """The store was written by another compressor (or in another dtype) than the caller's."""


class StoreCorruptError(StoreError):
    """The files are not a store this code can read, or an entry does not decode or match its
    checksum."""


class StoreNotReadyError(StoreError):
    """The database exists but no store was committed in it yet: another process is creating it,
    or a creation was interrupted. Not corrupt: retry, or open it writable to finish it."""


class StoreVersionError(StoreError):
    """The store was written in another format version (older ones: open writable to migrate)."""


class StoreWriteError(StoreError):
    """A write failed for a reason outside the data: disk full, I/O error, read-only files, busy."""


def _sqlite_error(exc: sqlite3.Error, where: Path | str, doing: str) -> StoreError:
    """The store error for an SQLite failure: corrupt files, a busy database or a failed write."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name in _CORRUPT_CODES or "malformed" in str(exc) or "not a database" in str(exc):
        return StoreCorruptError(f"{where} is damaged ({doing}: {exc}); run `semidyn store check`")
    if name in _BUSY_CODES:
        return StoreWriteError(f"{where} is busy ({doing}: {exc}): another process holds it")
    if name == "SQLITE_FULL" or "disk is full" in str(exc):
        return StoreWriteError(f"{where}: the disk is full ({doing}: {exc}); free space and retry")
    return StoreWriteError(f"{where}: {doing} failed: {exc}")


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


def entry_checksum(
    key: str,
    num_tokens: int,
    num_latents: int,
    hidden: int,
    dtype: str,
    ratios: str,
    ys: str,
    latents: bytes,
) -> str:
    """Hex sha256 over every field a read returns, length-prefixed (so no two rows collide).

    Stored beside each entry and recomputed on every read: damage to any of the fields, even bytes
    overwritten in place at the same length, is an error rather than altered latents.
    """
    digest = hashlib.sha256(b"semidyn-entry-checksum-v1")
    for field in (key, str(num_tokens), str(num_latents), str(hidden), dtype, ratios, ys):
        data = field.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    digest.update(len(latents).to_bytes(8, "big"))
    digest.update(latents)
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
    documents: int = 0
    """Documents of the corpus manifest (0 for a store filled only by queries)."""
    chunks: int = 0
    """Chunk ids of the corpus manifest."""

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
            ("documents", f"{self.documents:,}"),
            ("chunks", f"{self.chunks:,}"),
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


@dataclass(frozen=True)
class ManifestRow:
    """One chunk of the corpus manifest: which document it belongs to and which entry holds its
    latents under one policy."""

    id: str
    policy: str
    doc_id: str
    key: str
    text_hash: str


@dataclass
class SyncPlan:
    """What a sync by document changes (see :meth:`LatentStore.plan_sync`)."""

    removed_ids: list[str]
    """Chunk ids no document has any more."""
    changed_ids: list[str]
    """Chunk ids whose text changed (their latents are computed again)."""
    pruned_docs: list[str]
    """Documents removed because the run was the whole corpus and lacked them."""
    deleted_entries: int = 0
    """Entries of vanished or edited text deleted (0 in a dry run)."""


class PruneReport(BaseModel):
    """What :meth:`LatentStore.prune` removed (or would remove, in a dry run)."""

    unreferenced_entries: int
    corrupt_entries: int
    dry_run: bool


class StoreCheck(BaseModel):
    """The result of :meth:`LatentStore.check`: entries that decode, and every problem found."""

    path: str
    entries: int
    problems: list[str]
    corrupt_keys: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


class _Retry(Exception):
    """The database is locked by a process creating or migrating it: try opening again."""


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

        A store whose files cannot be written (read-only filesystem or permissions) opens
        read-only, with a warning, instead of failing. A read-only open of a store another process
        is still creating waits briefly for it, then raises :class:`StoreNotReadyError`. A store
        of format version 1 is migrated (checksums added) by a writable open.

        Raises :class:`FileNotFoundError` (no store), :class:`StoreCorruptError` (not a store, or
        damaged), :class:`StoreMismatchError` (other compressor or dtype),
        :class:`StoreVersionError`, :class:`StoreNotReadyError`, :class:`StoreWriteError`.
        """
        self.path = Path(path)
        self.readonly = readonly
        self.failed_writes = 0
        """Entries :meth:`cache_many` could not write (disk full, read-only, I/O error)."""
        self._lock = threading.RLock()
        self._writer_lock: FileLock | None = None
        self._immutable = False
        db = self.path / DB_NAME
        if not db.exists():
            if readonly or not create:
                raise FileNotFoundError(f"no latent store at {self.path}")
            if fingerprint is None:
                raise ValueError("creating a latent store needs the compressor fingerprint")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreWriteError(
                    f"cannot create a latent store at {self.path}: {exc}"
                ) from exc
        elif not readonly and not self._writable(db):
            logger.warning(
                "%s is not writable (read-only filesystem or permissions): opened read-only",
                self.path,
            )
            self.readonly = True
        deadline = time.monotonic() + min(timeout, _NOT_READY_WAIT_S)
        while True:
            try:
                self._conn = self._open(db, timeout)
            except _Retry:
                _wait_while_locked(db, deadline)
                continue
            try:
                meta = self._read_meta()
                if meta is None and (self.readonly or not create or fingerprint is None):
                    if time.monotonic() < deadline:  # a creation in another process, mid-commit
                        self._conn.close()
                        time.sleep(0.05)
                        continue
                    raise StoreNotReadyError(
                        f"{db} holds no latent store yet: another process is creating it (retry "
                        "when it finishes) or a creation was interrupted (open it writable with "
                        "the compressor's fingerprint to finish it)"
                    )
                if meta is None:  # a new file, or a creation that crashed before its commit
                    name = "float16" if dtype is None else _dtype_name(dtype)
                    meta = self._initialize(fingerprint, name)
                meta = self._upgrade(meta)
                self.fingerprint, self.dtype_name = self._check_meta(meta, fingerprint, dtype)
            except _Retry:
                self._conn.close()
                _wait_while_locked(db, deadline)
                continue
            except BaseException:
                self._conn.close()
                raise
            break

    def _writable(self, db: Path) -> bool:
        """Whether this process may write the database and create its WAL beside it."""
        return os.access(self.path, os.W_OK) and os.access(db, os.W_OK)

    def _open(self, db: Path, timeout: float) -> sqlite3.Connection:
        """Connect, telling damaged files from files we may not write or that are busy."""
        try:
            return self._connect(db, timeout)
        except sqlite3.DatabaseError as exc:
            name = getattr(exc, "sqlite_errorname", "")
            if name in _BUSY_CODES:
                raise _Retry from exc
            if name in _CORRUPT_CODES:
                raise StoreCorruptError(f"{db} is not a readable SQLite database: {exc}") from exc
            raise StoreWriteError(f"cannot open {db}: {exc}") from exc

    def _connect(self, db: Path, timeout: float) -> sqlite3.Connection:
        """Autocommit connection (transactions are explicit); WAL for concurrent readers.

        A read-only open of a directory this process cannot write opens the database as
        immutable: SQLite cannot create the WAL index beside it, and no writer can exist there.
        """
        target, uri = str(db), False
        if self.readonly:
            target, uri = f"{db.resolve().as_uri()}?mode=ro", True
            if not self._writable(db):
                wal = db.with_name(f"{DB_NAME}-wal")
                if wal.exists() and wal.stat().st_size > 0:
                    raise StoreWriteError(
                        f"{self.path} cannot be written and holds a write-ahead log ({wal.name}) "
                        "that a killed writer left: open it once where it is writable to fold "
                        "the log into the database"
                    )
                target += "&immutable=1"
                self._immutable = True
        conn = sqlite3.connect(
            target,
            uri=uri,
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
            if getattr(exc, "sqlite_errorname", "") in _BUSY_CODES:
                raise _Retry from exc
            raise StoreCorruptError(f"{self.path / DB_NAME} is unreadable: {exc}") from exc

    def _initialize(self, fingerprint: str, dtype_name: str) -> dict[str, str]:
        """Create the schema and meta in one transaction (another process may be racing us)."""
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
        logger.info(
            "created latent store %s for compressor %s (%s)", self.path, fingerprint, dtype_name
        )
        return meta

    def _upgrade(self, meta: dict[str, str]) -> dict[str, str]:
        """Migrate a version 1 store (no checksums, no manifest) when opened writable."""
        if meta.get("format_version") != "1":
            return meta
        if self.readonly:
            raise StoreVersionError(
                f"{self.path} has store format version 1 (no checksums); this semidyn-rag reads "
                f"version {FORMAT_VERSION}: migrate it with `semidyn store migrate {self.path}` "
                "(or any writable open)"
            )
        with self._transaction(write=True) as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format_version") != "1":  # another process migrated it meanwhile
                return meta
            conn.execute("ALTER TABLE entries ADD COLUMN checksum TEXT NOT NULL DEFAULT ''")
            for statement in filter(str.strip, _MANIFEST.split(";")):
                conn.execute(statement)
            rows = conn.execute(f"SELECT {_COLUMNS} FROM entries").fetchall()
            sums = []
            for row in rows:
                try:  # an entry that no longer decodes keeps no checksum: reads refuse it
                    _parse(row, verify=False)
                    sums.append((entry_checksum(*row[:8]), row[0]))
                except StoreCorruptError as exc:
                    logger.warning("%s: not given a checksum: %s", self.path, exc)
            conn.executemany("UPDATE entries SET checksum = ? WHERE key = ?", sums)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", ("2",))
            meta["format_version"] = "2"
        logger.warning(
            "migrated %s to store format version %d: checksums of %d entries computed from their "
            "current contents",
            self.path, FORMAT_VERSION, len(sums),
        )  # fmt: skip
        return meta

    def _check_meta(
        self, meta: Mapping[str, str], fingerprint: str | None, dtype: torch.dtype | None
    ) -> tuple[str, str]:
        """Refuse other format versions, other compressors and other dtypes with clear errors.

        Returns the fingerprint and the dtype name.
        """
        for name in ("format_version", "fingerprint", "dtype"):
            if name not in meta:
                raise StoreCorruptError(
                    f"{self.path / DB_NAME} lacks its meta row {name!r}: the store is damaged; "
                    "rebuild it (delete the directory and precompress again)"
                )
        version = meta["format_version"]
        if version != str(FORMAT_VERSION):
            raise StoreVersionError(
                f"{self.path} has store format version {version}; "
                f"this semidyn-rag reads version {FORMAT_VERSION}"
            )
        stored = meta["fingerprint"]
        if fingerprint is not None and fingerprint != stored:
            raise _fingerprint_mismatch(self.path, stored, fingerprint)
        stored_dtype = meta["dtype"]
        if stored_dtype not in DTYPE_SIZES:
            raise StoreCorruptError(f"{self.path} has an unknown latent dtype {stored_dtype!r}")
        if dtype is not None and str(dtype).removeprefix("torch.") != stored_dtype:
            raise StoreMismatchError(f"{self.path} stores torch.{stored_dtype}, not {dtype}")
        return stored, stored_dtype

    def require_fingerprint(self, fingerprint: str) -> None:
        """Refuse any compressor but the store's own.

        Raises :class:`StoreMismatchError` unless ``fingerprint`` is the one the store was created
        with: latents of other weights are never served from it nor written into it.
        """
        if fingerprint != self.fingerprint:
            raise _fingerprint_mismatch(self.path, self.fingerprint, fingerprint)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype the latents are stored in (:attr:`dtype_name` without torch)."""
        return torch_dtypes()[self.dtype_name]

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction; a write one takes the write lock up front (no upgrade deadlock).

        SQLite failures become store errors that say what happened: :class:`StoreCorruptError`
        for damaged files, :class:`StoreWriteError` for a full disk, I/O errors or a busy database.
        """
        if write and self.readonly:
            raise StoreError(f"{self.path} is opened read-only")
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:  # SQLite may have rolled back already
                        with contextlib.suppress(sqlite3.Error):
                            self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _sqlite_error(exc, self.path, "a write" if write else "a read") from exc

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
        lookups. Latents are cast to the store dtype; values that overflow it are refused
        (``ValueError``). A full disk or another failed write raises :class:`StoreWriteError`
        (nothing of the call is stored). Returns the number of entries written.
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
                conn.execute(f"INSERT OR REPLACE INTO entries ({_ROW}) VALUES ({_MARKS})", row)
                count += 1
        logger.debug("stored %d entries in %s", count, self.path)
        return count

    def cache_many(
        self,
        items: Iterable[tuple[str, CompressedContext]],
        *,
        text_hashes: Mapping[str, str] | None = None,
        policy: str = "",
    ) -> int:
        """:meth:`put_many` for a cache in front of the encoder: a write that fails outside the
        data (disk full, I/O error, read-only files, a busy database) does not fail the caller,
        who already holds the latents. Such a failure is logged at WARNING and counted in
        :attr:`failed_writes`; the entries are simply computed again next time.

        Returns the number of entries written (0 after a failure). Bad latents (wrong shape,
        overflow) still raise ``ValueError``.
        """
        items = list(items)
        if self.readonly:
            self.failed_writes += len(items)
            logger.warning("%s is read-only: %d latents not cached", self.path, len(items))
            return 0
        try:
            return self.put_many(items, text_hashes=text_hashes, policy=policy)
        except (StoreWriteError, OSError) as exc:
            self.failed_writes += len(items)
            logger.warning(
                "%d latents not cached (served from memory): %s; %d cache writes failed so far",
                len(items), exc, self.failed_writes,
            )  # fmt: skip
            return 0

    def _encode(self, key: str, ctx: CompressedContext, text_hash: str, policy: str) -> tuple:
        """The entries row of one context, latents cast to the store dtype."""
        import torch

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
        fields = (
            key,
            int(ctx.num_tokens),
            int(stored.shape[0]),
            int(stored.shape[1]),
            self.dtype_name,
            json.dumps([float(r) for r in ctx.segment_ratios]),
            json.dumps([float(y) for y in ctx.segment_y]),
            blob,
        )
        return (key, text_hash, policy, *fields[1:], time.time(), entry_checksum(*fields))

    def get(self, key: str, *, dtype: torch.dtype | None = None) -> CompressedContext | None:
        """The entry of ``key`` (latents in the store dtype, or cast to ``dtype``), or ``None``."""
        return self.get_many([key], dtype=dtype).get(key)

    def get_many(
        self, keys: Iterable[str], *, dtype: torch.dtype | None = None
    ) -> dict[str, CompressedContext]:
        """The stored entries among ``keys``, in the order asked, read from one snapshot.

        Every entry's checksum is verified: a damaged entry raises :class:`StoreCorruptError`
        naming its key (it is never served); ``semidyn store prune --corrupt`` removes it.
        """
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
        with self._transaction(write=False) as conn:
            row = conn.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._transaction(write=False) as conn:
            return conn.execute("SELECT count(*) FROM entries").fetchone()[0]

    def keys(self) -> list[str]:
        """All keys, sorted."""
        with self._transaction(write=False) as conn:
            return [row[0] for row in conn.execute("SELECT key FROM entries ORDER BY key")]

    def delete(self, keys: Iterable[str]) -> int:
        """Remove entries in one transaction; returns how many existed."""
        with self._transaction(write=True) as conn:
            cursor = conn.executemany("DELETE FROM entries WHERE key = ?", ((k,) for k in keys))
            return cursor.rowcount

    # ------------------------------------------------------------------ corpus manifest
    def manifest(self, doc_ids: Iterable[str] | None = None) -> list[ManifestRow]:
        """The manifest rows of ``doc_ids`` (all documents when ``None``)."""
        with self._transaction(write=False) as conn:
            return self._manifest(conn, doc_ids)

    @staticmethod
    def _manifest(conn: sqlite3.Connection, doc_ids: Iterable[str] | None) -> list[ManifestRow]:
        columns = "id, policy, doc_id, key, text_hash"
        if doc_ids is None:
            return [ManifestRow(*r) for r in conn.execute(f"SELECT {columns} FROM chunks")]
        wanted = list(dict.fromkeys(doc_ids))
        rows: list[ManifestRow] = []
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start : start + _BATCH]
            query = f"SELECT {columns} FROM chunks WHERE doc_id IN ({','.join('?' * len(batch))})"
            rows += [ManifestRow(*r) for r in conn.execute(query, batch)]
        return rows

    def plan_sync(
        self,
        rows: Sequence[ManifestRow],
        *,
        prune: bool = False,
        dry_run: bool = True,
        documents: Iterable[str] = (),
    ) -> SyncPlan:
        """Replace the manifest of the documents in ``rows`` by ``rows`` (one policy's chunks).

        Sync by document: each document named in ``rows`` gets exactly these chunks under their
        policy; its chunk ids that vanished, or whose text changed, lose their rows under every
        policy. With ``prune`` the documents missing from ``rows`` are removed too (``rows`` is
        the whole corpus). Entries no remaining row references, among those the removed rows
        referenced, are deleted: the latents of edited and removed text do not linger.

        ``documents`` names more documents of the run that have no row (emptied): all their
        chunks are removed.

        With ``dry_run`` nothing is written: the plan says what would change.
        """
        docs = {r.doc_id for r in rows} | set(documents)
        policies = {r.policy for r in rows}
        if len(policies) > 1:
            raise ValueError(f"one sync covers one policy, got {sorted(policies)}")
        with self._transaction(write=not dry_run) as conn:
            old = self._manifest(conn, None if prune else docs)
            new_text = {r.id: r.text_hash for r in rows}
            gone = [
                r
                for r in old
                if r.doc_id not in docs  # pruned document
                or r.id not in new_text  # vanished chunk
                or new_text[r.id] != r.text_hash  # edited chunk, under any policy
            ]
            replaced = [r for r in old if r.doc_id in docs and r.policy in policies]
            old_ids = {r.id: r.text_hash for r in old}
            plan = SyncPlan(
                removed_ids=sorted({r.id for r in gone} - set(new_text)),
                changed_ids=sorted(i for i, h in new_text.items() if old_ids.get(i, h) != h),
                pruned_docs=sorted({r.doc_id for r in old} - docs) if prune else [],
            )
            if dry_run:
                return plan
            stale = {(r.id, r.policy) for r in gone} | {(r.id, r.policy) for r in replaced}
            conn.executemany("DELETE FROM chunks WHERE id = ? AND policy = ?", sorted(stale))
            conn.executemany(
                "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?)",
                ((r.id, r.policy, r.doc_id, r.key, r.text_hash) for r in rows),
            )
            candidates = sorted({r.key for r in gone} | {r.key for r in replaced})
            plan.deleted_entries = self._delete_unreferenced(conn, candidates)
        logger.info(
            "synced %d documents: %d chunk ids removed, %d changed, %d documents pruned, "
            "%d stale entries deleted",
            len(docs), len(plan.removed_ids), len(plan.changed_ids), len(plan.pruned_docs),
            plan.deleted_entries,
        )  # fmt: skip
        return plan

    @staticmethod
    def _delete_unreferenced(conn: sqlite3.Connection, keys: Sequence[str]) -> int:
        deleted = 0
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            cursor = conn.execute(
                f"DELETE FROM entries WHERE key IN ({marks}) "
                "AND key NOT IN (SELECT key FROM chunks)",
                batch,
            )
            deleted += cursor.rowcount
        return deleted

    def prune(self, *, corrupt: bool = False, dry_run: bool = False) -> PruneReport:
        """Delete what no document of the corpus manifest needs.

        Removes entries no manifest row references (latents of text that was edited or removed
        before documents were tracked, and query-time cache entries). With ``corrupt`` also
        entries failing their checksum, so the next precompression computes them again. Raises :class:`StoreError` when the store has no
        manifest (it would delete everything): precompress the corpus once first.
        """
        with contextlib.ExitStack() as stack:
            if not dry_run:  # no precompression may run meanwhile
                stack.enter_context(self.writer())
            return self._prune(corrupt, dry_run)

    def _prune(self, corrupt: bool, dry_run: bool) -> PruneReport:
        bad = self.check().corrupt_keys if corrupt else []
        with self._transaction(write=not dry_run) as conn:
            (tracked,) = conn.execute("SELECT count(*) FROM chunks").fetchone()
            if not tracked:
                raise StoreError(
                    f"{self.path} has no corpus manifest (it was filled before documents were "
                    "tracked, or only by queries): run `semidyn precompress CORPUS --store "
                    f"{self.path}` once to record the corpus, then prune"
                )
            unreferenced = [
                row[0]
                for row in conn.execute(
                    "SELECT key FROM entries WHERE key NOT IN (SELECT key FROM chunks)"
                )
            ]
            if not dry_run:
                self._delete_keys(conn, unreferenced + bad)
        report = PruneReport(
            unreferenced_entries=len(unreferenced),
            corrupt_entries=len(bad),
            dry_run=dry_run,
        )
        logger.info("pruned %s: %s", self.path, report)
        return report

    @staticmethod
    def _delete_keys(conn: sqlite3.Connection, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            conn.execute(f"DELETE FROM entries WHERE key IN ({','.join('?' * len(batch))})", batch)

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
        """:meth:`check`, raising :class:`StoreCorruptError` (its first problems) if any.

        Returns the number of entries checked.
        """
        result = self.check()
        if result.problems:
            shown = "; ".join(result.problems[:5])
            more = f" (and {len(result.problems) - 5} more)" if len(result.problems) > 5 else ""
            raise StoreCorruptError(f"{self.path}: {shown}{more}")
        return result.entries

    def check(self) -> StoreCheck:
        """SQLite's integrity check, then every entry decoded and its checksum verified.

        Never raises on damage: each problem (a damaged page, an entry that fails its checksum or
        does not decode, a chunk of the manifest whose entry is missing) is listed. Reads the
        whole store, so it is for ``semidyn store check`` and tests, not for every open.
        """
        problems: list[str] = []
        corrupt: list[str] = []
        checked = 0
        with self._lock:
            try:
                self._conn.execute("BEGIN")
            except sqlite3.Error as exc:
                return StoreCheck(path=str(self.path), entries=0, problems=[f"unreadable: {exc}"])
            try:
                try:
                    lines = [row[0] for row in self._conn.execute("PRAGMA integrity_check(100)")]
                    if lines != ["ok"]:
                        problems += [f"integrity check: {line}" for line in lines]
                except sqlite3.Error as exc:
                    problems.append(f"integrity check failed: {exc}")
                for rowid in self._rowids(problems):
                    try:
                        row = self._conn.execute(
                            f"SELECT {_COLUMNS} FROM entries WHERE rowid = ?", (rowid,)
                        ).fetchone()
                    except sqlite3.Error as exc:
                        problems.append(f"entry at row {rowid} unreadable: {exc}")
                        continue
                    if row is None:
                        continue
                    try:
                        _parse(row)  # no tensor is built: a check needs no torch
                        checked += 1
                    except StoreCorruptError as exc:
                        problems.append(str(exc))
                        corrupt.append(str(row[0]))
                    except Exception as exc:  # a check reports problems; it never crashes
                        problems.append(f"entry at row {rowid}: {type(exc).__name__}: {exc}")
                        corrupt.append(str(row[0]))
                try:
                    orphans = self._conn.execute(
                        "SELECT id, policy FROM chunks WHERE key NOT IN (SELECT key FROM entries)"
                    ).fetchall()
                    problems += [
                        f"chunk {cid} ({policy}) has no entry: precompress the corpus again"
                        for cid, policy in orphans
                    ]
                except sqlite3.Error as exc:
                    problems.append(f"corpus manifest unreadable: {exc}")
            finally:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
        return StoreCheck(
            path=str(self.path), entries=checked, problems=problems, corrupt_keys=corrupt
        )

    def _rowids(self, problems: list[str]) -> list[int]:
        """The entries' row ids; on a damaged table, every id up to the largest one readable."""
        try:
            return [row[0] for row in self._conn.execute("SELECT rowid FROM entries")]
        except sqlite3.Error as exc:
            problems.append(f"entries table unreadable: {exc}")
        try:
            (top,) = self._conn.execute("SELECT max(rowid) FROM entries").fetchone()
        except sqlite3.Error as exc:
            problems.append(f"entries cannot be enumerated: {exc}")
            return []
        return list(range(1, (top or 0) + 1))

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
            documents, chunks = conn.execute(
                "SELECT count(DISTINCT doc_id), count(DISTINCT id) FROM chunks"
            ).fetchone()
        names = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm")
        files = {n: (self.path / n).stat().st_size for n in names if (self.path / n).exists()}
        return StoreInfo(
            path=str(self.path),
            fingerprint=self.fingerprint,
            format_version=int(meta["format_version"]),
            dtype=self.dtype_name,
            hidden=int(meta["hidden"]) if "hidden" in meta else None,
            entries=entries,
            original_tokens=tokens,
            latents=latents,
            latent_bytes=size,
            policies=policies,
            files=files,
            documents=documents,
            chunks=chunks,
        )

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
            f"LatentStore({str(self.path)!r}, fingerprint={self.fingerprint!r}, "
            f"dtype=torch.{self.dtype_name})"
        )


def _fingerprint_mismatch(path: Path, stored: str, wanted: str) -> StoreMismatchError:
    return StoreMismatchError(
        f"{path} holds latents of compressor {stored!r}, not of compressor {wanted!r}: use "
        "another store path, or delete this one to rebuild it"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise ValueError(f"latent dtype must be one of {sorted(DTYPE_SIZES)}, got {dtype}")
    return name


@dataclass(frozen=True)
class _Fields:
    """One entries row, checked: everything a context is built from."""

    key: str
    num_tokens: int
    num_latents: int
    hidden: int
    dtype_name: str
    segment_ratios: tuple[float, ...]
    segment_y: tuple[float, ...]
    blob: bytes


def _parse(row: tuple, *, verify: bool = True) -> _Fields:
    """One entries row (``_COLUMNS``) checked (checksum, sizes, fields) without building tensors;
    any inconsistency is a :class:`StoreCorruptError` naming the key."""
    key, num_tokens, num_latents, hidden, dtype_name, ratios, ys, blob, checksum = row
    if verify:
        try:
            actual = entry_checksum(*row[:8])
        except (TypeError, AttributeError, OverflowError) as exc:  # a damaged field's type
            raise StoreCorruptError(f"entry {key!r}: unreadable fields: {exc}") from exc
        if actual != checksum:
            raise StoreCorruptError(
                f"entry {key} fails its checksum: the store file is damaged; remove the entry "
                "with `semidyn store prune --corrupt` and precompress again"
            )
    if not isinstance(blob, bytes):
        raise StoreCorruptError(f"entry {key}: latents are {type(blob).__name__}, not bytes")
    itemsize = DTYPE_SIZES.get(dtype_name)
    if itemsize is None:
        raise StoreCorruptError(f"entry {key}: unknown dtype {dtype_name!r}")
    expected = num_latents * hidden * itemsize
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
    return _Fields(
        key, num_tokens, num_latents, hidden, dtype_name, segment_ratios, segment_y, blob
    )


def _decode(row: tuple, dtype: torch.dtype | None, *, verify: bool = True) -> CompressedContext:
    """One entries row (``_COLUMNS``) as a context; any inconsistency is an error naming the key."""
    import torch

    f = _parse(row, verify=verify)
    stored = torch_dtypes()[f.dtype_name]
    if f.blob:
        latents = torch.frombuffer(bytearray(f.blob), dtype=stored)
        latents = latents.reshape(f.num_latents, f.hidden)
    else:
        latents = torch.empty(f.num_latents, f.hidden, dtype=stored)
    if dtype is not None:
        latents = latents.to(dtype)
    return CompressedContext(latents, f.num_tokens, f.segment_ratios, f.segment_y)


# --- fingerprints known without loading a model ------------------------------------------------


FINGERPRINTS_DIR = "fingerprints"
"""Under `semidyn_rag.loading.cache_dir`: one file per checkpoint source key, holding its fingerprint."""


def _fingerprints_dir(directory: str | Path | None) -> Path:
    if directory is not None:
        return Path(directory)
    from .loading import cache_dir

    return cache_dir() / FINGERPRINTS_DIR


def known_fingerprint(source_key: str | None, directory: str | Path | None = None) -> str | None:
    """The fingerprint the compressor with ``source_key`` had when last loaded, else ``None``.

    ``source_key`` hashes the files a compressor is loaded from
    (`semidyn_rag.evaluation.CheckpointRef.source_key`); knowing its fingerprint lets a rerun
    check a store or its records without loading the model. ``directory`` holds one file per key
    (default: ``fingerprints`` in the user's cache). ``None`` for a ``None`` key (a hub id) or
    one never remembered (or unreadable: the caller then loads the model).
    """
    if source_key is None:
        return None
    try:
        return (_fingerprints_dir(directory) / source_key).read_text().strip() or None
    except OSError:
        return None


def remember_fingerprint(
    source_key: str | None, fingerprint: str, directory: str | Path | None = None
) -> None:
    """Record ``fingerprint`` for ``source_key`` (see :func:`known_fingerprint`), atomically.

    A key of ``None`` records nothing. A write that fails (read-only cache, full disk) is logged
    and not raised: it only makes a later rerun load the model again.
    """
    if source_key is None:
        return
    path = _fingerprints_dir(directory) / source_key
    if known_fingerprint(source_key, directory) == fingerprint:
        return
    try:
        atomic_write(path, lambda handle: handle.write(fingerprint.encode()))
    except OSError as exc:
        logger.info("cannot remember the compressor fingerprint in %s: %s", path, exc)


# --- files written beside the store -------------------------------------------------------------


def atomic_write(target: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``target`` through a temporary file in its directory, fsync, then rename over it.

    The temporary file is created with mode 0o666 less the umask, like the store's database, so
    the result has the permissions of every other file the user creates there (``mkstemp`` would
    give 0600). Its name holds our pid; temporaries of processes that no longer run (a kill
    mid-write) are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Delete temporaries of ``target`` that :func:`atomic_write` calls in dead processes left."""
    target = Path(target)
    removed = []
    for temp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        parts = temp.name.rsplit(".", 3)
        pid = int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None
        if pid is not None and _alive(pid):
            continue
        temp.unlink(missing_ok=True)
        removed.append(temp)
    if removed:
        logger.info("removed %d temporary files of killed writes: %s", len(removed), removed)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _wait_while_locked(db: Path, deadline: float) -> None:
    """Sleep a moment before retrying an open another process holds locked; past ``deadline``,
    raise `StoreNotReadyError`."""
    if time.monotonic() >= deadline:
        raise StoreNotReadyError(
            f"{db} stayed locked by another process for {_NOT_READY_WAIT_S} s while "
            "being opened; retry when its creation or migration finishes"
        ) from None
    time.sleep(0.05)
