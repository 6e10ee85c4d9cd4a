"""LatentService in front of a store: a cache write that fails does not fail the query."""

from __future__ import annotations

import errno

import torch

from semidyn_rag.service import LatentService
from semidyn_rag.store import LatentStore

TEXTS = ["Alice was born in 1990 in Lyon.", "Bob moved to Oslo in 2004 with his sister."]


def test_a_full_disk_while_caching_still_serves_the_computed_latents(
    compressor, tmp_path, monkeypatch, caplog
):
    with LatentStore(tmp_path / "store", compressor.fingerprint) as store:
        reference = LatentService(compressor).compress(TEXTS, ratio=2)

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store, "put_many", full)
        service = LatentService(compressor, store)
        got = service.compress(TEXTS, ratio=2)
        assert store.failed_writes == 2
        assert "not cached" in caplog.text
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(
                a.context.latents.float(), b.context.latents.float(), atol=1e-2, rtol=1e-2
            )
        monkeypatch.undo()
        assert store.get_many([g.key for g in got]) == {}  # nothing half-written
