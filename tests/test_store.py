"""LatentStore on real SQLite files, with killed and parallel processes."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import Timeout
from hypothesis import given
from hypothesis import strategies as st

from semidyn_rag.store import (
    APPLICATION_ID,
    DB_NAME,
    LatentStore,
    StoreCorruptError,
    StoreError,
    StoreInfo,
    StoreMismatchError,
    StoreNotReadyError,
    StoreVersionError,
    StoreWriteError,
    atomic_write,
    entry_key,
    known_fingerprint,
    policy_key,
    remember_fingerprint,
    text_hash,
)
from semidyn_rag.types import CompressedContext

FP = "compressor-a"
POLICY = policy_key(scale=0.0)
BATCH = 8  # entries per put_many of the worker processes
ROWS, WIDTH = 16, 512  # a worker entry: 16 KiB of float16


def make_context(rows: int = 3, width: int = 8, tokens: int = 12) -> CompressedContext:
    return CompressedContext(torch.randn(rows, width), tokens, (4.0,), (2.0,))


# Worker processes import this module (the package's lazy __init__ keeps the model stack out).
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import test_store; test_store.worker_main(sys.argv[2:])"


@contextlib.contextmanager
def worker(*args: object) -> Iterator[subprocess.Popen]:
    """A worker process running ``worker_main(args)``; killed if still running at exit."""
    command = [sys.executable, "-c", BOOT, str(Path(__file__).parent)]
    process = subprocess.Popen(
        [*command, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield process
    finally:
        process.kill()
        process.communicate()


def worker_context(i: int) -> CompressedContext:
    """Entry ``i`` of the workers: every field derives from ``i``, so a torn or mixed row shows."""
    return CompressedContext(torch.full((ROWS, WIDTH), float(i % 1024)), i, (float(i),), (i / 2,))


def worker_key(i: int) -> str:
    return entry_key(f"chunk {i}", FP, POLICY)


def check_entries(store: LatentStore) -> int:
    """Every entry holds its own content and batches are whole; returns the number of entries."""
    found = store.get_many(store.keys())
    indices = set()
    for key, ctx in found.items():
        i = ctx.num_tokens
        assert key == worker_key(i)
        assert torch.equal(ctx.latents, worker_context(i).latents.half())
        assert (ctx.segment_ratios, ctx.segment_y) == ((float(i),), (i / 2,))
        indices.add(i)
    batches = {i // BATCH for i in indices}
    assert indices == {b * BATCH + j for b in batches for j in range(BATCH)}
    return len(found)


def worker_main(argv: list[str]) -> None:
    """``write PATH BATCHES READERS [PAUSE]`` or ``read PATH TOTAL`` (see the tests below)."""
    mode, path = argv[0], Path(argv[1])
    if mode == "read":
        print(read_until(path, int(argv[2])))
        return
    batches, readers, pause = int(argv[2]), int(argv[3]), len(argv) > 4
    with LatentStore(path, FP) as store, store.writer():
        deadline = time.monotonic() + 30
        while len(list(path.glob("ready-*"))) < readers:
            assert time.monotonic() < deadline, "the readers never started"
            time.sleep(0.01)
        for batch in range(batches):
            items = range(batch * BATCH, (batch + 1) * BATCH)
            store.put_many(((worker_key(i), worker_context(i)) for i in items), policy=POLICY)
            time.sleep(0.01)
        if pause:
            store.put_many(paused_items(path, batches * BATCH), policy=POLICY)


def read_until(path: Path, total: int) -> int:
    """Check snapshots until ``total`` entries show; returns how many were taken mid-write."""
    with LatentStore(path, readonly=True) as store:
        sizes = [check_entries(store)]
        (path / f"ready-{os.getpid()}").touch()  # the writer waits for its readers
        deadline = time.monotonic() + 30
        while sizes[-1] < total and time.monotonic() < deadline:
            time.sleep(0.01)  # leave the CPU to the writer and the other processes starting up
            sizes.append(check_entries(store))
    assert sizes[-1] == total, sizes
    return sum(0 < size < total for size in sizes)


def paused_items(path: Path, start: int) -> Iterator[tuple[str, CompressedContext]]:
    """4 MiB of entries, twice SQLite's page cache, so some reach the WAL; then stall."""
    for i in range(start, start + 256):
        yield worker_key(i), worker_context(i)
    (path / "mid-transaction").touch()
    time.sleep(60)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_keeps_values_in_the_store_dtype(tmp_path, dtype):
    ctx = CompressedContext(torch.randn(5, 16) * 3, 20, (4.0,), (2.0,))
    with LatentStore(tmp_path, FP, dtype=dtype) as store:
        store.put("k", ctx, text_hash=text_hash("chunk"), policy=POLICY)
    with LatentStore(tmp_path, FP) as store:  # the dtype comes from the store
        got = store.get("k")
        assert store.dtype == dtype and got is not None and got.latents.dtype == dtype
        assert torch.equal(got.latents, ctx.latents.to(dtype))
        assert (got.num_tokens, got.segment_ratios, got.segment_y) == (20, (4.0,), (2.0,))
        cast = store.get("k", dtype=torch.float32)
        assert torch.equal(cast.latents, ctx.latents.to(dtype).float())
        assert store.get("other") is None


