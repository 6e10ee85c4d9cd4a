"""Stop strings on streamed text: cut at the first one, hold back only possible beginnings."""

from __future__ import annotations

import pytest

from langchain_semidyn._stops import StopCutter, cut_at_stop


def feed_all(pieces: list[str], stop: list[str]) -> tuple[list[str], str | None]:
    cutter = StopCutter(stop)
    out = [cutter.feed(p) for p in pieces]
    out.append(cutter.flush())
    return out, cutter.hit


def test_stop_across_pieces_is_cut_and_later_text_dropped() -> None:
    out, hit = feed_all(["Answer: Par", "is\nQu", "estion: more"], ["\nQuestion:"])
    assert "".join(out) == "Answer: Paris"
    assert hit == "\nQuestion:"
    # Text that cannot start the stop string is not held back.
    assert out[0] == "Answer: Par"


def test_partial_prefix_is_released_when_it_does_not_complete() -> None:
    out, hit = feed_all(["abc\nQ", "uiet"], ["\nQuestion:"])
    assert out[0] == "abc"  # "\nQ" might begin the stop string
    assert "".join(out) == "abc\nQuiet"
    assert hit is None


def test_earliest_of_several_stops_wins() -> None:
    assert cut_at_stop("one. two! three", ["!", "."]) == ("one", ".")
    assert cut_at_stop("no stop here", ["###"]) == ("no stop here", None)
    assert cut_at_stop("text", None) == ("text", None)
    assert cut_at_stop("text", [""]) == ("text", None)


@pytest.mark.parametrize("split", range(1, 12))
def test_any_split_gives_the_same_cut(split: int) -> None:
    text = "hello wor### rest"
    out, hit = feed_all([text[:split], text[split:]], ["###", "world"])
    assert ("".join(out), hit) == cut_at_stop(text, ["###", "world"]) == ("hello wor", "###")
