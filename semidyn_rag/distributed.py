"""Corpus precompression on a Ray cluster, for corpora that outgrow one machine.

`RayExecutor` is the compression step of the one precompression job
(`semidyn_rag.precompress.precompress`): the driver plans as it does for a local run (deduplicates
the chunks, asks the store which keys are missing inside ``store.writer()``, tokenizes those texts
once), sorts them by length, and Ray Data streams them through ``map_batches`` on an
``ActorPoolStrategy`` pool whose actors each load the compressor once (``from_pretrained``).
Import this module only for a Ray run: it needs the ``ray`` extra.

Each actor writes its latents to a **parquet shard** (a ragged ``list<float16>`` column plus
``rows``/``hidden``) and returns only the shard's path; the driver merges shards into the
`LatentStore` as they arrive and deletes them. Why shards rather than returning latents through
Ray: the latents never pass through the object store (256 MiB here), the SQLite store keeps a
single writer, and finished work survives a crash of the driver. A shard is written to a temporary
name and renamed, so only complete shards exist; the next run merges any a killed run left behind
(keys already stored are skipped) before it plans, so it never compresses them again.

Shards carry the compressor fingerprint in their schema metadata: a shard of other weights is never
merged. On a multi-node cluster ``shard_dir`` must be a directory every node and the driver share.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .backbones import segment_count
from .extras import require
from .precompress import (
    Chunk,
    PrecompressConfig,
    PrecompressReport,
    RowError,
    Throughput,
    WorkPlan,
    plan_batches,
    precompress,
)
from .store import DTYPES, LatentStore, atomic_write, text_hash
from .types import CompressedContext

if TYPE_CHECKING:
    from .modeling import SemiDynamicCompressor

# Ray Data hands batches over as Arrow tables; the `ray` extra (ray[data]) brings pyarrow along.
pa = require("pyarrow", "precompression on Ray", extra="ray")
pq = require("pyarrow.parquet", "precompression on Ray", extra="ray")

logger = logging.getLogger(__name__)

LOOPBACK_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Without it set to 0, Ray binds the machine's external address and listens on all interfaces."""
LOOPBACK_ENV = {
    LOOPBACK_FLAG: "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
SHARD_SUFFIX = ".parquet"
FINGERPRINT_META = b"semidyn_fingerprint"


class RayConfig(BaseModel):
    """Where and how wide the Ray job runs (every field is a ``semidyn precompress --ray`` flag)."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(2, ge=1, description="actors in the pool, each with its own model copy")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved by (and threads of) an actor"
    )
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per actor (> 0 runs on cuda)")
    rows_per_task: int = Field(64, ge=1, description="chunks per map_batches call (one shard each)")
    address: str | None = Field(
        None, description="an existing cluster to join; default: a new local one on loopback"
    )
    num_cpus: int | None = Field(
        None, description="CPUs of a new local cluster (default workers x cpus_per_worker)"
    )
    object_store_mb: int = Field(256, ge=64, description="object store of a new local cluster")
    temp_dir: str = Field(
        "/tmp/ray_sd", description="Ray session dir; keep it short (unix sockets: 107 bytes)"
    )
    shard_dir: str | None = Field(
        None, description="where actors write shards (default STORE/ray_shards; shared on clusters)"
    )


@contextlib.contextmanager
def exit_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """While the body runs, ``signals`` raise ``SystemExit`` so that ``finally`` blocks run.

    Python's default for SIGTERM and SIGHUP ends the process without unwinding: a driver stopped
    by ``kill`` or a closed terminal would leave the Ray processes it started. Only the main thread
    can own signal handlers; elsewhere (and for SIGKILL, which nothing catches) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def ray_session(config: RayConfig) -> Iterator[Any]:
    """A Ray runtime for the job: joins one that is already up (and leaves it running), joins
    ``config.address``, or starts a local instance on loopback that is shut down afterwards,
    also when the driver is stopped by SIGTERM or SIGHUP (see :func:`exit_on_signals`)."""
    for name, value in LOOPBACK_ENV.items():
        os.environ.setdefault(name, value)
    if not config.address:  # our own instance: loopback whatever the environment says
        os.environ[LOOPBACK_FLAG] = "0"
    ray = require("ray", "precompression on Ray")
    from ray._private import ray_constants

    if ray.is_initialized():
        yield ray
        return
    if not config.address:  # ray may have been imported before the variable was set
        ray_constants.ENABLE_RAY_CLUSTER = False
    with exit_on_signals():
        try:
            if config.address:
                ray.init(address=config.address, logging_level=logging.WARNING)
            else:
                num_cpus = config.num_cpus or math.ceil(config.workers * config.cpus_per_worker)
                Path(config.temp_dir).mkdir(parents=True, exist_ok=True)
                ray.init(
                    address="local",  # never attach to another user's cluster found in /tmp/ray
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    object_store_memory=config.object_store_mb * 2**20,
                    _temp_dir=config.temp_dir,
                    logging_level=logging.WARNING,
                )
            yield ray
        finally:
            ray.shutdown()


# --- shards -------------------------------------------------------------------------------------


def _list_column(arrays: Sequence[np.ndarray], dtype: np.dtype) -> pa.ListArray:
    """Ragged rows as one Arrow list column (offsets + flat values): no per-element objects."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("a shard holds at most 2**31 latent values; lower rows_per_task")
    values = np.concatenate([a.ravel() for a in arrays]) if arrays else np.empty(0)
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values.astype(dtype))
    )


def shard_dtype(store_dtype: torch.dtype) -> np.dtype:
    """float16 stores get float16 shards (half the bytes); others get float32, which holds
    bfloat16 exactly, and are cast by ``put_many``."""
    return np.dtype(np.float16) if store_dtype == torch.float16 else np.dtype(np.float32)


def write_shard(
    path: str | Path,
    entries: Sequence[tuple[str, str, CompressedContext]],
    *,
    policy: str,
    fingerprint: str,
    dtype: np.dtype,
) -> Path:
    """Write ``(key, text_hash, context)`` entries as one parquet file, atomically (temp + rename).

    Columns: key, text_hash, policy, num_tokens, ratios, ys, latents (flattened ``[rows, hidden]``
    as ``list<float16>``, or ``list<float32>`` for wider stores), rows, hidden.
    """
    latents = []
    for key, _, ctx in entries:
        values = ctx.latents.detach().float().cpu().numpy()
        cast = values.astype(dtype)
        if bool((np.isfinite(values) & ~np.isfinite(cast)).any()):
            raise ValueError(f"entry {key}: latents overflow {dtype}; use a wider store dtype")
        latents.append(cast)
    table = pa.table(
        {
            "key": pa.array([e[0] for e in entries], pa.string()),
            "text_hash": pa.array([e[1] for e in entries], pa.string()),
            "policy": pa.array([policy] * len(entries), pa.string()),
            "num_tokens": pa.array([e[2].num_tokens for e in entries], pa.int64()),
            "ratios": pa.array(
                [list(e[2].segment_ratios) for e in entries], pa.list_(pa.float64())
            ),
            "ys": pa.array([list(e[2].segment_y) for e in entries], pa.list_(pa.float64())),
            "latents": _list_column(latents, dtype),
            "rows": pa.array([a.shape[0] for a in latents], pa.int32()),
            "hidden": pa.array([a.shape[1] for a in latents], pa.int32()),
        }
    ).replace_schema_metadata({FINGERPRINT_META: fingerprint.encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: pq.write_table(table, handle))


def read_shard(path: str | Path) -> tuple[str, list[tuple[str, str, str, CompressedContext]]]:
    """A shard's fingerprint and its ``(key, text_hash, policy, context)`` entries.

    Raises ``ValueError`` naming the file when it is not a readable shard."""
    try:
        return _read_shard(path)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise ValueError(f"{path} is not a readable latent shard: {exc}") from exc


def _read_shard(path: str | Path) -> tuple[str, list[tuple[str, str, str, CompressedContext]]]:
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    fingerprint = meta.get(FINGERPRINT_META, b"").decode()
    rows = table.column("rows").to_pylist()
    hidden = table.column("hidden").to_pylist()
    flat = table.column("latents").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    bounds = np.cumsum([0] + [r * h for r, h in zip(rows, hidden)])
    if bounds[-1] != flat.size:
        raise ValueError(f"{path}: {flat.size} latent values, the shapes need {bounds[-1]}")
    columns = {n: table.column(n).to_pylist() for n in ("key", "text_hash", "policy")}
    num_tokens = table.column("num_tokens").to_pylist()
    ratios, ys = table.column("ratios").to_pylist(), table.column("ys").to_pylist()
    entries = []
    for i, key in enumerate(columns["key"]):
        values = flat[bounds[i] : bounds[i + 1]].reshape(rows[i], hidden[i])
        latents = torch.from_numpy(values.copy())
        ctx = CompressedContext(latents, num_tokens[i], tuple(ratios[i]), tuple(ys[i]))
        entries.append((key, columns["text_hash"][i], columns["policy"][i], ctx))
    return fingerprint, entries


def merge_shards(store: LatentStore, paths: Iterable[str | Path]) -> tuple[int, int]:
    """Put the shards' entries the store lacks (one transaction per shard), then delete them.

    Shards of another compressor are left in place with a warning. Returns (written, skipped).
    """
    written = skipped = 0
    for path in paths:
        fingerprint, entries = read_shard(path)
        if fingerprint != store.fingerprint:
            logger.warning("%s holds latents of compressor %r; not merged", path, fingerprint)
            continue
        missing = set(store.missing(e[0] for e in entries))
        by_policy: dict[str, list[tuple[str, str, CompressedContext]]] = {}
        for key, hash_, policy, ctx in entries:
            if key in missing:
                missing.discard(key)
                by_policy.setdefault(policy, []).append((key, hash_, ctx))
        for policy, items in by_policy.items():
            written += store.put_many(
                [(k, c) for k, _, c in items],
                text_hashes={k: h for k, h, _ in items},
                policy=policy,
            )
        skipped += len(entries) - sum(len(v) for v in by_policy.values())
        Path(path).unlink()
    return written, skipped


def leftover_shards(shard_dir: Path) -> list[Path]:
    """Complete shards a killed run left behind (temporary files are ignored and removed)."""
    if not shard_dir.is_dir():
        return []
    for temp in shard_dir.glob(".*.tmp"):
        temp.unlink(missing_ok=True)
    return sorted(shard_dir.glob(f"*{SHARD_SUFFIX}"))


class CompressShards:
    """The ``map_batches`` callable: loads the compressor once per actor, writes one shard per call.

    Also usable without Ray (tests, debugging): it is a plain class.
    """

    def __init__(
        self,
        compressor: str | None,
        shard_dir: str,
        policy: str,
        scale: float,
        ratio: float | None,
        store_dtype: str,
        batch_tokens: int,
        max_batch_rows: int,
        device: str = "cpu",
        threads: int = 1,
    ) -> None:
        from .modeling import SemiDynamicCompressor

        torch.set_num_threads(max(1, threads))
        self.model = SemiDynamicCompressor.from_pretrained(compressor, device=device).eval()
        self.shard_dir = Path(shard_dir)
        self.policy, self.scale, self.ratio = policy, scale, ratio
        self.dtype = shard_dtype(DTYPES[store_dtype])
        self.batch_tokens, self.max_batch_rows = batch_tokens, max_batch_rows

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        keys = batch.column("key").to_pylist()
        hashes = batch.column("text_hash").to_pylist()
        ids = batch.column("ids").to_pylist()
        size = self.model.config.max_segment_tokens
        contexts: dict[int, CompressedContext] = {}
        for part in plan_batches(
            [len(t) for t in ids],
            batch_tokens=self.batch_tokens,
            max_rows=self.max_batch_rows,
            segment_tokens=size,
        ):
            lists = [ids[i] for i in part]
            segments = sum(segment_count(len(t), size) for t in lists)
            out = self.model.compress_tokens(lists, self.scale, self.ratio, batch_size=segments)
            contexts.update(zip(part, out))
        entries = [(keys[i], hashes[i], contexts[i]) for i in range(len(keys))]
        path = write_shard(
            self.shard_dir / f"{uuid.uuid4().hex}{SHARD_SUFFIX}",
            entries,
            policy=self.policy,
            fingerprint=self.model.fingerprint,
            dtype=self.dtype,
        )
        return {
            "shard": np.array([str(path)]),
            "chunks": np.array([len(keys)]),
            "tokens": np.array([sum(len(t) for t in ids)]),
            "latents": np.array([sum(c.num_latents for c in contexts.values())]),
        }


# --- the Ray executor -----------------------------------------------------------------------------


class RayExecutor:
    """The compression step of `semidyn_rag.precompress.precompress` on Ray actors.

    ``compressor`` is what every actor passes to ``from_pretrained`` (a path all nodes can read,
    a hub id, or ``None`` for the bundled default); the job's own compressor, on the driver, must
    be the same model (it plans, and the store checks its fingerprint). Ray is started only when
    a run has texts to compress (`ray_session`); finished shards of a killed run are merged before
    the plan (:meth:`recover`).
    """

    def __init__(self, compressor: str | Path | None, config: RayConfig | None = None) -> None:
        self.compressor = compressor
        self.config = config or RayConfig()

    @property
    def name(self) -> str:
        return f"ray ({self.config.workers} workers)"

    def shard_dir(self, store: LatentStore) -> Path:
        """Where actors write shards: ``config.shard_dir``, else ``STORE/ray_shards``."""
        return Path(self.config.shard_dir or store.path / "ray_shards")

    def recover(self, store: LatentStore) -> None:
        """Merge the complete shards a killed run left (see `leftover_shards`)."""
        old = leftover_shards(self.shard_dir(store))
        if old:
            written, _ = merge_shards(store, old)
            logger.info("merged %d entries from %d shards of an earlier run", written, len(old))

    def run(
        self,
        compressor: SemiDynamicCompressor,
        store: LatentStore,
        plan: WorkPlan,
        config: PrecompressConfig,
    ) -> tuple[int, int]:
        """See `semidyn_rag.precompress.Executor.run` (``compressor`` is the driver's; the actors
        load their own from ``self.compressor``)."""
        return _run_ray(self.compressor, store, plan, self.shard_dir(store), config, self.config)

    def __repr__(self) -> str:
        return f"RayExecutor({self.compressor!r}, {self.config!r})"


def precompress_ray(
    compressor: str | Path | None,
    chunks: Sequence[Chunk],
    store: LatentStore | str | Path,
    config: PrecompressConfig | None = None,
    ray_config: RayConfig | None = None,
    *,
    model: SemiDynamicCompressor | None = None,
    store_dtype: str = "float16",
    input_errors: Sequence[RowError] = (),
    empty_documents: Sequence[str] | None = None,
) -> PrecompressReport:
    """`semidyn_rag.precompress.precompress` with a `RayExecutor`: the same plan, sync and report,
    the encoder work spread over Ray actors.

    ``compressor`` is what every actor loads (see `RayExecutor`). The driver needs the same model
    for the fingerprint and the tokenizer: pass it as ``model`` if it is already loaded. Nothing is
    sent to Ray when the store already holds every chunk.
    """
    from .modeling import SemiDynamicCompressor

    model = model or SemiDynamicCompressor.from_pretrained(compressor).eval()
    return precompress(
        model,
        chunks,
        store,
        config,
        executor=RayExecutor(compressor, ray_config),
        store_dtype=store_dtype,
        input_errors=input_errors,
        empty_documents=empty_documents,
    )


def _run_ray(
    compressor: str | Path | None,
    store: LatentStore,
    plan: WorkPlan,
    shard_dir: Path,
    config: PrecompressConfig,
    ray_config: RayConfig,
) -> tuple[int, int]:
    """Dispatch ``plan.todo`` (tokenized once by the plan, longest first) and merge shards as
    they finish."""
    todo = plan.todo
    keys = list(todo)
    token_lists = [plan.tokens[k] for k in keys]
    order = sorted(range(len(keys)), key=lambda i: -len(token_lists[i]))
    items = [
        {"key": keys[i], "text_hash": text_hash(todo[keys[i]]), "ids": token_lists[i]}
        for i in order
    ]
    gpu = ray_config.gpus_per_worker > 0
    policy = config.compression
    worker_args = {
        "compressor": str(compressor) if compressor is not None else None,
        "shard_dir": str(shard_dir.resolve()),
        "policy": policy.key,
        "scale": policy.scale,
        "ratio": policy.ratio,
        "store_dtype": str(store.dtype).removeprefix("torch."),
        "batch_tokens": config.batch_tokens,
        "max_batch_rows": config.max_batch_rows,
        "device": "cuda" if gpu else "cpu",
        "threads": max(1, int(ray_config.cpus_per_worker)),
    }
    tokens = latents = 0
    progress = Throughput(len(items), config.progress, desc="precompress (ray)")
    try:
        with ray_session(ray_config) as ray:
            from ray.data import ActorPoolStrategy, DataContext

            DataContext.get_current().enable_progress_bars = False  # ours counts chunks and tokens
            dataset = ray.data.from_items(items).map_batches(
                CompressShards,
                fn_constructor_kwargs=worker_args,
                batch_size=ray_config.rows_per_task,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(size=ray_config.workers),
                num_cpus=ray_config.cpus_per_worker,
                num_gpus=ray_config.gpus_per_worker or None,
            )
            for row in dataset.iter_rows():
                merge_shards(store, [row["shard"]])
                tokens += int(row["tokens"])
                latents += int(row["latents"])
                progress.update(int(row["chunks"]), int(row["tokens"]))
    finally:
        progress.close()
    left = store.missing(keys)
    if left:
        raise RuntimeError(f"the Ray job finished but {len(left)} chunks are not in the store")
    return tokens, latents
