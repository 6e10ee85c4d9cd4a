"""LatentStore and VectorIndex on real SQLite and FAISS files, with killed and parallel processes."""

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
    DB_NAME,
    INDEX_NAME,
    LatentStore,
    StoreCorruptError,
    StoreError,
    StoreInfo,
    StoreMismatchError,
    StoreVersionError,
    VectorIndex,
    entry_key,
    policy_key,
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


def test_vector_index_add_search_remove_and_reload(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    ids = [f"doc{i}" for i in range(20)]
    with LatentStore(tmp_path, FP) as store:
        index = store.vector_index(dim=8)
        index.add(ids, vectors)
        [(hits, scores)] = index.search(vectors[3] * 5, k=3)  # cosine: the norm does not matter
        assert hits[0] == "doc3" and len(hits) == 3 and scores[0] == pytest.approx(1.0, abs=1e-5)
        assert index.remove(["doc3", "unknown"]) == 1 and "doc3" not in index
        index.save()
        assert store.info().files[INDEX_NAME] > 0
        loaded = store.vector_index()
        with pytest.raises(ValueError, match="8-d"):
            store.vector_index(dim=16)
    assert len(loaded) == 19 and loaded.metric == "cosine"
    assert loaded.search(vectors, 2) == index.search(vectors, 2)
    assert "doc3" not in loaded.search(vectors[3], 19)[0][0]
    loaded.add(["doc0"], vectors[5])  # a known id gets its new vector
    assert sorted(loaded.search(vectors[5], 2)[0][0]) == ["doc0", "doc5"]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_vector_index_metrics_sizes_and_errors(tmp_path):
    index = VectorIndex(2, "l2")
    assert index.search([[0.0, 0.0]], k=3) == [([], [])]
    index.add(["a", "b"], [[0.0, 0.0], [3.0, 4.0]])
    assert index.search([[0.0, 1.0]], k=5) == [(["a", "b"], [1.0, 18.0])]
    with pytest.raises(ValueError, match="3-d vectors"):
        VectorIndex(3).add(["a"], [[1.0, 2.0]])
    with pytest.raises(ValueError, match="holds 2-d"):
        index.search(np.zeros((1, 3)), k=1)
    with pytest.raises(ValueError, match="2 ids for 1"):
        index.add(["c", "d"], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="repeat"):
        index.add(["c", "c"], [[1.0, 1.0], [2.0, 2.0]])
    with pytest.raises(ValueError, match="give a path"):
        index.save()
    index.save(tmp_path / "l2.npz")
    assert VectorIndex.load(tmp_path / "l2.npz").search([[3.0, 4.0]], 1) == [(["b"], [0.0])]
    (tmp_path / "bad.npz").write_bytes(b"not an index")
    with pytest.raises(StoreCorruptError, match="not a readable vector index"):
        VectorIndex.load(tmp_path / "bad.npz")


def test_vector_index_with_an_embedding_function():
    def embed(texts: list[str]) -> list[list[float]]:  # any callable, e.g. embed_documents
        return [[float(text.count(c)) for c in "abcd"] for text in texts]

    index = VectorIndex(4, "ip", embed=embed)
    index.add_texts(["x", "y"], ["aaab", "cccd"])
    assert index.search_texts(["ccc", "aa"], k=1) == [(["y"], [9.0]), (["x"], [6.0])]
    with pytest.raises(ValueError, match="no embed function"):
        VectorIndex(4).search_texts(["a"], k=1)


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
