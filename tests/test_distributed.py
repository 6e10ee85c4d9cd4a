"""The Ray path gives the local path's store: shards round-trip, a local Ray pool agrees entry by entry."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from semidyn_rag import distributed
from semidyn_rag.distributed import (
    CompressShards,
    RayConfig,
    RayExecutor,
    leftover_shards,
    merge_shards,
    precompress_ray,
    read_shard,
    write_shard,
)
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.precompress import Chunk, Executor, PrecompressConfig, precompress
from semidyn_rag.store import LatentStore, entry_key, text_hash
from semidyn_rag.testing import CORPUS, save_tiny_compressor

CONFIG = PrecompressConfig(progress=False, batch_tokens=96)
TEXTS = [" ".join(CORPUS[i : i + 1 + i % 3]) for i in range(10)]  # 1-3 sentences
TEXTS += [TEXTS[1], TEXTS[7]]  # duplicates: one in the prefilled part, one not


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_compressor(tmp_path_factory.mktemp("distributed"), CORPUS)


@pytest.fixture(scope="module")
def model(checkpoint) -> SemiDynamicCompressor:
    return SemiDynamicCompressor.from_pretrained(checkpoint).eval()


@pytest.fixture
def chunks() -> list[Chunk]:
    return [Chunk(f"d{i}#0", f"d{i}", text, {}) for i, text in enumerate(TEXTS)]


@pytest.fixture
def ray_dir() -> Iterator[str]:
    """Ray's session dir: short (unix socket paths are limited to 107 bytes), one per test."""
    path = tempfile.mkdtemp(prefix="rsd", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def assert_same_store(a: Path, b: Path, fingerprint: str) -> None:
    with LatentStore(a, fingerprint) as left, LatentStore(b, fingerprint) as right:
        assert left.keys() == right.keys()
        mine, theirs = left.get_many(left.keys()), right.get_many(right.keys())
        for key, ctx in mine.items():
            other = theirs[key]
            assert other.latents.dtype == ctx.latents.dtype == torch.float16
            torch.testing.assert_close(other.latents, ctx.latents, atol=1e-3, rtol=1e-2)
            assert (other.num_tokens, other.segment_ratios) == (ctx.num_tokens, ctx.segment_ratios)
            np.testing.assert_allclose(other.segment_y, ctx.segment_y, rtol=1e-4, atol=1e-5)
        assert right.verify() == len(mine)


def test_shards_round_trip_and_merge_once(tmp_path, checkpoint, model):
    policy = CONFIG.policy
    worker = CompressShards(str(checkpoint), str(tmp_path / "shards"), policy, 0.0, None,
                            "float16", 64, 8)  # fmt: skip
    texts = TEXTS[:5]
    keys = [f"k{i}" for i in range(5)]
    batch = pa.table({"key": keys, "text_hash": [text_hash(t) for t in texts],
                      "ids": model.tokenize(texts)})  # fmt: skip
    out = worker(batch)
    assert out["chunks"].tolist() == [5]
    fingerprint, entries = read_shard(out["shard"][0])
    assert fingerprint == model.fingerprint
    assert [e[0] for e in entries] == keys
    for (_, _, pol, ctx), fresh in zip(entries, model.compress(texts), strict=True):
        assert pol == policy and ctx.latents.dtype == torch.float16
        torch.testing.assert_close(ctx.latents, fresh.latents.half(), atol=1e-3, rtol=1e-2)

    foreign = write_shard(tmp_path / "shards" / "x.parquet", [(k, "", c) for k, _, _, c in entries],
                          policy=policy, fingerprint="other", dtype=np.dtype(np.float16))  # fmt: skip
    with LatentStore(tmp_path / "store", model.fingerprint) as store:
        store.put("k0", entries[0][3])
        assert merge_shards(store, leftover_shards(tmp_path / "shards")) == (4, 1)
        assert sorted(store.keys()) == keys
        assert leftover_shards(tmp_path / "shards") == [foreign]  # other weights: left alone


def test_ray_executor_merges_a_killed_runs_shards_before_the_plan(
    tmp_path, checkpoint, model, chunks, monkeypatch
):
    """Shards a killed run finished are stored by `RayExecutor.recover`, before the job plans:
    what they hold is not compressed again, and with nothing left Ray never starts."""
    part = chunks[:4]
    texts = list(dict.fromkeys(c.text for c in part))
    keys = [entry_key(t, model.fingerprint, CONFIG.policy) for t in texts]
    entries = [(k, text_hash(t), c) for k, t, c in zip(keys, texts, model.compress(texts))]
    store_dir = tmp_path / "store"
    write_shard(store_dir / "ray_shards" / "left.parquet", entries, policy=CONFIG.policy,
                fingerprint=model.fingerprint, dtype=np.dtype(np.float16))  # fmt: skip

    def no_ray(_config):
        raise AssertionError("the shards held every text, yet Ray was started")

    monkeypatch.setattr(distributed, "ray_session", no_ray)
    executor = RayExecutor(checkpoint, RayConfig(workers=3))
    assert isinstance(executor, Executor) and executor.name == "ray (3 workers)"
    report = precompress(model, part, store_dir, CONFIG, executor=executor)
    assert (report.new, report.skipped, report.backend) == (0, len(texts), "ray (3 workers)")
    assert not leftover_shards(store_dir / "ray_shards")
    with LatentStore(store_dir, model.fingerprint) as store:
        assert sorted(store.keys()) == sorted(keys)
        assert {r.id for r in store.manifest()} == {c.id for c in part}


@pytest.mark.integration  # starts Ray: ~30 s
def test_ray_gives_the_local_store(tmp_path, checkpoint, model, chunks, ray_dir, monkeypatch):
    local = precompress(model, chunks, tmp_path / "local", CONFIG)
    assert local.duplicates > 0
    # The Ray store already holds a third of the texts: only the rest is dispatched.
    precompress(model, chunks[:4], tmp_path / "ray", CONFIG)
    done = len({c.text for c in chunks[:4]})
    ray_config = RayConfig(workers=2, rows_per_task=3, num_cpus=2, temp_dir=ray_dir)
    report = precompress_ray(checkpoint, chunks, tmp_path / "ray", CONFIG, ray_config, model=model)
    assert (report.skipped, report.new) == (done, local.unique - done)
    rest = {c.text for c in chunks} - {c.text for c in chunks[:4]}
    assert report.tokens == sum(len(t) for t in model.tokenize(sorted(rest)))
    assert_same_store(tmp_path / "local", tmp_path / "ray", model.fingerprint)
    assert not leftover_shards(tmp_path / "ray" / "ray_shards")

    def no_ray(_config):
        raise AssertionError("nothing was missing, yet Ray was started")

    monkeypatch.setattr(distributed, "ray_session", no_ray)
    again = precompress_ray(checkpoint, chunks, tmp_path / "ray", CONFIG, ray_config, model=model)
    assert (again.new, again.skipped) == (0, local.unique)


def test_sigterm_unwinds_the_driver_so_ray_is_shut_down():
    """``kill`` (SIGTERM) or a closed terminal (SIGHUP) must run the ``finally`` that calls
    ``ray.shutdown()``; Python's default would end the driver and leave Ray's processes."""
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    unwound = []
    with pytest.raises(SystemExit) as stopped, distributed.exit_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the body")
        finally:
            unwound.append(True)
    assert stopped.value.code == 128 + signal.SIGTERM and unwound == [True]
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back