def test_multi_segment_entry_keeps_every_segment(tmp_path):
    ctx = CompressedContext(torch.randn(7, 8), 50, (2.0, 8.0, 4.0), (1.0, 3.0, math.nan))
    with LatentStore(tmp_path, FP, dtype=torch.float32) as store:
        store.put("k", ctx)
        got = store.get("k")
    assert torch.equal(got.latents, ctx.latents) and got.segment_ratios == (2.0, 8.0, 4.0)
    assert got.segment_y[:2] == (1.0, 3.0) and math.isnan(got.segment_y[2])
    assert got.ratio == ctx.ratio == 50 / 7


def test_lookup_api(tmp_path):
    with LatentStore(tmp_path, FP) as store:
        keys = [store.key_for(f"text {i}", POLICY) for i in range(4)]
        assert keys[0] == entry_key("text 0", FP, POLICY)
        assert store.put_many([(k, make_context()) for k in keys[:3]]) == 3
        assert len(store) == 3 and keys[0] in store and keys[3] not in store
        assert list(store.get_many([keys[2], keys[3], keys[0], keys[2]])) == [keys[2], keys[0]]
        assert store.missing([keys[3], keys[1], keys[3]]) == [keys[3]]
        assert store.delete([keys[1], keys[3]]) == 1
        assert store.keys() == sorted([keys[0], keys[2]])


def test_latents_that_overflow_the_dtype_are_refused(tmp_path):
    big = CompressedContext(torch.full((1, 4), 2.0**20), 4, (4.0,), (2.0,))
    with LatentStore(tmp_path / "f16", FP) as store, pytest.raises(ValueError, match="overflow"):
        store.put("k", big)
    with LatentStore(tmp_path / "bf16", FP, dtype=torch.bfloat16) as store:
        store.put("k", big)
        assert store.get("k").latents.float().eq(2.0**20).all()


def test_other_compressor_or_dtype_is_refused(tmp_path):
    LatentStore(tmp_path, "fp-a").close()
    with pytest.raises(StoreMismatchError, match=r"'fp-a'.*'fp-b'"):
        LatentStore(tmp_path, "fp-b")
    with pytest.raises(StoreMismatchError, match="bfloat16"):
        LatentStore(tmp_path, "fp-a", dtype=torch.bfloat16)
    with LatentStore(tmp_path) as store:  # no fingerprint: inspect whatever is there
        assert store.fingerprint == "fp-a" and store.dtype == torch.float16
        store.require_fingerprint("fp-a")
        with pytest.raises(StoreMismatchError, match=r"'fp-a'.*'fp-b'"):
            store.require_fingerprint("fp-b")


def test_fingerprints_are_remembered_by_source_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIDYN_CACHE", str(tmp_path / "cache"))
    assert known_fingerprint("k") is None and known_fingerprint(None) is None
    remember_fingerprint("k", "fp-a")
    remember_fingerprint(None, "fp-b")  # a hub id: nothing to key it by
    assert known_fingerprint("k") == "fp-a"
    assert (tmp_path / "cache" / "fingerprints" / "k").read_text() == "fp-a"
    remember_fingerprint("k", "fp-c", tmp_path / "records")  # another place, another memory
    assert (known_fingerprint("k"), known_fingerprint("k", tmp_path / "records")) == (
        "fp-a",
        "fp-c",
    )
    (tmp_path / "file").write_text("")
    remember_fingerprint("k", "fp-d", tmp_path / "file")  # cannot be written: only logged
    assert known_fingerprint("k", tmp_path / "file") is None


