"""Texts of known kinds for fitting and checking the ratio head: what a RAG corpus mixes.

Retrieved chunks are not all encyclopaedia prose: fact sheets, tables, code, chat logs and
boilerplate sit in the same index. A head fitted on prose alone sees a spread of densities too
narrow to learn (the extractive labels had std 0.2 in log2). Each builder here is deterministic in
its ``seed`` and draws its material from ``../shared/data`` or the Python standard library, so the
mix is the same on every machine with the same Python.

``kind`` names are the rows of the density report: ``prose``, ``facts`` (one fact per line),
``table`` (numbers in columns), ``code``, ``chat`` (redundant conversation), ``boilerplate``.
"""

from __future__ import annotations

import inspect
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("prose", "facts", "table", "code", "chat", "boilerplate")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class MixText:
    kind: str
    text: str


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


def prose(paragraphs: Sequence[str], n: int, seed: int) -> list[MixText]:
    """Whole paragraphs, as retrieved."""
    rng = random.Random(seed)
    return [MixText("prose", p) for p in rng.sample(list(paragraphs), min(n, len(paragraphs)))]


def facts(paragraphs: Sequence[str], n: int, seed: int) -> list[MixText]:
    """Fact sheets: the sentences holding a number, one per line, from several paragraphs."""
    rng = random.Random(seed)
    pool = [s for p in paragraphs for s in sentences(p) if re.search(r"\d", s) and len(s) < 200]
    out = []
    for _ in range(n):
        lines = rng.sample(pool, min(8, len(pool)))
        out.append(MixText("facts", "\n".join(f"- {line}" for line in lines)))
    return out


def table(names: Sequence[str], n: int, seed: int) -> list[MixText]:
    """Small CSV tables of names and measurements (every cell is new information)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        rows = ["name,year,population,area_km2,code"]
        for name in rng.sample(list(names), min(10, len(names))):
            rows.append(
                f"{name},{rng.randint(1600, 2024)},{rng.randint(1_000, 9_999_999)},"
                f"{rng.uniform(1, 99_999):.1f},{rng.choice('ABCDEFGHJK')}{rng.randint(100, 999)}"
            )
        out.append(MixText("table", "\n".join(rows)))
    return out


CODE_MODULES = ("textwrap", "json.decoder", "argparse", "shlex", "fractions", "difflib", "heapq")
HELD_CODE_MODULES = ("string", "bisect", "calendar", "colorsys")


def code(modules: Sequence[str], n: int, seed: int, lines: int = 30) -> list[MixText]:
    """Pieces of standard-library source, ``lines`` lines each."""
    import importlib

    rng = random.Random(seed)
    pieces = []
    for name in modules:
        source = inspect.getsource(importlib.import_module(name)).splitlines()
        for start in range(0, len(source) - lines, lines):
            piece = "\n".join(source[start : start + lines]).strip()
            if len(piece) > 200:
                pieces.append(piece)
    return [MixText("code", p) for p in rng.sample(pieces, min(n, len(pieces)))]


FILLERS = (
    "So, yeah, basically",
    "Like I said before,",
    "Right, right, and honestly",
    "Okay so, you know,",
    "Yeah, exactly, so",
    "Haha, well, anyway,",
)


def chat(paragraphs: Sequence[str], n: int, seed: int) -> list[MixText]:
    """A chat log that says two sentences of a paragraph over and over, padded with filler."""
    rng = random.Random(seed)
    out = []
    for paragraph in rng.sample(list(paragraphs), min(n, len(paragraphs))):
        said = sentences(paragraph)[:2] or [paragraph]
        lines = []
        for turn in range(8):
            who = "A" if turn % 2 == 0 else "B"
            fact = said[turn % len(said)]
            lines.append(f"{who}: {rng.choice(FILLERS)} {fact[0].lower()}{fact[1:]}")
        out.append(MixText("chat", "\n".join(lines)))
    return out


BOILERPLATE = (
    "This website uses cookies to improve your experience. By continuing to browse the site you "
    "agree to our use of cookies. All rights reserved. No part of this publication may be "
    "reproduced, distributed, or transmitted in any form or by any means without the prior "
    "written permission of the publisher. Terms and conditions apply. Click here to unsubscribe. "
    "Please read our privacy policy and terms of service before using this service."
)


def boilerplate(names: Sequence[str], n: int, seed: int) -> list[MixText]:
    """A footer and notice repeated with a name swapped in: text a reader skips."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        owner = rng.choice(list(names))
        notice = f"Copyright {rng.randint(1995, 2024)} {owner}. {BOILERPLATE}"
        out.append(MixText("boilerplate", f"{notice}\n\n{notice}"))
    return out


def mix(
    paragraphs: Sequence[str], names: Sequence[str], per_kind: int, seed: int, *, held: bool
) -> list[MixText]:
    """``per_kind`` texts of every kind; ``held`` draws code from other modules than training."""
    modules = HELD_CODE_MODULES if held else CODE_MODULES
    return [
        *prose(paragraphs, per_kind, seed),
        *facts(paragraphs, per_kind, seed + 1),
        *table(names, per_kind, seed + 2),
        *code(modules, per_kind, seed + 3),
        *chat(paragraphs, per_kind, seed + 4),
        *boilerplate(names, per_kind, seed + 5),
    ]
