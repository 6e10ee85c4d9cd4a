"""The documented LangChain example runs end to end (tiny random models, offline MiniLM embeddings).

In the monorepo's tests, not the integration's: examples/ is not part of any distribution."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

from semidyn_rag.embeddings import DEFAULT_MODEL, default_model_path

pytest.importorskip("langchain_semidyn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "langchain_rag.py"


@pytest.mark.slow  # builds tiny models and embeds with the real MiniLM, three runs: ~30 s+
@pytest.mark.skipif(default_model_path() == DEFAULT_MODEL, reason="offline MiniLM not installed")
def test_example_script_runs(tmp_path, capsys, caplog) -> None:
    caplog.set_level(logging.INFO, logger="langchain_rag")
    spec = importlib.util.spec_from_file_location("langchain_rag_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--tiny", "--max-new-tokens", "4", "--store", str(tmp_path / "store")]
    assert module.main([*argv, "--question", "Where was Marie Curie born?"]) == 0
    assert "Q: Where was Marie Curie born?" in capsys.readouterr().out
    # A second run is a new process's view of the same store: nothing left to compress.
    assert "(4 new)" in caplog.text
    caplog.clear()
    assert module.main([*argv, "--question", "When was the Eiffel Tower completed?"]) == 0
    assert "(0 new)" in caplog.text
    assert "retrieved [('store'" in caplog.text
    caplog.clear()
    assert module.main([*argv, "--expand-top-k", "1", "--question", "Who built the tower?"]) == 0
    assert "retrieved [('text',), ('store'" in caplog.text  # the best chunk as text