def test_missing_and_half_created_stores(tmp_path):
    with pytest.raises(FileNotFoundError):
        LatentStore(tmp_path / "none", FP, create=False)
    with pytest.raises(FileNotFoundError):
        LatentStore(tmp_path / "none", readonly=True)
    with pytest.raises(ValueError, match="fingerprint"):
        LatentStore(tmp_path / "none")
    sqlite3.connect(tmp_path / DB_NAME).close()  # a creation killed before its first commit
    with LatentStore(tmp_path, FP) as store:
        assert len(store) == 0 and store.fingerprint == FP


def test_put_many_is_all_or_nothing(tmp_path):
    def failing() -> Iterator[tuple[str, CompressedContext]]:
        yield "b", make_context()
        yield "c", make_context()
        raise RuntimeError("encoder failed")

    with LatentStore(tmp_path, FP) as store:
        store.put("a", make_context())
        with pytest.raises(RuntimeError):
            store.put_many(failing())
        with pytest.raises(ValueError, match="width 9"):
            store.put_many([("d", make_context()), ("e", make_context(width=9))])
        assert store.keys() == ["a"]


def test_readonly_store_reads_but_never_writes(tmp_path):
    with LatentStore(tmp_path, FP) as store:
        store.put("a", make_context())
    with LatentStore(tmp_path, readonly=True) as store:
        assert store.get("a") is not None
        with pytest.raises(StoreError, match="read-only"):
            store.put("b", make_context())
        with pytest.raises(StoreError, match="read-only"), store.writer():
            pass


def test_writer_lock_excludes_other_writers(tmp_path):
    with LatentStore(tmp_path, FP) as first, LatentStore(tmp_path, FP) as second:
        with first.writer(), pytest.raises(Timeout), second.writer(timeout=0.05):
            pass
        with second.writer(timeout=0.05):
            second.put("a", make_context())


def test_corrupt_files_raise_clear_errors(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / DB_NAME).write_bytes(os.urandom(8192))
    with pytest.raises(StoreCorruptError, match="not a readable SQLite database"):
        LatentStore(garbage, FP)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with contextlib.closing(sqlite3.connect(foreign / DB_NAME)) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(StoreCorruptError, match="not a semidyn latent store"):
        LatentStore(foreign, FP)

    with LatentStore(tmp_path, FP) as store:
        store.put_many([("good", make_context()), ("bad", make_context())])
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn, conn:
        conn.execute("UPDATE entries SET latents = substr(latents, 1, 10) WHERE key = 'bad'")
    with LatentStore(tmp_path, FP) as store:
        assert store.get("good") is not None
        with pytest.raises(StoreCorruptError, match="entry bad fails its checksum"):
            store.get_many(["good", "bad"])
        with pytest.raises(StoreCorruptError, match="entry bad"):
            store.verify()

    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn, conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    with pytest.raises(StoreVersionError, match="format version 99"):
        LatentStore(tmp_path, FP)
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn, conn:
        conn.execute("DELETE FROM meta WHERE key = 'fingerprint'")
    with pytest.raises(StoreCorruptError, match="lacks its meta row 'fingerprint'"):
        LatentStore(tmp_path, FP)


def test_info_totals_and_markdown(tmp_path):
    with LatentStore(tmp_path, FP) as store:
        store.put_many(
            [("a", make_context(4, 8, 16)), ("b", make_context(2, 8, 10))], policy=POLICY
        )
        store.put("c", make_context(1, 8, 6), policy="ratio=4.0")
        info = store.info()
    assert (info.entries, info.original_tokens, info.latents, info.hidden) == (3, 32, 7, 8)
    assert info.latent_bytes == 7 * 8 * 2 and info.bytes_per_token == 112 / 32
    assert info.compression == 32 / 7 and info.policies == {"ratio=4.0": 1, POLICY: 2}
    assert info.files[DB_NAME] > 0 and info.fingerprint == FP and info.dtype == "float16"
    assert "| entries | 3 |" in info.markdown() and FP in info.markdown()
    assert StoreInfo.model_validate_json(info.model_dump_json()) == info


