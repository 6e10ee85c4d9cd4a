"""Offline precompression on a real tiny checkpoint: killed mid-run, resumed, checked entry by entry."""

from __future__ import annotations

import itertools
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semidyn_rag import precompress as precompress_module
from semidyn_rag.cli import main
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.precompress import (
    CPU_BATCH_TOKENS,
    Chunk,
    CorpusError,
    CorpusRowError,
    Document,
    Executor,
    LocalExecutor,
    PrecompressConfig,
    chunk_documents,
    load_chunks,
    pass_budget,
    plan_batches,
    precompress,
    precompress_corpus,
    read_corpus,
    token_chunks,
    token_spans,
)
from semidyn_rag.store import DB_NAME, LatentStore, StoreMismatchError, entry_key, text_hash
from semidyn_rag.testing import CORPUS, EncodeCounter, save_tiny_compressor

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


@pytest.mark.integration  # a SIGKILLed subprocess
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


def test_duplicates_are_compressed_once(tmp_path, model, corpus, counter):
    chunks = load_chunks([corpus], CONFIG, model.tokenizer)
    store_dir = tmp_path / "store"
    config = CONFIG.model_copy(update={"batch_tokens": 200, "write_batch": 3})
    report = precompress(model, chunks, store_dir, config)
    unique = len(expected_entries(model, chunks))
    assert counter.rows == report.new == unique < len(chunks)
    assert report.tokens == sum(len(t) for t in model.tokenize(list({c.text for c in chunks})))
    assert_store_complete(store_dir, model, chunks)
    with LatentStore(store_dir, model.fingerprint) as store:  # every chunk id, duplicates too
        assert {r.id for r in store.manifest()} == {c.id for c in chunks}
    counter.calls = 0
    again = precompress(model, chunks, store_dir, config)
    assert (counter.calls, again.new) == (0, 0)


class RecordingExecutor(LocalExecutor):
    """The local executor, noting what the job asked of it."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def recover(self, store: LatentStore) -> None:
        self.calls.append(("recover", len(store)))

    def run(self, compressor, store, plan, config) -> tuple[int, int]:
        self.calls.append(("run", len(plan.todo)))
        return super().run(compressor, store, plan, config)


def test_the_job_drives_any_executor_the_same_way(tmp_path, model, corpus):
    """Planning, the sync and the report are the job's; the executor only compresses what is
    missing, after recovering a killed run's work, and names the backend."""
    executor = RecordingExecutor()
    assert isinstance(executor, Executor) and isinstance(LocalExecutor(), Executor)
    chunks, report = precompress_corpus(model, [corpus], tmp_path / "s", CONFIG, executor=executor)
    unique = len(expected_entries(model, chunks))
    assert executor.calls == [("recover", 0), ("run", unique)]
    assert report.backend == "recording" and report.new == unique
    assert_store_complete(tmp_path / "s", model, chunks)
    executor.calls.clear()
    again = precompress(model, chunks, tmp_path / "s", CONFIG, executor=executor)
    assert executor.calls == [("recover", unique)]  # nothing missing: never run
    assert (again.new, again.skipped, again.backend) == (0, unique, "recording")
    local = precompress_corpus(model, [corpus], tmp_path / "local", CONFIG)[1]
    assert local.backend == "local"
    assert local.model_dump(exclude={"store", "seconds", "backend"}) == report.model_dump(
        exclude={"store", "seconds", "backend"}
    )


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
    assert all(len(ids) <= 16 for ids in model.tokenize(pieces))  # within the budget, exactly
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


def test_first_pass_has_its_own_budget():
    lengths = [10] * 9  # width 11 with the <eos>: 4 rows fit in 44 tokens, 2 in 22
    batches = plan_batches(
        lengths, batch_tokens=44, max_rows=64, segment_tokens=64, first_batch_tokens=22
    )
    assert [len(b) for b in batches] == [2, 4, 3]
    whole = plan_batches(lengths, batch_tokens=44, max_rows=64, segment_tokens=64)
    assert [len(b) for b in whole] == [4, 4, 1]
    assert plan_batches([100], batch_tokens=44, max_rows=64, segment_tokens=64,
                        first_batch_tokens=1) == [[0]]  # fmt: skip


def test_cpu_passes_are_small_unless_the_budget_is_given():
    assert pass_budget(PrecompressConfig(), "cpu") == CPU_BATCH_TOKENS < 8192
    assert pass_budget(PrecompressConfig(), "cuda:0") == 8192
    given = PrecompressConfig(batch_tokens=8192)
    assert pass_budget(given, "cpu") == 8192
    assert pass_budget(PrecompressConfig().model_copy(update={"batch_tokens": 4096}), "cpu") == 4096
    assert pass_budget(PrecompressConfig(batch_tokens=64), "cpu") == 64


