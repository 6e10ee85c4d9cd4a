"""Optional dependencies: each use site fails naming the extra that installs the missing module.

A missing package is simulated the way Python sees one: ``sys.modules[name] = None`` makes every
``import name`` (and ``import name.sub``) raise ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from semidyn_rag.extras import EXTRAS, MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hide(monkeypatch: pytest.MonkeyPatch):
    """``hide("pyarrow")``: that package and its loaded submodules become uninstalled."""

    def hide(package: str) -> None:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, package, None)

    return hide


def assert_names_extra(info: pytest.ExceptionInfo[MissingExtraError], extra: str) -> None:
    assert f"pip install 'semidyn-rag[{extra}]'" in str(info.value)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_every_extra_named_in_errors_is_declared_and_installs_its_module() -> None:
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    distribution = {"matplotlib": "matplotlib", "pyarrow": "pyarrow"}
    distribution |= {"httpx": "httpx", "ray": "ray[data]"}
    (everything,) = declared["all"]
    in_all = set(everything.partition("[")[2].rstrip("]").split(","))
    for module, extra in EXTRAS.items():
        assert extra in declared, f"{module}: extra {extra!r} is not in pyproject.toml"
        requirements = [r.split(">")[0].split("=")[0] for r in declared[extra]]
        assert distribution[module] in requirements, (module, declared[extra])
        assert extra in in_all, f"the 'all' extra lacks {extra!r}"
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for module in ("faiss-cpu", "pyarrow", "matplotlib", "httpx"):
        assert not any(r.startswith(module) for r in core), f"{module} is still a core dependency"


def test_require_returns_the_module_or_names_the_extra(hide) -> None:
    assert require("json", "a test", extra="none") is json
    hide("pyarrow")
    with pytest.raises(MissingExtraError, match=r"reading things needs .*'pyarrow'") as info:
        require("pyarrow.parquet", "reading things")
    assert_names_extra(info, "parquet")
    with pytest.raises(MissingExtraError) as info:
        require("pyarrow", "Ray", extra="ray")
    assert_names_extra(info, "ray")


def test_require_keeps_a_broken_install_own_error(monkeypatch, tmp_path) -> None:
    """An installed package that fails to import a module of its own is not "install the extra"."""
    (tmp_path / "httpx").mkdir()
    (tmp_path / "httpx" / "__init__.py").write_text("import some_module_httpx_needs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "httpx", raising=False)
    with pytest.raises(ModuleNotFoundError) as info:
        require("httpx", "the teacher client")
    assert not isinstance(info.value, MissingExtraError)
    assert info.value.name == "some_module_httpx_needs"


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_readers_without_pyarrow(hide, tmp_path) -> None:
    from semidyn_rag.cli import check_corpus
    from semidyn_rag.data import load_eval_parquet
    from semidyn_rag.precompress import read_corpus
    from semidyn_rag.training.synth import load_seeds

    row = {"id": "1", "text": "t", "context": "c", "question": "q", "answers": ["a"]}
    path = write_parquet(tmp_path / "rows.parquet", [row])
    hide("pyarrow")
    for read in (
        lambda: load_eval_parquet(path),
        lambda: list(read_corpus(path)),
        lambda: load_seeds(path),
        lambda: check_corpus([str(path)], ("text",)),
    ):
        with pytest.raises(MissingExtraError, match=r"semidyn-rag\[parquet\]") as info:
            read()
        assert_names_extra(info, "parquet")


def test_sentence_model_without_sentence_transformers(hide) -> None:
    from semidyn_rag.embeddings import load_sentence_model

    hide("sentence_transformers")
    with pytest.raises(MissingExtraError) as info:
        load_sentence_model(None)
    assert_names_extra(info, "examples")


def test_openai_teacher_without_httpx(hide) -> None:
    from semidyn_rag.training.synth import OpenAITeacher

    hide("httpx")
    with pytest.raises(MissingExtraError) as info:
        OpenAITeacher("http://localhost:1/v1", "some-model")
    assert_names_extra(info, "synth")


def test_evaluation_without_matplotlib_fails_before_answering(hide, tmp_path) -> None:
    from semidyn_rag.data import QASample
    from semidyn_rag.evaluation import CheckpointRef, Evaluator, parse_setting

    sample = QASample(id="q", question="Who?", contexts=["Alice."], answers=["Alice"], source="t")
    out = tmp_path / "eval"
    evaluator = Evaluator(CheckpointRef(None), [sample], out)
    hide("matplotlib")
    with pytest.raises(MissingExtraError) as info:
        evaluator.run([parse_setting("full_context")])
    assert_names_extra(info, "plot")
    assert not out.exists() or not any(out.iterdir())  # no answer computed, nothing written


def test_plot_pareto_without_matplotlib(hide, tmp_path) -> None:
    from semidyn_rag.evaluation import SettingResult, parse_setting, plot_pareto
    from semidyn_rag.metrics import EvalRecord, summarize

    record = EvalRecord(
        id="q", prediction="a", answers=["a"], num_tokens=40, num_latents=10, latency_s=0.01
    )
    setting = parse_setting("fixed_ratio_4")
    result = SettingResult(setting=setting, name=setting.name, summary=summarize([record]))
    hide("matplotlib")
    with pytest.raises(MissingExtraError) as info:
        plot_pareto([result], tmp_path / "p.png")
    assert_names_extra(info, "plot")


def test_ray_precompression_without_ray(hide, monkeypatch) -> None:
    distributed = importlib.import_module("semidyn_rag.distributed")
    monkeypatch.setattr(os, "environ", dict(os.environ))  # ray_session sets loopback variables
    hide("ray")
    with pytest.raises(MissingExtraError) as info, distributed.ray_session(distributed.RayConfig()):
        pass
    assert_names_extra(info, "ray")
    # Ray Data's pyarrow is checked when the module loads, naming the `ray` extra too
    monkeypatch.delitem(sys.modules, "semidyn_rag.distributed")
    hide("pyarrow")
    with pytest.raises(MissingExtraError) as info:
        importlib.import_module("semidyn_rag.distributed")
    assert_names_extra(info, "ray")


@pytest.mark.integration  # a fresh interpreter importing torch and transformers: ~10-30 s
def test_core_imports_without_any_extra() -> None:
    """Compress, store, evaluate and the CLI import with none of the optional packages present."""
    # httpx is not blocked: huggingface_hub, which transformers needs, imports it, so it is
    # installed with the core whatever extras are chosen.
    blocked = ["faiss", "pyarrow", "matplotlib", "ray"]
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import semidyn_rag.cli, semidyn_rag.data, semidyn_rag.evaluation, semidyn_rag.precompress
import semidyn_rag.service, semidyn_rag.store, semidyn_rag.training.synth
from semidyn_rag import SemiDynamicCompressor, LatentStore
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