@pytest.mark.integration  # subprocesses
def test_killed_writer_leaves_a_consistent_store(tmp_path):
    LatentStore(tmp_path, FP).close()
    with worker("write", tmp_path, 6, 0, "pause") as writer:
        deadline = time.monotonic() + 30
        while not (tmp_path / "mid-transaction").exists():
            assert writer.poll() is None, writer.communicate()[1]
            assert time.monotonic() < deadline, "the writer never reached its last transaction"
            time.sleep(0.01)
        committed = 6 * BATCH * ROWS * WIDTH * 2
        assert (tmp_path / f"{DB_NAME}-wal").stat().st_size > committed + 2**20  # uncommitted too
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL

    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    with LatentStore(tmp_path, FP) as store:
        assert store.verify() == check_entries(store) == 6 * BATCH
        with store.writer(timeout=1):  # the killed holder's lock died with it
            store.put(worker_key(10_000), worker_context(10_000))
        assert store.get(worker_key(10_000)).num_tokens == 10_000


@pytest.mark.integration  # subprocesses
def test_readers_in_other_processes_see_whole_batches_while_one_writes(tmp_path):
    batches = 20
    LatentStore(tmp_path, FP).close()
    with worker("write", tmp_path, batches, 2) as writer:
        with worker("read", tmp_path, batches * BATCH) as reader:
            mid_write = read_until(tmp_path, batches * BATCH)  # this process is the second reader
            reader_out, reader_err = reader.communicate(timeout=60)
            assert reader.returncode == 0, reader_err
        _, writer_err = writer.communicate(timeout=60)
        assert writer.returncode == 0, writer_err
    assert mid_write + int(reader_out) > 0  # some snapshots were taken while the writer wrote
    with LatentStore(tmp_path, FP) as store:
        assert check_entries(store) == batches * BATCH


fields = st.tuples(st.text(max_size=6), st.text(max_size=6), st.text(max_size=6))


@given(fields, fields)
def test_entry_key_differs_for_different_fields(a, b):
    assert (entry_key(*a) == entry_key(*b)) == (a == b)


@given(st.text(max_size=10), st.data())
def test_entry_key_is_not_fooled_by_moved_field_boundaries(joined, data):
    cuts = st.lists(st.integers(0, len(joined)), min_size=2, max_size=2).map(sorted)
    (i, j), (k, m) = data.draw(cuts), data.draw(cuts)
    a, b = (joined[:i], joined[i:j], joined[j:]), (joined[:k], joined[k:m], joined[m:])
    assert (entry_key(*a) == entry_key(*b)) == (a == b)


