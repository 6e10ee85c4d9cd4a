"""LatentService in front of a store: a cache write that fails does not fail the query."""

from __future__ import annotations

import errno

import pytest
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


def test_a_call_overrides_the_services_policy_and_keys_follow_it(compressor, tmp_path):
    with LatentStore(tmp_path / "store", compressor.fingerprint) as store:
        service = LatentService(compressor, store, scale=1.0)
        assert (service.scale, service.ratio) == (1.0, None)
        assert service.policy_for(ratio=2).key == "ratio=2.0"
        assert (
            service.keys(TEXTS) == service.keys(TEXTS, scale=1.0) != service.keys(TEXTS, scale=0.0)
        )
        fixed = service.compress(TEXTS, ratio=2)
        assert [c.context.ratio for c in fixed] == [2.0, 2.0]
        # a fixed ratio ignores the scale: the same entries, whatever scale the call names
        assert [c.key for c in fixed] == service.keys(TEXTS, scale=-3.0, ratio=2)
        assert store.info().policies == {"ratio=2.0": 2}
    with pytest.raises(ValueError, match="scale must be a finite number"):
        LatentService(compressor, scale=float("nan"))
    with pytest.raises(ValueError, match="ratio must be a finite number >= 1"):
        LatentService(compressor).compress(TEXTS, ratio=0.5)
