"""The one reader of text, JSON lines and parquet files: rows located alike, errors named."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semidyn_rag import readers
from semidyn_rag.readers import (
    ReadError,
    json_lines,
    jsonl_rows,
    parquet_columns,
    parquet_rows,
    parse_json_line,
    read_text,
)


def test_json_lines_are_located_and_parsed_one_by_one(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n[2]\n{"bad\xff": 3}\n{oops\n')
    lines = list(json_lines(path))
    assert [n for n, _ in lines] == [1, 4, 5, 6]  # blank lines skipped, numbers kept
    assert parse_json_line(lines[0][1], "here") == {"a": 1}
    with pytest.raises(ReadError, match=r"^x:5: not UTF-8 \(character 5\)$") as info:
        parse_json_line(lines[2][1], "x:5")
    assert (info.value.where, info.value.problem) == ("x:5", "not UTF-8 (character 5)")
    with pytest.raises(ReadError, match=r"x:6: invalid JSON \(Expecting property name"):
        parse_json_line(lines[3][1], "x:6")
    rows = jsonl_rows(path)
    assert next(rows) == (f"{path}:1", {"a": 1}) and next(rows) == (f"{path}:4", [2])
    with pytest.raises(ReadError, match=f"{path}:5: not UTF-8"):
        next(rows)


def test_text_files_must_be_utf8(tmp_path):
    (tmp_path / "ok.txt").write_text("café\n", encoding="utf-8")
    assert read_text(tmp_path / "ok.txt") == "café\n"
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ReadError, match=r"latin\.txt: not UTF-8 text \(byte 3"):
        read_text(tmp_path / "latin.txt")


def test_parquet_rows_stream_in_batches_and_name_unreadable_files(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PARQUET_BATCH_ROWS", 2)
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]}), path)
    assert parquet_columns(path) == ["id", "text"]
    rows = list(parquet_rows(path, columns=["text"]))
    assert rows == [(f"{path} row {i + 1}", {"text": t}) for i, t in enumerate("abc")]
    (tmp_path / "fake.parquet").write_text("id,text\n1,a\n")
    for read in (parquet_columns, lambda p: list(parquet_rows(p))):
        with pytest.raises(ReadError, match=r"fake\.parquet: not a readable parquet file"):
            read(tmp_path / "fake.parquet")