def test_progress_moves_per_encoder_pass_with_rates(tmp_path, model, corpus, monkeypatch):
    """The bar advances after every pass, the first one within a small first budget, and shows
    chunks/s and tok/s (a first pass of the whole corpus left it at 0 until the end)."""
    updates: list[tuple[int, int, str]] = []

    class Recording(precompress_module.Throughput):
        def update(self, chunks: int, tokens: int) -> None:
            super().update(chunks, tokens)
            updates.append((chunks, self.bar.n, str(self.bar.postfix)))

    monkeypatch.setattr(precompress_module, "Throughput", Recording)
    chunks = load_chunks([corpus], CONFIG, model.tokenizer)
    widest = max(len(t) for t in model.tokenize([c.text for c in chunks])) + 1
    config = CONFIG.model_copy(update={"batch_tokens": 4 * widest, "progress": True})
    report = precompress(model, chunks, tmp_path / "store", config)
    assert len(updates) >= 3 and updates[-1][1] == report.new
    assert [n for _, n, _ in updates] == sorted({n for _, n, _ in updates})  # moves every time
    assert updates[0][0] == 1 < max(c for c, _, _ in updates)  # a quarter budget: one row first
    assert all("chunks/s" in postfix and "tok/s" in postfix for *_, postfix in updates)


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


# --- token chunking: exact slices within the budget ---------------------------------------------

ALPHABETS = st.sampled_from(
    ["abc xyz", "日本語テキスト中文字", "😀👨‍👩‍👧🎉", "é ü ß", " \n\t", "The fox. Paris"]
)
TEXTS = st.lists(ALPHABETS.flatmap(lambda a: st.text(alphabet=a, min_size=1, max_size=12)),
                 max_size=12).map("".join)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=TEXTS, size=st.integers(4, 24), overlap_share=st.sampled_from([0.0, 0.25, 0.5]))
def test_token_chunks_are_exact_slices_within_the_budget(model, text, size, overlap_share):
    overlap = int(size * overlap_share)
    spans = token_spans(text, model.tokenizer, size, overlap)
    chunks = token_chunks(text, model.tokenizer, size, overlap)
    assert chunks == [text[a:b] for a, b in spans]
    for chunk in chunks:
        assert chunk and chunk == chunk.strip()
        assert len(model.tokenizer(chunk, add_special_tokens=False)["input_ids"]) <= size
    starts = [a for a, _ in spans]
    assert starts == sorted(set(starts))  # every window moves forward
    covered = set().union(*(range(a, b) for a, b in spans)) if spans else set()
    assert {i for i, ch in enumerate(text) if not ch.isspace()} <= covered  # nothing dropped
    if overlap == 0:  # no character is repeated across a chunk edge
        assert all(b <= a2 for (_, b), (a2, _) in itertools.pairwise(spans))


def test_cjk_and_emoji_chunks_do_not_repeat_characters(model):
    text = "東京は日本の首都です。" * 30 + "😀🎉" * 40
    chunks = token_chunks(text, model.tokenizer, 16, 0)
    assert "".join(chunks) == text  # no whitespace here: the chunks tile the text exactly
    assert max(len(model.tokenize([c])[0]) for c in chunks) <= 16
    with pytest.raises(ValueError, match="single character"):
        token_chunks("😀", model.tokenizer, 2, 0)  # one emoji is 4 byte-level tokens


# --- corpus edits: sync by document ---------------------------------------------------------------


def test_edited_shortened_and_removed_documents_leave_no_stale_data(tmp_path, model, corpus):
    store_dir = tmp_path / "store"
    chunks, first = precompress_corpus(model, [corpus], store_dir, CONFIG)
    old_doc1 = [c for c in chunks if c.doc_id == "doc1.txt"]
    assert len(old_doc1) > 2 and first.removed_chunks == 0
    (corpus / "doc1.txt").write_text("Zebras graze quietly on the savanna at dawn.")  # shortened
    (corpus / "doc2.txt").unlink()
    edited, report = precompress_corpus(model, [corpus], store_dir, CONFIG)
    new_doc1 = {c.id: c.text for c in edited if c.doc_id == "doc1.txt"}
    vanished = [c for c in old_doc1 if c.id not in new_doc1]
    assert vanished and report.removed_chunks == len(vanished)
    assert report.changed_chunks == len(new_doc1)  # every remaining id holds new text
    assert report.deleted_entries > 0 and report.pruned_documents == 0
    with LatentStore(store_dir, model.fingerprint) as store:
        manifest = {r.id: r.text_hash for r in store.manifest()}
        assert not any(c.id in manifest for c in vanished)  # vanished ids are out of the manifest
        assert all(manifest[i] == text_hash(t) for i, t in new_doc1.items())  # the new text
        assert any(i.startswith("doc2.txt#") for i in manifest)  # kept without prune
    pruned = precompress(model, edited, store_dir, CONFIG.model_copy(update={"prune": True}))
    assert pruned.pruned_documents == 1 and pruned.removed_chunks > 0
    want = expected_entries(model, edited)
    with LatentStore(store_dir, model.fingerprint) as store:
        assert set(store.keys()) == set(want)  # exactly the corpus: no stale entry
        assert {r.id for r in store.manifest()} == {c.id for c in edited}
        assert store.check().ok and store.info().documents == len({c.doc_id for c in edited})
    assert main(["store", "prune", str(store_dir), "--dry-run"]) == 0


