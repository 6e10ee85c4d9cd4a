"""Interleaved timing on a shared, noisy machine.

Every variant runs once per round; rounds alternate the order (ABC, CBA, ABC, ...) so that a load
change drifts over all variants alike. Comparisons use the median over rounds of the *paired* ratio
(variant A and B of the same round ran seconds apart), which cancels most of the load noise that
absolute medians keep.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

Measure = Callable[[], object]
"""A variant: runs once; may return extra timings (seconds) measured inside, e.g. time to first
token. Any other return value is ignored."""


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def passive_openmp() -> None:
    """Re-run this process with ``OMP_WAIT_POLICY=PASSIVE`` unless the caller chose a policy.

    On an oversubscribed machine, OpenMP threads that spin-wait at every barrier stall whenever a
    sibling thread is descheduled: here, at load 8 on 2 cores, a SmolLM2 prefill on 2 torch
    threads was 5.6x slower than on 1 (interleaved, same process) and 4x noisier; with passive
    waiting 2 threads matched 1. libgomp reads the policy when it is loaded, hence the re-exec.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def load_note() -> str:
    """The machine's load right now: the honest caveat for every absolute time we print."""
    one, five, fifteen = os.getloadavg()
    return f"loadavg {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


@dataclass
class Samples:
    """Per variant and key, the seconds of each timed round (same round = same list index)."""

    data: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, name: str, key: str, seconds: float) -> None:
        self.data.setdefault(name, {}).setdefault(key, []).append(seconds)

    def median(self, name: str, key: str = "wall") -> float:
        return statistics.median(self.data[name][key])

    def spread(self, name: str, key: str = "wall") -> float:
        """(max - min) / median over rounds: how noisy this variant's absolute time was."""
        values = self.data[name][key]
        return (max(values) - min(values)) / statistics.median(values)

    def ratio(
        self, num: str | Sequence[str], den: str, key: str = "wall", den_key: str | None = None
    ) -> float:
        """Median over rounds of ``num / den`` measured in the same round (> 1: ``den`` is faster).

        Several ``num`` variants are summed per round (e.g. compress + prefill against plain).
        """
        names = [num] if isinstance(num, str) else list(num)
        top = [sum(run) for run in zip(*(self.data[n][key] for n in names), strict=True)]
        bottom = self.data[den][den_key or key]
        return statistics.median(a / b for a, b in zip(top, bottom, strict=True))


def interleave(
    variants: Mapping[str, Measure],
    *,
    reps: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    prepare: Mapping[str, Callable[[], object]] | None = None,
) -> Samples:
    """Run ``warmup + reps`` rounds of all variants in alternating order; keep the timed rounds.

    Each run records ``wall`` (seconds, GPU synchronised), ``cpu`` (this process's CPU seconds,
    all threads: on a shared CPU it counts our work, not the waits for other tenants, so its ratios
    are steadier; meaningless for GPU work) and whatever keys the variant returns. ``prepare``
    holds untimed steps to run right before a variant (e.g. selecting the state it assumes).
    """
    names = list(variants)
    samples = Samples()
    for round_ in range(warmup + reps):
        order = names if round_ % 2 == 0 else names[::-1]
        timed = round_ >= warmup
        for name in order:
            if prepare and name in prepare:
                prepare[name]()
            sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            result = variants[name]()
            sync(device)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if timed:
                samples.add(name, "wall", wall)
                samples.add(name, "cpu", cpu)
                for key, value in (result if isinstance(result, Mapping) else {}).items():
                    samples.add(name, key, value)
        logger.info(
            "round %d/%d done (%s)%s",
            round_ + 1,
            warmup + reps,
            load_note(),
            "" if timed else " [warm-up, discarded]",
        )
    return samples