def test_key_helpers():
    assert entry_key("ab", "c", "p") != entry_key("a", "bc", "p")
    assert len(entry_key("t", FP, POLICY)) == 64 and entry_key("t", FP, POLICY).isalnum()
    assert text_hash("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    assert policy_key(None, 4) == policy_key(0.5, 4.0) == "ratio=4.0"
    assert policy_key() == policy_key(-0.0) == policy_key(0) == "scale=0.0"
    assert policy_key(scale=-1.5) == "scale=-1.5"
    with pytest.raises(ValueError, match="finite"):
        policy_key(math.nan)


# --- integrity: checksums, damage, versions ------------------------------------------------------


def damage(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def test_same_length_blob_damage_is_never_served(tmp_path, capsys):
    from semidyn_rag.cli import main

    good, bad = make_context(4, 16), make_context(4, 16)
    with LatentStore(tmp_path, FP) as store:
        store.put_many([("good", good), ("bad", bad)])
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn, conn:
        (blob,) = conn.execute("SELECT latents FROM entries WHERE key = 'bad'").fetchone()
        flipped = bytes(b ^ 0x40 for b in blob[:8]) + blob[8:]  # same length, other values
        conn.execute("UPDATE entries SET latents = ? WHERE key = 'bad'", (flipped,))
    with LatentStore(tmp_path, readonly=True) as store:
        assert torch.equal(store.get("good").latents, good.latents.half())
        with pytest.raises(StoreCorruptError, match="entry bad fails its checksum"):
            store.get("bad")
        result = store.check()
        assert result.entries == 1 and result.corrupt_keys == ["bad"] and not result.ok
    assert main(["store", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "entry bad fails its checksum" in out and "prune --corrupt" in out
    with LatentStore(tmp_path, FP) as store:
        with pytest.raises(StoreError, match="no corpus manifest"):
            store.prune(corrupt=True)
        store.delete(store.check().corrupt_keys)
        assert store.verify() == 1


def test_every_field_is_covered_by_the_checksum(tmp_path):
    with LatentStore(tmp_path, FP) as store:
        store.put("k", make_context())
    changes = {
        "num_tokens": "num_tokens + 1",
        "ratios": "'[8.0]'",
        "ys": "'[3.0]'",
        "key": "'other'",
        "dtype": "'bfloat16'",
    }
    for column, value in changes.items():
        copy = tmp_path / column
        copy.mkdir()
        (copy / DB_NAME).write_bytes((tmp_path / DB_NAME).read_bytes())
        with contextlib.closing(sqlite3.connect(copy / DB_NAME)) as conn, conn:
            conn.execute(f"UPDATE entries SET {column} = {value}")
        with LatentStore(copy, readonly=True) as store:
            with pytest.raises(StoreCorruptError, match="checksum"):
                store.get_many(store.keys())
            assert len(store.check().corrupt_keys) == 1


def test_random_page_damage_never_serves_altered_latents(tmp_path):
    """The attack: random pages of copies overwritten. Each read gives the stored latents or a
    store error; ``store check`` reports and never crashes."""
    from semidyn_rag.cli import main

    rng = np.random.default_rng(0)
    original = tmp_path / "original"
    contexts = {f"k{i}": make_context(rows=1 + i % 7, width=256) for i in range(40)}
    with LatentStore(original, FP) as store:
        store.put_many(contexts.items())
    data = (original / DB_NAME).read_bytes()
    page = 4096
    outcomes = {"served intact": 0, "refused": 0, "check found": 0}
    for copy_number in range(12):
        copy = tmp_path / f"copy{copy_number}"
        copy.mkdir()
        (copy / DB_NAME).write_bytes(data)
        for _ in range(2):
            at = int(rng.integers(1, len(data) // page)) * page + int(rng.integers(0, page - 64))
            damage(copy / DB_NAME, at, rng.bytes(int(rng.integers(8, 64))))
        code = main(["store", "check", str(copy)])  # never raises
        assert code in (0, 1)
        outcomes["check found"] += code
        try:
            store = LatentStore(copy, readonly=True)
        except StoreError:
            outcomes["refused"] += 1
            continue
        with store:
            for key, ctx in contexts.items():
                try:
                    got = store.get(key)
                except StoreError:
                    outcomes["refused"] += 1
                    continue
                if got is not None:
                    assert torch.equal(got.latents, ctx.latents.half()), f"copy {copy_number} {key}"
                    outcomes["served intact"] += 1
    assert outcomes["check found"] > 0 and outcomes["served intact"] > 0, outcomes


def make_v1_store(path: Path, contexts: dict[str, CompressedContext]) -> None:
    """A store as format version 1 wrote it (no checksum column, no manifest)."""
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path / DB_NAME)) as conn, conn:
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "CREATE TABLE entries (key TEXT PRIMARY KEY, text_hash TEXT NOT NULL, policy TEXT "
            "NOT NULL, num_tokens INTEGER NOT NULL, num_latents INTEGER NOT NULL, hidden INTEGER "
            "NOT NULL, dtype TEXT NOT NULL, ratios TEXT NOT NULL, ys TEXT NOT NULL, latents BLOB "
            "NOT NULL, created REAL NOT NULL)"
        )
        meta = {"format_version": "1", "fingerprint": FP, "dtype": "float16", "hidden": "8"}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        for key, ctx in contexts.items():
            blob = ctx.latents.half().contiguous().view(torch.uint8).numpy().tobytes()
            row = (key, "", POLICY, ctx.num_tokens, *ctx.latents.shape, "float16", "[4.0]",
                   "[2.0]", blob, 0.0)  # fmt: skip
            conn.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)


def test_version_1_store_is_migrated_or_named(tmp_path, capsys):
    from semidyn_rag.cli import main

    contexts = {"a": make_context(), "b": make_context(2)}
    make_v1_store(tmp_path, contexts)
    with pytest.raises(StoreVersionError, match=r"format version 1.*semidyn store migrate"):
        LatentStore(tmp_path, readonly=True)
    assert main(["store", "migrate", str(tmp_path)]) == 0
    assert "format version 2" in capsys.readouterr().out
    with LatentStore(tmp_path, readonly=True) as store:
        assert store.verify() == 2
        for key, ctx in contexts.items():
            assert torch.equal(store.get(key).latents, ctx.latents.half())
    with LatentStore(tmp_path, FP) as store:  # a migrated store writes like a new one
        store.put("c", make_context())
        assert store.verify() == 3


# --- opening: creation in progress, read-only files -------------------------------------------


def test_readonly_open_of_a_store_being_created_waits_then_is_not_corrupt(tmp_path):
    """The creator has made the file and holds its first transaction: not corrupt, not ready."""
    db = tmp_path / DB_NAME
    creator = sqlite3.connect(db, isolation_level=None)
    creator.execute("PRAGMA journal_mode=WAL")
    creator.execute("BEGIN IMMEDIATE")
    creator.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    start = time.monotonic()
    with pytest.raises(StoreNotReadyError, match="another process is creating it"):
        LatentStore(tmp_path, readonly=True)
    assert time.monotonic() - start >= 1.0  # it waited for the creation before saying so
    creator.execute("ROLLBACK")
    creator.close()

    # a creation that commits while the reader waits: the reader gets the store
    import threading

    (tmp_path / DB_NAME).unlink()
    sqlite3.connect(db).close()  # the file exists, empty, as right after the creator's connect
    finish = threading.Timer(0.3, lambda: LatentStore(tmp_path, FP).close())
    finish.start()
    try:
        with LatentStore(tmp_path, readonly=True) as store:
            assert store.fingerprint == FP
    finally:
        finish.join()


@pytest.fixture
def unwritable(monkeypatch):
    """The store directory behaves as on a read-only filesystem: ``os.access(W_OK)`` is false
    (running as root, ``chmod`` would not stop writes, so the test does not rely on it)."""
    from semidyn_rag import store as store_module

    real = os.access

    def access(path, mode, *args, **kwargs):
        return False if mode & os.W_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "access", access)


def test_finished_store_on_a_readonly_filesystem_opens_readonly(tmp_path, unwritable, caplog):
    with contextlib.ExitStack() as stack:  # build it before the filesystem "turns read-only"
        stack.enter_context(pytest.MonkeyPatch.context()).setattr(
            os, "access", lambda *a, **k: True
        )
        with LatentStore(tmp_path, FP) as store:
            store.put("a", make_context())
    with LatentStore(tmp_path, readonly=True) as store:
        assert store.get("a") is not None and store.verify() == 1
    with caplog.at_level("WARNING"), LatentStore(tmp_path, FP) as store:
        assert store.readonly and store.get("a") is not None
        with pytest.raises(StoreError, match="read-only"):
            store.put("b", make_context())
        assert store.cache_many([("b", make_context())]) == 0 and store.failed_writes == 1
    assert "opened read-only" in caplog.text
    assert not (tmp_path / f"{DB_NAME}-wal").exists()  # nothing was written beside it
    (tmp_path / f"{DB_NAME}-wal").write_bytes(b"x" * 100)  # a killed writer's log
    with pytest.raises(StoreWriteError, match="write-ahead log"):
        LatentStore(tmp_path, readonly=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_store_in_a_readonly_directory_opens_readonly(tmp_path):
    with LatentStore(tmp_path / "s", FP) as store:
        store.put("a", make_context())
    (tmp_path / "s").chmod(0o555)
    try:
        with LatentStore(tmp_path / "s", FP) as store:
            assert store.readonly and store.get("a") is not None
    finally:
        (tmp_path / "s").chmod(0o755)


# --- full disk ------------------------------------------------------------------------------------


def test_full_disk_is_a_write_error_and_a_cache_write_degrades(tmp_path, monkeypatch, caplog):
    import errno

    with LatentStore(tmp_path, FP) as store:
        store.put("a", make_context())
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full"
        big = [(f"k{i}", make_context(64, 8)) for i in range(40)]
        with pytest.raises(StoreWriteError, match="disk is full"):
            store.put_many(big)
        with caplog.at_level("WARNING"):
            assert store.cache_many(big) == 0
        assert store.failed_writes == 40 and "not cached" in caplog.text
        assert store.keys() == ["a"] and store.verify() == 1  # nothing half-written

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with LatentStore(tmp_path, FP) as store:
        monkeypatch.setattr(LatentStore, "put_many", full)
        assert store.cache_many([("b", make_context())]) == 0 and store.failed_writes == 1
        monkeypatch.undo()
        with pytest.raises(ValueError, match="overflow"):  # bad latents still raise
            store.cache_many([("c", CompressedContext(torch.full((1, 8), 1e9), 1, (4.0,), (2.0,)))])


# --- files written beside the store (atomic_write) ----------------------------------------------


def test_atomic_write_respects_the_umask_and_never_leaves_half_a_file(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "chunks.jsonl", lambda handle: handle.write(b"one"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, like the database

    def fail_midway(handle) -> None:
        handle.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(path, fail_midway)
    assert path.read_bytes() == b"one"
    assert [p.name for p in tmp_path.iterdir()] == ["chunks.jsonl"]


SAVER = (
    "import sys\n"
    "from semidyn_rag.store import atomic_write\n"
    "data = bytes(8 * 2**20)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    atomic_write(sys.argv[1], lambda handle: handle.write(data))\n"
)


@pytest.mark.integration  # subprocesses
def test_killed_atomic_write_leaves_no_temp_files_a_rerun_keeps(tmp_path):
    target = tmp_path / "chunks.jsonl"
    for _ in range(20):  # kill mid-write until a temporary file is left behind
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 20
        while not list(tmp_path.glob(".*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if list(tmp_path.glob(".*.tmp")):
            break
    assert list(tmp_path.glob(".*.tmp")), "no kill landed mid-write"
    if target.exists():
        assert target.stat().st_size == 8 * 2**20  # the last complete write
    atomic_write(target, lambda handle: handle.write(b"new"))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


# --- corpus manifest ----------------------------------------------------------------------------


def test_sync_by_document_replaces_and_prunes(tmp_path):
    from semidyn_rag.store import ManifestRow

    def rows(doc: str, texts: list[str], policy: str = POLICY) -> list[ManifestRow]:
        return [
            ManifestRow(f"{doc}#{i}", policy, doc, entry_key(t, FP, policy), text_hash(t))
            for i, t in enumerate(texts)
        ]

    with LatentStore(tmp_path, FP) as store:
        first = rows("a", ["one", "two", "three"]) + rows("b", ["two", "four"])
        store.put_many((r.key, make_context()) for r in first)
        assert store.plan_sync(first, dry_run=False).removed_ids == []
        # "a" is edited: "two" changes, "three" vanishes; "b" is not part of this run
        edited = rows("a", ["one", "TWO"])
        store.put_many((r.key, make_context()) for r in edited)
        plan = store.plan_sync(edited, dry_run=False)
        assert (plan.removed_ids, plan.changed_ids) == (["a#2"], ["a#1"])
        assert plan.deleted_entries == 1  # "three"; "two" is still b's
        keys = {r.key for r in edited + rows("b", ["two", "four"])}
        assert set(store.keys()) == keys and store.info().documents == 2
        pruned = store.plan_sync(edited, prune=True, dry_run=False)
        assert pruned.pruned_docs == ["b"] and pruned.removed_ids == ["b#0", "b#1"]
        assert set(store.keys()) == {r.key for r in edited}
        store.put("cache-only", make_context())
        assert store.prune(dry_run=True).unreferenced_entries == 1
        assert store.prune().unreferenced_entries == 1 and "cache-only" not in store
        assert store.check().ok
