"""The user-facing documents name only what exists: every ``semidyn`` command in their shell blocks
parses with the CLI (a removed flag fails here, not in a user's terminal), every import in their
Python blocks resolves, and every dotted name of ours they mention is there. The README stays a
guide (at most 200 lines; experiments live in docs/)."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from semidyn_rag import cli

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "integrations").glob("*/README.md"),
        ROOT / "semidyn_rag" / "default" / "README.md",
    ]
)
OURS = re.compile(
    r"\b((?:semidyn_rag|langchain_semidyn"
    r"|llama_index\.(?:llms|postprocessor|response_synthesizers)\.semidyn)"
    r"(?:\.[A-Za-z_]\w*)+)"
)


def _blocks(path: Path, languages: set[str]) -> Iterator[str]:
    """The fenced code blocks of ``path`` whose language is one of ``languages``."""
    inside, keep, lines = False, False, []
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            if inside and keep:
                yield textwrap.dedent("\n".join(lines))
            inside, keep, lines = not inside, fence[3:].strip() in languages, []
        elif inside:
            lines.append(line)


def _commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in DOCUMENTS:
        for block in _blocks(path, {"bash", "sh", "console", ""}):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("semidyn "):
                    out.append((f"{path.relative_to(ROOT)}: {line}", shlex.split(line)[1:]))
    return out


def _resolve(name: str) -> object:
    """The object a dotted name refers to: the longest importable module, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            found = getattr(found, part)
        return found
    raise ImportError(name)


def test_readme_is_a_guide():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details to docs/"


@pytest.mark.parametrize(
    ("where", "argv"), _commands(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_documented_commands_parse(where, argv):
    if "--help" in argv or "..." in argv:
        pytest.skip("help or an elided command line")
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: the CLI refuses it (exit {exc.code})")


def test_the_command_check_can_fail():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["precompress", "docs/", "--store", "s/", "--embed"])


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_names_exist(path):
    missing = []
    for block in _blocks(path, {"python"}):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                try:
                    _resolve(name)
                except (ImportError, AttributeError) as exc:
                    missing.append(f"{name} ({exc})")
    for name in sorted(set(OURS.findall(path.read_text(encoding="utf-8")))):
        if name.endswith((".py", ".md", ".json", ".jsonl", ".safetensors")):
            continue
        try:
            _resolve(name)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name} ({exc})")
    assert not missing, f"{path.relative_to(ROOT)} names what does not exist: " + "; ".join(missing)