def test_emptied_document_loses_its_old_chunks_and_is_reported(tmp_path, model, corpus):
    store_dir = tmp_path / "store"
    chunks, _ = precompress_corpus(model, [corpus], store_dir, CONFIG)
    old = [c for c in chunks if c.doc_id == "doc1.txt"]
    (corpus / "doc1.txt").write_text("  \n")  # emptied, still in the corpus
    edited, report = precompress_corpus(model, [corpus], store_dir, CONFIG)
    assert edited.empty_documents == ["doc1.txt"]
    assert report.emptied_documents == 1 and report.removed_chunks == len(old)
    assert "documents emptied (old chunks removed) | 1" in report.markdown()
    with LatentStore(store_dir, model.fingerprint) as store:
        assert not any(r.doc_id == "doc1.txt" for r in store.manifest())
        assert set(store.keys()) == set(expected_entries(model, edited))  # no stale latents
    again = precompress_corpus(model, [corpus], store_dir, CONFIG)[1]
    assert again.emptied_documents == 0 and again.removed_chunks == 0  # reported once


def test_blank_jsonl_row_with_an_id_empties_that_document(tmp_path, model):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": "a", "text": "Paris is the capital of France."}\n')
    precompress_corpus(model, [jsonl], tmp_path / "store", CONFIG)
    jsonl.write_text('{"id": "a", "text": " "}\n{"id": "b", "text": "Oslo is in Norway."}\n')
    _, report = precompress_corpus(model, [jsonl], tmp_path / "store", CONFIG)
    assert report.emptied_documents == 1
    with LatentStore(tmp_path / "store", model.fingerprint) as store:
        assert {r.doc_id for r in store.manifest()} == {"b"}


def test_a_file_keeps_its_document_id_alone_or_in_its_directory(tmp_path, corpus):
    (corpus / "sub" / "a.txt").write_text("Lyon lies on the Rhone.")
    by_dir = {d.id for d in read_corpus(corpus)}
    alone = [d.id for d in read_corpus(corpus / "sub" / "a.txt", root=corpus)]
    assert alone == ["sub/a.txt"] and "sub/a.txt" in by_dir
    assert {d.id for d in read_corpus(corpus, root=corpus)} == by_dir
    assert [d.id for d in read_corpus(corpus / "sub" / "a.txt")] == ["a.txt"]  # the default
    with pytest.raises(CorpusError, match="not under the corpus root"):
        list(read_corpus(corpus / "sub" / "a.txt", root=tmp_path / "elsewhere"))


def test_each_skipped_row_is_logged_once(tmp_path, model, caplog):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": "a", "text": "Paris."}\n{"id": "b", "text": "broken\n')
    with caplog.at_level("DEBUG", logger="semidyn_rag.precompress"):
        precompress_corpus(model, [jsonl], tmp_path / "store", CONFIG)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "c.jsonl:2" in r.message]
    assert len(warned) == 1


# --- inputs with errors: named, counted, skipped ---------------------------------------------------


