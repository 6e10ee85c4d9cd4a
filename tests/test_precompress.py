"""Offline precompression on a real tiny checkpoint: killed mid-run, resumed, checked entry by entry."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import CORPUS

from semidyn_rag.cli import main
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.precompress import (
    Chunk,
    Document,
    PrecompressConfig,
    chunk_documents,
    load_chunks,
    plan_batches,
    precompress,
    precompress_corpus,
    read_corpus,
    token_chunks,
)
from semidyn_rag.store import DB_NAME, LatentStore, StoreMismatchError, entry_key
from semidyn_rag.testing import EncodeCounter, hashing_embedding, save_tiny_compressor

SENTENCES = CORPUS[:5]
CONFIG = PrecompressConfig(chunk_tokens=24, chunk_overlap=4, progress=False)
FLAGS = ["--chunk-tokens", "24", "--chunk-overlap", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_compressor(tmp_path_factory.mktemp("precompress"), CORPUS)


@pytest.fixture(scope="module")
def model(checkpoint) -> SemiDynamicCompressor:
    return SemiDynamicCompressor.from_pretrained(checkpoint).eval()


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Six text files; ``sub/copy.md`` repeats ``doc0.txt``, so its chunks are duplicates."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / f"doc{i}.txt").write_text(" ".join(SENTENCES[(i + j) % 5] for j in range(4)))
    (root / "sub" / "copy.md").write_text((root / "doc0.txt").read_text())
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("never read")
    return root


@pytest.fixture
def counter(model) -> Iterator[EncodeCounter]:
    """Counts the real encoder passes of ``model`` during one test."""
    counting = EncodeCounter(model)
    yield counting
    del model.encode  # back to the class's method


def expected_entries(model: SemiDynamicCompressor, chunks: list[Chunk]) -> dict[str, str]:
    """Store key -> text of every distinct chunk text."""
    return {entry_key(c.text, model.fingerprint, CONFIG.policy): c.text for c in chunks}


def assert_store_complete(store_dir: Path, model: SemiDynamicCompressor, chunks: list[Chunk]):
    """Exactly one entry per distinct chunk text, each equal to a fresh ``compress`` of it."""
    want = expected_entries(model, chunks)
    with LatentStore(store_dir, model.fingerprint) as store:
        assert set(store.keys()) == set(want)
        stored = store.get_many(want)
        assert store.verify() == len(want)
    texts = list(want.values())
    fresh = model.compress(texts, CONFIG.scale)
    for key, ctx in zip(want, fresh):
        got = stored[key]
        assert got.latents.dtype == torch.float16
        torch.testing.assert_close(got.latents, ctx.latents.to(torch.float16), atol=1e-3, rtol=1e-2)
        assert got.num_tokens == ctx.num_tokens
        assert got.segment_ratios == ctx.segment_ratios
    with sqlite3.connect(store_dir / DB_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


# The child slows every encoder pass so that the test can kill it between commits.
CHILD = (
    "import sys, time\n"
    "from semidyn_rag.modeling import SemiDynamicCompressor as M\n"
    "real = M.encode\n"
    "def slow(self, contexts):\n"
    "    time.sleep(0.25)\n"
    "    return real(self, contexts)\n"
    "M.encode = slow\n"
    "from semidyn_rag.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def stored_count(store_dir: Path) -> int:
    """Committed entries while the child writes, read as an independent read-only process would
    (0 while the schema is not committed, or while the WAL index is busy)."""
    db = store_dir / DB_NAME
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=1)
    try:
        return conn.execute("SELECT count(*) FROM entries").fetchone()[0]
    except sqlite3.DatabaseError:
        return 0
    finally:
        conn.close()


def test_killed_run_resumes_to_a_complete_store(tmp_path, checkpoint, model, corpus, counter):
    chunks = load_chunks([corpus], CONFIG, model.tokenizer)
    unique = len(expected_entries(model, chunks))
    assert unique < len(chunks)  # the corpus has duplicates
    store_dir = tmp_path / "store"
    args = ["-q", "precompress", str(corpus), "--store", str(store_dir)]
    args += ["--compressor", str(checkpoint), *FLAGS, "--batch-tokens", "1", "--write-batch", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while child.poll() is None and stored_count(store_dir) == 0:
            assert time.monotonic() < deadline, "the child stored nothing in 120 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    with LatentStore(store_dir) as store:  # a writable open recovers the killed writer's WAL
        done = len(store)
    assert 1 <= done < unique

    _, report = precompress_corpus(model, [corpus], store_dir, CONFIG)
    assert (report.chunks, report.unique, report.skipped) == (len(chunks), unique, done)
    assert report.new == unique - done == counter.rows  # each missing text encoded once
    assert report.duplicates == len(chunks) - unique
    assert_store_complete(store_dir, model, chunks)

    counter.calls = counter.rows = 0
    _, again = precompress_corpus(model, [corpus], store_dir, CONFIG)
    assert counter.calls == 0
    assert (again.new, again.skipped, again.tokens) == (0, unique, 0)


def test_duplicates_are_compressed_once_and_index_is_filled(tmp_path, model, corpus, counter):
    chunks = load_chunks([corpus], CONFIG, model.tokenizer)
    store_dir = tmp_path / "store"
    config = CONFIG.model_copy(update={"batch_tokens": 200, "write_batch": 3})
    report = precompress(model, chunks, store_dir, config, embed=embed)
    unique = len(expected_entries(model, chunks))
    assert counter.rows == report.new == unique < len(chunks)
    assert report.tokens == sum(len(t) for t in model.tokenize(list({c.text for c in chunks})))
    assert report.embedded == len(chunks)  # the index holds every chunk id, duplicates included
    assert_store_complete(store_dir, model, chunks)
    with LatentStore(store_dir, model.fingerprint) as store:
        index = store.vector_index(embed=embed)
        assert len(index) == len(chunks)
        top = index.search_texts([chunks[3].text], k=1)[0][0][0]
        assert next(c for c in chunks if c.id == top).text == chunks[3].text
    counter.calls = 0
    again = precompress(model, chunks, store_dir, config, embed=embed)
    assert (counter.calls, again.embedded, again.new) == (0, 0, 0)


def embed(texts: list[str]) -> list[list[float]]:
    return [hashing_embedding(t, dim=64) for t in texts]


def test_store_of_another_compressor_is_refused(tmp_path, model, corpus):
    with (
        LatentStore(tmp_path / "store", "someone-else") as store,
        pytest.raises(StoreMismatchError),
    ):
        precompress(model, [Chunk("a#0", "a", "some text", {})], store, CONFIG)


def test_token_chunks_are_verbatim_overlapping_windows(model):
    text = " ".join(SENTENCES * 2)
    pieces = token_chunks(text, model.tokenizer, 16, 4)
    assert len(pieces) > 3
    assert all(p in text for p in pieces)
    assert all(len(ids) <= 17 for ids in model.tokenize(pieces))  # edges may re-tokenize by one
    assert pieces[0][-5:] in pieces[1]  # the overlap carries the end of one chunk into the next
    assert token_chunks("short text", model.tokenizer, 16, 4) == ["short text"]


def test_user_splitters_are_duck_typed(model):
    from langchain_text_splitters import RecursiveCharacterTextSplitter
    from llama_index.core.node_parser import MarkdownNodeParser, SentenceSplitter

    docs = [Document("d", " ".join(SENTENCES))]
    for splitter in (
        RecursiveCharacterTextSplitter(chunk_size=80, chunk_overlap=0),
        SentenceSplitter(chunk_size=30, chunk_overlap=0),
        lambda text: text.split(". "),
    ):
        chunks = chunk_documents(docs, splitter=splitter)
        assert len(chunks) > 1
        assert [c.id for c in chunks] == [f"d#{i}" for i in range(len(chunks))]
        assert all(c.doc_id == "d" and c.metadata["chunk_index"] == i for i, c in enumerate(chunks))
    markdown = [Document("m", "# One\n\nfirst part\n\n# Two\n\nsecond part")]
    sections = chunk_documents(markdown, splitter=MarkdownNodeParser())  # a NodeParser only
    assert [c.text for c in sections] == ["# One\n\nfirst part", "# Two\n\nsecond part"]


def test_read_corpus_formats(tmp_path):
    rows = [
        {"id": 7, "text": "first text", "metadata": {"lang": "en"}, "year": 2020},
        {"content": "second text"},
        {"text": "   "},
    ]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "p", "context": "third text"}]), parquet)
    docs = [*read_corpus(jsonl), *read_corpus(parquet)]
    assert [d.text for d in docs] == ["first text", "second text", "third text"]
    assert docs[0].id == "7" and docs[0].metadata == {"lang": "en", "year": 2020}
    assert len(docs[1].id) == 16 and docs[2].id == "p"  # no id: a hash of the text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match="text fields"):
        list(read_corpus(bad))


def test_plan_batches_respects_the_token_budget():
    lengths = [5, 100, 30, 30, 7, 64, 1, 12]
    batches = plan_batches(lengths, batch_tokens=128, max_rows=3, segment_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)  # longest first
    for batch in batches:
        segs = sum(-(-max(lengths[i], 1) // 64) for i in batch)
        width = min(max(lengths[i] for i in batch), 64) + 1
        assert len(batch) == 1 or (segs * width <= 128 and segs <= 3)


def test_cli_store_info(tmp_path, checkpoint, corpus, capsys):
    store_dir = tmp_path / "store"
    base = ["-q", "precompress", str(corpus), "--store", str(store_dir)]
    assert main([*base, "--compressor", str(checkpoint), *FLAGS, "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["new"] == report["unique"] > 0
    assert main(["store", "info", str(store_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == report["unique"]
    assert info["latents"] == report["latents"]
    assert main(["store", "info", str(store_dir)]) == 0
    assert "| entries |" in capsys.readouterr().out
    assert main(["store", "check", str(store_dir)]) == 0
