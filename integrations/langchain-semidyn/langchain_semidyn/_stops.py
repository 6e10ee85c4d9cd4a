"""Stop sequences on a text stream.

LangChain's contract is "cut the output at the first stop string". A streamed answer arrives in
pieces, so a stop string may straddle two pieces; the cutter holds back only the tail that could
still begin a stop string, so everything else reaches the user as soon as the decoder emits it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopCutter:
    """Feed text pieces in order; get back what is safe to emit before the first stop string."""

    def __init__(self, stop: Sequence[str] | None = None) -> None:
        self.stop = [s for s in (stop or ()) if s]
        self.hit: str | None = None
        """The stop string that ended the text, once one has appeared."""
        self._pending = ""

    @property
    def stopped(self) -> bool:
        return self.hit is not None

    def feed(self, piece: str) -> str:
        """The part of ``piece`` (plus held-back text) that can be emitted now."""
        if self.stopped:
            return ""
        text = self._pending + piece
        found = [(text.find(s), s) for s in self.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if found:
            index, self.hit = min(found, key=lambda f: f[0])
            self._pending = ""
            return text[:index]
        hold = self._held_tail(text)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back tail once the stream is over (it never became a stop string)."""
        rest, self._pending = self._pending, ""
        return "" if self.stopped else rest

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for size in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:size]):
                    longest = size
                    break
        return longest


def cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, str | None]:
    """``text`` up to the first stop string, and that string (``None`` when none occurs)."""
    cutter = StopCutter(stop)
    kept = cutter.feed(text) + cutter.flush()
    return kept, cutter.hit
