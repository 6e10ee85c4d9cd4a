"""Loaders on the real SQuAD / HotpotQA files in ``../shared/data`` and on parquet files we write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from semidyn_rag.data import (
    DataFormatError,
    QASample,
    load_eval_parquet,
    load_hotpotqa,
    load_jsonl_samples,
    load_samples,
    load_squad,
    sample,
    save_jsonl_samples,
    squad_article_split,
)
from semidyn_rag.metrics import substring_match

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SQUAD = DATA / "squad" / "dev-v2.0-part.json"
HOTPOT_DEV = DATA / "hotpotqa" / "dev.jsonl"
HOTPOT_TRAIN = DATA / "hotpotqa" / "train.jsonl"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared data directory {DATA} (../shared/data) is not present"
)


@pytest.fixture(scope="module")
def squad() -> list[QASample]:
    return load_squad(SQUAD)


@pytest.fixture(scope="module")
def hotpot_rows() -> list[dict]:
    return [json.loads(line) for line in HOTPOT_DEV.read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _qa(i: int) -> QASample:
    return QASample(id=str(i), question="q", contexts=["c"], answers=["a"], source="test")


# --- SQuAD ---------------------------------------------------------------------------------------


@needs_data
def test_squad_answerable_questions_with_their_paragraph(squad: list[QASample]) -> None:
    assert len(squad) == 2910  # the README's count of answerable questions
    assert len({s.id for s in squad}) == len(squad)
    assert len({s.title for s in squad}) == 16
    for s in squad:
        assert s.source == "squad"
        assert len(s.contexts) == 1
        assert s.answers and len(set(s.answers)) == len(s.answers)
        assert all(a in s.contexts[0] for a in s.answers)  # SQuAD answers are spans
    second = next(s for s in squad if s.question == "When were the Normans in Normandy?")
    assert second.answers == ["10th and 11th centuries", "in the 10th and 11th centuries"]
    assert second.title == "Normans"


@needs_data
def test_squad_with_unanswerable_questions() -> None:
    samples = load_squad(SQUAD, answerable_only=False)
    assert len(samples) == 6078
    assert sum(not s.answers for s in samples) == 6078 - 2910


@needs_data
def test_squad_article_selection() -> None:
    first_two = load_squad(SQUAD, articles=slice(0, 2))
    assert {s.title for s in first_two} == {"Normans", "Computational_complexity_theory"}
    warsaw = load_squad(SQUAD, articles=["Warsaw"])
    assert warsaw and {s.title for s in warsaw} == {"Warsaw"}
    with pytest.raises(ValueError, match="Atlantis"):
        load_squad(SQUAD, articles=["Warsaw", "Atlantis"])


@needs_data
def test_squad_article_split_holds_out_whole_articles(squad: list[QASample]) -> None:
    train, evaluation = squad_article_split(SQUAD, n_eval_articles=3, seed=1)
    train_titles, eval_titles = {s.title for s in train}, {s.title for s in evaluation}
    assert len(eval_titles) == 3 and len(train_titles) == 13
    assert not train_titles & eval_titles
    assert sorted(s.id for s in train + evaluation) == sorted(s.id for s in squad)
    again, _ = squad_article_split(SQUAD, n_eval_articles=3, seed=1)
    assert again == train
    other_seeds = {
        frozenset(s.title for s in squad_article_split(SQUAD, n_eval_articles=3, seed=k)[1])
        for k in range(2, 4)
    }
    assert len(other_seeds | {frozenset(eval_titles)}) > 1
    _, quarter = squad_article_split(SQUAD, eval_fraction=0.25, seed=0)
    assert len({s.title for s in quarter}) == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"n_eval_articles": 1, "eval_fraction": 0.5},
        {"n_eval_articles": 0},
        {"n_eval_articles": 2},
        {"eval_fraction": 1.0},
    ],
)
def test_squad_article_split_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    qa = {"id": "q", "question": "?", "answers": [{"text": "x"}]}
    articles = [{"title": t, "paragraphs": [{"context": "x", "qas": [qa]}]} for t in "AB"]
    (tmp_path / "two.json").write_text(json.dumps({"data": articles}))
    with pytest.raises(ValueError):
        squad_article_split(tmp_path / "two.json", **kwargs)


# --- HotpotQA ------------------------------------------------------------------------------------


@needs_data
def test_hotpotqa_gold_paragraphs_only(hotpot_rows: list[dict]) -> None:
    samples = load_hotpotqa(HOTPOT_DEV)
    assert len(samples) == len(hotpot_rows) == 300
    for s, row in zip(samples, hotpot_rows, strict=True):
        gold = [t for t in row["context"]["title"] if t in row["supporting_facts"]["title"]]
        assert s.id == row["id"] and s.answers == [row["answer"]] and s.source == "hotpotqa"
        assert len(s.contexts) == len(gold) == 2
        assert all(c.startswith(f"{t}: ") for c, t in zip(s.contexts, gold, strict=True))
    assert samples[0].contexts[0].startswith("Tinted Windows (album): Tinted Windows is")


@needs_data
def test_hotpotqa_with_distractors(hotpot_rows: list[dict]) -> None:
    gold = load_hotpotqa(HOTPOT_DEV)
    full = load_hotpotqa(HOTPOT_DEV, distractors=True)
    for g, f, row in zip(gold, full, hotpot_rows, strict=True):
        assert len(f.contexts) == len(row["context"]["title"])  # ten, except three short rows
        assert set(g.contexts) <= set(f.contexts)
    assert sum(len(f.contexts) == 10 for f in full) == 297


@needs_data
def test_hotpotqa_train_split_and_sentence_spacing() -> None:
    samples = load_hotpotqa(HOTPOT_TRAIN, distractors=True)
    assert len(samples) == 300
    text = "\n".join(c for s in samples for c in s.contexts)
    assert "Gujarat. He is a cabinet minister" in text  # the raw sentences lack this space
    assert '"HolaSoyGerman.", is also' in text  # a continuation fragment stays attached


def test_hotpotqa_joins_sentences_with_title(tmp_path: Path) -> None:
    row = {
        "id": "x1",
        "question": "Who?",
        "answer": "Ann",
        "supporting_facts": {"title": ["B"], "sent_id": [0]},
        "context": {
            "title": ["A", "B"],
            "sentences": [
                ["Noise."],
                ["Ann is here.", " She sings.", "Then, she left", ", alone."],
            ],
        },
    }
    (s,) = load_hotpotqa(_write_jsonl(tmp_path / "h.jsonl", [row]))
    assert s.contexts == ["B: Ann is here. She sings. Then, she left, alone."]


# --- the paper's evaluation parquet --------------------------------------------------------------


SQUAD_STRUCT = pa.struct([("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int32()))])


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        (
            "answers",
            pa.array([["Paris", "paris", "Paris"], ["1066"]], pa.list_(pa.string())),
            [["Paris", "paris"], ["1066"]],
        ),
        (  # what pandas shows as numpy-array cells is a parquet list column
            "answers",
            pa.array([np.array(["Paris"], dtype=object), np.array(["1066", "in 1066"])]),
            [["Paris"], ["1066", "in 1066"]],
        ),
        (
            "answers",
            pa.array(
                [
                    {"text": ["Paris", "Paris"], "answer_start": [0, 0]},
                    {"text": ["1066"], "answer_start": [9]},
                ],
                SQUAD_STRUCT,
            ),
            [["Paris"], ["1066"]],
        ),
        ("answers", pa.array(["Paris", "1066"]), [["Paris"], ["1066"]]),
        ("answer", pa.array(["Paris", "1066"]), [["Paris"], ["1066"]]),
    ],
)
def test_eval_parquet_answer_layouts(
    tmp_path: Path, column: str, values: pa.Array, expected: list[list[str]]
) -> None:
    table = pa.table(
        {
            "id": pa.array([7, 8]),
            "title": ["France", None],
            "context": ["Paris is the capital of France.", "The battle was in 1066."],
            "question": ["Capital of France?", "When was the battle?"],
            column: values,
            "context_len": [7, 6],
        }
    )
    pq.write_table(table, tmp_path / "eval.parquet")
    samples = load_eval_parquet(tmp_path / "eval.parquet", source="squad")
    assert [s.answers for s in samples] == expected
    assert [s.id for s in samples] == ["7", "8"]
    assert [s.title for s in samples] == ["France", None]
    assert samples[1].contexts == ["The battle was in 1066."]
    assert {s.source for s in samples} == {"squad"}
    assert load_samples(tmp_path / "eval.parquet")[0].source == "parquet"


def test_eval_parquet_without_id_numbers_rows(tmp_path: Path) -> None:
    table = pa.table({"context": ["c0", "c1"], "question": ["q0", "q1"], "answer": ["a", "b"]})
    pq.write_table(table, tmp_path / "e.parquet")
    assert [s.id for s in load_eval_parquet(tmp_path / "e.parquet")] == ["0", "1"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"context": ["c"], "question": ["q"]}), r"missing columns \['answers'\]"),
        (pa.table({"context": ["c"], "answer": ["a"]}), r"missing columns \['question'\]"),
        (
            pa.table({c: pa.array([], pa.string()) for c in ("context", "question", "answer")}),
            "empty file",
        ),
        (pa.table({"context": ["c"], "question": ["q"], "answer": [" "]}), "row 0: no non-empty"),
        (pa.table({"context": ["c"], "question": ["q"], "answers": [[1, 2]]}), "row 0: column"),
        (pa.table({"context": [3], "question": ["q"], "answer": ["a"]}), "row 0: contexts.0"),
    ],
)
def test_eval_parquet_errors_name_file_and_problem(
    tmp_path: Path, table: pa.Table, message: str
) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataFormatError, match=message) as info:
        load_eval_parquet(path)
    assert str(path) in str(info.value)


def test_eval_parquet_rejects_non_parquet(tmp_path: Path) -> None:
    path = tmp_path / "fake.parquet"
    path.write_text("id,question\n1,q\n")
    with pytest.raises(DataFormatError, match="not a readable parquet file"):
        load_eval_parquet(path)


# --- malformed JSON inputs -----------------------------------------------------------------------


def test_empty_files_are_errors(tmp_path: Path) -> None:
    for name, loader in [
        ("e.json", load_squad),
        ("e.jsonl", load_hotpotqa),
        ("f.jsonl", load_jsonl_samples),
    ]:
        (tmp_path / name).write_text("\n  \n")
        with pytest.raises(DataFormatError, match="empty file"):
            loader(tmp_path / name)
    (tmp_path / "g.json").write_text('{"version": "v2.0", "data": []}')
    with pytest.raises(DataFormatError, match=r"g\.json: not SQuAD JSON: data: List should have"):
        load_squad(tmp_path / "g.json")


def test_squad_errors_locate_the_problem(tmp_path: Path) -> None:
    qa = {"id": "q1", "answers": [{"text": "x", "answer_start": 0}], "is_impossible": False}
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "x", "qas": [qa]}]}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match=r"s.json: .*data.0.paragraphs.0.qas.0.question"):
        load_squad(path)
    qa.update(question="What?", answers=[])
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="'q1' is answerable but has no answer"):
        load_squad(path)
    path.write_text(json.dumps(doc)[:-5])
    with pytest.raises(DataFormatError, match="invalid JSON"):
        load_squad(path)


def test_squad_v1_layout_without_is_impossible(tmp_path: Path) -> None:
    qa = {"id": "q1", "question": "What?", "answers": [{"text": "x", "answer_start": 0}]}
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "x y", "qas": [qa]}]}]}
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    (s,) = load_squad(tmp_path / "v1.json")
    assert (s.answers, s.contexts, s.title) == (["x"], ["x y"], "T")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("answer"), "line 2: not a hotpot_qa row: answer: Field required"),
        (lambda r: r["context"]["title"].pop(), "line 2: .*context: Value error, 2 titles but 3"),
        (lambda r: r.update(answer=" "), "line 2: empty answer"),
        (
            lambda r: r["supporting_facts"]["title"].append("Zed"),
            r"line 2: supporting titles \['Zed'\] not in context",
        ),
    ],
)
def test_hotpotqa_errors_locate_the_problem(tmp_path: Path, change, message: str) -> None:
    good = {
        "id": "a",
        "question": "q",
        "answer": "x",
        "supporting_facts": {"title": ["T0"], "sent_id": [0]},
        "context": {"title": ["T0", "T1", "T2"], "sentences": [["s"], ["s"], ["s"]]},
    }
    bad = json.loads(json.dumps(good))
    change(bad)
    path = _write_jsonl(tmp_path / "h.jsonl", [good, bad])
    with pytest.raises(DataFormatError, match=f"h.jsonl: {message}"):
        load_hotpotqa(path)


def test_invalid_json_line_is_located(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{oops\n')
    with pytest.raises(DataFormatError, match=r"x\.jsonl: line 2: invalid JSON"):
        load_jsonl_samples(path)


# --- QASample JSON lines, dispatch, subsets ------------------------------------------------------


def test_jsonl_round_trip_and_dispatch(tmp_path: Path) -> None:
    samples = [
        _qa(0),
        QASample(
            id="h", question="q?", contexts=["a", "b"], answers=[], source="hotpotqa", title="t"
        ),
    ]
    save_jsonl_samples(samples, tmp_path / "s.jsonl")
    assert load_jsonl_samples(tmp_path / "s.jsonl") == samples
    assert load_samples(tmp_path / "s.jsonl") == samples
    with pytest.raises(DataFormatError, match=r"unsupported extension '\.csv'"):
        load_samples(tmp_path / "s.csv")


def test_jsonl_rows_must_be_samples(tmp_path: Path) -> None:
    row = _qa(0).model_dump() | {"answer": "typo"}
    path = _write_jsonl(tmp_path / "s.jsonl", [row])
    with pytest.raises(DataFormatError, match="line 1: not a QASample: answer: Extra inputs"):
        load_jsonl_samples(path)


@needs_data
def test_load_samples_dispatches_real_files() -> None:
    assert load_samples(SQUAD) == load_squad(SQUAD)
    hotpot = load_samples(HOTPOT_DEV)
    assert hotpot == load_hotpotqa(HOTPOT_DEV)


@needs_data
def test_gold_contexts_usually_contain_the_answer(squad: list[QASample]) -> None:
    """A sanity check of loader and metric together: the gold text holds the answer."""
    hotpot = load_hotpotqa(HOTPOT_DEV)
    extractive = [s for s in hotpot if s.answers[0].lower() not in ("yes", "no")]
    found = sum(substring_match(" ".join(s.contexts), s.answers) for s in extractive)
    assert found / len(extractive) > 0.95
    assert all(substring_match(s.contexts[0], s.answers) for s in squad)


def test_qasample_is_frozen_and_needs_a_context() -> None:
    s = _qa(0)
    with pytest.raises(ValidationError):
        s.question = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        QASample(id="1", question="q", contexts=[], answers=["a"], source="test")


@given(n=st.integers(0, 60), small=st.integers(0, 60), extra=st.integers(0, 60), seed=st.integers())
def test_sample_is_deterministic_nested_and_ordered(n: int, small: int, extra: int, seed: int):
    pool = [_qa(i) for i in range(n)]
    a = sample(pool, small, seed)
    b = sample(pool, small + extra, seed)
    assert a == sample(pool, small, seed)
    assert len(a) == min(small, n)
    assert set(map(id, a)) <= set(map(id, b))
    assert [int(s.id) for s in b] == sorted(int(s.id) for s in b)


def test_sample_differs_by_seed_and_rejects_negative_limit() -> None:
    pool = [_qa(i) for i in range(100)]
    assert sample(pool, 10, 0) != sample(pool, 10, 1)
    assert sample(pool, 1000, 0) == pool
    with pytest.raises(ValueError):
        sample(pool, -1)