def test_lone_surrogate_row_is_skipped_and_reported(tmp_path, model, capsys):
    jsonl = tmp_path / "c.jsonl"
    rows = [
        '{"id": "a", "text": "Paris is the capital of France."}',
        '{"id": "b", "text": "half an emoji \\ud83d here"}',
        '{"id": "c", "text": "broken json',
        '{"id": "d", "text": "Berlin is the capital of Germany."}',
    ]
    jsonl.write_text("\n".join(rows) + "\n")
    with pytest.raises(CorpusRowError, match=r"c.jsonl:2: the text has a lone surrogate"):
        list(read_corpus(jsonl))
    chunks, report = precompress_corpus(model, [jsonl], tmp_path / "store", CONFIG)
    assert {c.doc_id for c in chunks} == {"a", "d"} and report.new == 2
    assert report.invalid_count == 2
    assert report.invalid[0].startswith(f"{jsonl}:2: the text has a lone surrogate")
    assert report.invalid[1].startswith(f"{jsonl}:3: invalid JSON")
    assert "Skipped inputs:" in report.markdown()
    # a chunk handed over directly is checked too
    bad = Chunk("x#0", "x", "tail \ud800", {})
    direct = precompress(model, [*chunks, bad], tmp_path / "store", CONFIG)
    assert direct.invalid_count == 1 and "chunk x#0" in direct.invalid[0]
    everything_bad = tmp_path / "bad.jsonl"
    everything_bad.write_text(rows[1] + "\n")
    with pytest.raises(CorpusError, match="no usable document"):
        precompress_corpus(model, [everything_bad], tmp_path / "store2", CONFIG)


def test_chunk_longer_than_the_decoder_can_read_is_refused_by_name(tmp_path, model, monkeypatch):
    base = model.decoder.get_base_model().config
    monkeypatch.setattr(base, "max_position_embeddings", 64)
    top = max(model.config.ratios)
    long_text = " ".join(SENTENCES * 40)  # far more than 64 x top tokens
    assert len(model.tokenize([long_text])[0]) > 64 * top
    chunks = [Chunk("big#0", "big", long_text, {}), Chunk("ok#0", "ok", SENTENCES[0], {})]
    report = precompress(model, chunks, tmp_path / "store", CONFIG)
    assert report.new == 1 and report.invalid_count == 1
    assert "chunk big#0" in report.invalid[0] and "64 positions" in report.invalid[0]
    assert "max_position_embeddings" in report.invalid[0]


def test_chunks_out_writes_document_metadata_once(tmp_path, model):
    from semidyn_rag.precompress import documents_path, save_chunks

    big = {"blob": "x" * 100_000, "lang": "en"}
    doc = Document("d", " ".join(SENTENCES * 4), big)
    chunks = chunk_documents([doc], tokenizer=model.tokenizer, chunk_tokens=24, overlap_tokens=4)
    assert len(chunks) > 5
    old = os.umask(0o022)
    try:
        path = save_chunks(chunks, [f"k{i}" for i in range(len(chunks))], tmp_path / "c.jsonl")
    finally:
        os.umask(old)
    assert path.stat().st_size < 100_000  # the metadata is not copied into every chunk
    assert path.stat().st_mode & 0o777 == 0o644
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["metadata"] for r in rows] == [{"chunk_index": i} for i in range(len(chunks))]
    docs = [json.loads(line) for line in documents_path(path).read_text().splitlines()]
    assert docs == [{"doc_id": "d", "metadata": big}]


# --- the fingerprint moves with every weight that shapes the latents -------------------------------


def test_fingerprint_follows_the_weights(tmp_path, checkpoint):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint.parent, copy)
    config_file = copy / "compressor" / "semidyn_config.json"
    config = json.loads(config_file.read_text())
    config["encoder_model"] = str(copy / "base")  # the copy's own base, changed below
    config_file.write_text(json.dumps(config))
    first = SemiDynamicCompressor.from_pretrained(copy / "compressor").eval()
    fp = first.fingerprint
    assert SemiDynamicCompressor.from_pretrained(copy / "compressor").fingerprint == fp
    # the base's transformer weights replaced at the same path
    weights = copy / "base" / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if ".layers.0." in k and "mlp" in k)
    state[name] = state[name] + 0.01
    save_file(state, weights, metadata={"format": "pt"})
    changed = SemiDynamicCompressor.from_pretrained(copy / "compressor").eval()
    assert changed.fingerprint != fp
    # new converter weights loaded into a live model
    live = changed.fingerprint
    changed.converter.load_state_dict(
        {k: v * 1.5 for k, v in changed.converter.state_dict().items()}
    )
    assert changed.fingerprint != live
    moved = changed.fingerprint
    with torch.no_grad():
        next(p for n, p in changed.named_parameters() if "lora_" in n).add_(0.1)
    assert changed.fingerprint != moved
    before = changed.fingerprint
    changed.load_state_dict(changed.state_dict())  # every version moves, the values do not
    assert changed.fingerprint == before
    LatentStore(tmp_path / "s", fp).close()  # a store of the weights before the change
    with pytest.raises(StoreMismatchError):
        precompress(changed, [Chunk("a#0", "a", "some text", {})], tmp_path / "s", CONFIG)
