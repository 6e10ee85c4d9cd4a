"""Reading the text files every command takes: plain text, JSON lines and parquet, in one place.

Corpora (`semidyn_rag.precompress`), evaluation and training data (`semidyn_rag.data`), synthesis
seeds (`semidyn_rag.training.synth`) and the CLI's checks before a model loads all read through
here, so a row is located the same way everywhere (``file:line`` in JSON lines, ``file row N`` in
parquet, 1-based) and an unreadable one is a :class:`ReadError` naming it. What a row *means*
(which field is the text, what a sample is) stays with each caller.

Rows are streamed: a JSON lines or parquet file larger than memory can be read. Parquet needs the
``parquet`` extra (pyarrow); without it every parquet reader raises
:class:`~semidyn_rag.extras.MissingExtraError` naming the extra.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .extras import require

__all__ = [
    "PARQUET_BATCH_ROWS",
    "ReadError",
    "json_lines",
    "jsonl_rows",
    "parquet_columns",
    "parquet_rows",
    "parse_json_line",
    "read_text",
]

PARQUET_BATCH_ROWS = 1024
"""Rows per parquet batch read: memory stays bounded by one batch, whatever the file's size."""


class ReadError(ValueError):
    """A file or one row of it cannot be read; ``where`` names it, ``problem`` says why.

    ``str(error)`` is ``"{where}: {problem}"``.
    """

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def read_text(path: str | Path) -> str:
    """The whole file as UTF-8 text; :class:`ReadError` naming the first undecodable byte."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ReadError(
            str(path), f"not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8"
        ) from None


def json_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a JSON lines file with their 1-based numbers, streamed.

    Bytes that are not UTF-8 are kept (``surrogateescape``), so that they make their own line an
    error in :func:`parse_json_line` rather than the whole file unreadable.
    """
    with Path(path).open(encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, line


def parse_json_line(line: str, where: str) -> Any:
    """One line of :func:`json_lines` parsed; :class:`ReadError` at ``where`` when it holds
    bytes that are not UTF-8 or is not valid JSON."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable bytes, kept by surrogateescape
        raise ReadError(where, f"not UTF-8 (character {exc.start})") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ReadError(where, f"invalid JSON ({exc.msg}, column {exc.colno})") from None


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` of every non-blank line, ``where`` being ``file:line``.

    A line that cannot be parsed raises :class:`ReadError` when it is reached (the rows before it
    have been yielded); a caller that skips bad rows reads :func:`json_lines` and
    :func:`parse_json_line` itself.
    """
    for number, line in json_lines(path):
        where = f"{path}:{number}"
        yield where, parse_json_line(line, where)


def _arrow_errors() -> tuple[type[BaseException], ...]:
    pa = require("pyarrow", "reading .parquet files")
    return (OSError, pa.ArrowException)


def parquet_columns(path: str | Path, purpose: str = "reading .parquet files") -> list[str]:
    """The column names of a parquet file, from its schema alone (no row is read).

    :class:`ReadError` when the file is not readable parquet; ``purpose`` goes into the
    `MissingExtraError` without pyarrow.
    """
    pq = require("pyarrow.parquet", purpose)
    try:
        return list(pq.read_schema(path).names)
    except _arrow_errors() as exc:
        raise ReadError(str(path), f"not a readable parquet file ({exc})") from None


def parquet_rows(
    path: str | Path,
    *,
    columns: Sequence[str] | None = None,
    purpose: str = "reading .parquet files",
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of every row, ``where`` being ``file row N``, in batches of
    :data:`PARQUET_BATCH_ROWS`; only ``columns`` when given.

    :class:`ReadError` when the file (or a batch of it) is not readable parquet; ``purpose``
    goes into the `MissingExtraError` without pyarrow.
    """
    pq = require("pyarrow.parquet", purpose)
    errors = _arrow_errors()
    try:
        batches = pq.ParquetFile(path).iter_batches(
            batch_size=PARQUET_BATCH_ROWS, columns=list(columns) if columns is not None else None
        )
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield f"{path} row {number}", row
    except errors as exc:
        raise ReadError(str(path), f"not a readable parquet file ({exc})") from None
