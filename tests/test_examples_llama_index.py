"""The LlamaIndex example scripts, run for real on tiny checkpoints and the real all-MiniLM-L6-v2
embedding. They live in the monorepo (not in the integration's package tests): examples/ is not
part of any distribution."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from semidyn_rag.metrics import normalize_answer
from semidyn_rag.testing import save_paper_layout

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import own_documents  # noqa: E402
import paper_checkpoint  # noqa: E402
import rag_demo  # noqa: E402

FAST = ["--max-new-tokens", "3", "-q"]
SUBSET = ("rhine.md", "octopus.md", "marie_curie.md")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three of the shipped documents and their questions (embedding all ten costs seconds)."""
    corpus = EXAMPLES / "corpus"
    out = tmp_path_factory.mktemp("corpus")
    for name in SUBSET:
        shutil.copy(corpus / name, out / name)
    lines = (corpus / "questions.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["doc"] in SUBSET]
    (out / "questions.jsonl").write_text("\n".join(kept) + "\n")
    return out


def test_shipped_corpus_answers_its_questions() -> None:
    """Every question names an existing document, and that document states the answer."""
    corpus = EXAMPLES / "corpus"
    questions = rag_demo.read_questions(corpus / "questions.jsonl")
    assert len(questions) >= 10
    docs = sorted(p.name for p in corpus.glob("*.md"))
    assert 8 <= len(docs) <= 12
    for q in questions:
        text = normalize_answer((corpus / q.doc).read_text())
        assert any(normalize_answer(a) in text for a in q.answers), q


@pytest.mark.slow  # an example script end to end
def test_rag_demo_report(compressor_dir: Path, small_corpus: Path, tmp_path: Path, capsys) -> None:
    store = tmp_path / "store"
    argv = [
        "--compressor",
        str(compressor_dir),
        "--store",
        str(store),
        "--corpus",
        str(small_corpus),
    ]
    assert rag_demo.main([*argv, "--limit", "2", *FAST]) == 0  # rhine and curie
    report = capsys.readouterr().out
    chunks = int(re.search(r"(\d+) chunks: (\d+) compressed now, 0 already", report)[1])
    assert chunks >= len(SUBSET)
    assert len(re.findall(r"\.md +\d+ +\d+ +[\d.+]+ +\d+\n", report)) == chunks  # a row per chunk
    assert "average compression ratio" in report
    assert "Q: Into which sea do the waters of the Rhine flow?" in report
    assert "rhine.md @ " in report  # the gold chunk was retrieved, with its ratio
    # two questions x two chunks: pass 1 reads the store, pass 2 the service's memory
    assert re.search(r"pass 1 \(store\).*\n +latents from: store 4, memory 0, encoder 0", report)
    assert re.search(r"pass 2 \(memory\).*\n +latents from: store 0, memory 4, encoder 0", report)
    assert re.search(r"baseline \(plain text\) .* context \d+ tokens, answer", report)
    assert re.search(r"time: compressed [\d.]+ s vs plain text [\d.]+ s", report)
    # selective expansion: per question the best chunk as text, the other one's latents
    assert re.search(r"k=1 as text .* context \d+ positions, answer", report)
    assert re.search(r"k=1 as text.*\n +latents from: store 0, memory 2, encoder 0", report)
    assert len(re.findall(r"\n   k=1 as text: '", report)) == 2
    table = report.split("== All-latent vs selective expansion vs plain text ==")[1]
    rows = re.findall(
        r"\n(all latent \(pass 1\)|k=1 as text|plain text \(base\)) +(\d)/2 +(\d+)", table
    )
    assert [r[0] for r in rows] == ["all latent (pass 1)", "k=1 as text", "plain text (base)"]
    latent, mixed, plain = (int(r[2]) for r in rows)
    assert latent < mixed < plain  # one chunk's tokens replace its latents


@pytest.mark.slow  # an example script end to end
def test_own_documents(compressor_dir: Path, tmp_path: Path, capsys) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fox.txt").write_text("The quick brown fox jumps over the lazy dog near the river.")
    (docs / "paris.md").write_text("Paris is the capital of France, on the river Seine.")
    argv = [str(docs), "--store", str(tmp_path / "store"), "--compressor", str(compressor_dir)]
    assert own_documents.main([*argv, "--question", "What is the capital of France?", *FAST]) == 0
    out = capsys.readouterr().out
    assert "Q: What is the capital of France?" in out
    assert re.search(r"- paris\.md \(score [\d.]+\): \d+x, \d+ latents, from store", out)


@pytest.mark.slow  # an example script end to end
def test_paper_checkpoint(compressor_dir: Path, small_corpus: Path, tmp_path: Path, capsys) -> None:
    assert paper_checkpoint.main([str(tmp_path / "missing")]) == 2
    assert "does not download" in capsys.readouterr().err

    base = compressor_dir.parent / "base"  # the tiny base `save_tiny_compressor` wrote
    release = save_paper_layout(
        tmp_path / "paper", base, base_path_in_config="/authors/machine/Qwen3-0.6B"
    )
    argv = [str(release), "--encoder-base", str(base), "--decoder-base", str(base)]
    argv += ["--corpus", str(small_corpus)]
    assert paper_checkpoint.main([*argv, "--limit", "1", *FAST]) == 0
    report = capsys.readouterr().out
    assert re.search(r"pass 1 \(store\).*\n +latents from: store 2, memory 0, encoder 0", report)


@pytest.mark.parametrize("script", [rag_demo, own_documents, paper_checkpoint])
def test_help(script, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out
