"""Cold vs warm load of the bundled compressor, measured in one run.

    python benchmarks/bench_load.py [--warm-runs 3] [--compressor DIR]

*Cold* is a first load on this machine: ``SEMIDYN_CACHE`` points at an empty temporary directory,
so the GGUF base is read, de-quantised and written to the cache (`semidyn_rag.loading`). *Warm*
loads again from that cache. Each load runs in a fresh Python process (as a user's command does),
which reports the ``from_pretrained`` time and its import time; the table shows both and the
whole process, and the cold/warm ratio of the ``from_pretrained`` medians. The temporary cache is
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time
start = time.perf_counter()
from semidyn_rag import SemiDynamicCompressor
import torch, transformers, peft  # noqa: F401  (what from_pretrained needs, imported up front)
imported = time.perf_counter()
SemiDynamicCompressor.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else None)
done = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": done - imported}))
"""


def one_load(cache: str, compressor: str | None) -> dict[str, float]:
    """One load in a fresh process with ``SEMIDYN_CACHE=cache``: its timings in seconds."""
    env = {**os.environ, "SEMIDYN_CACHE": cache, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, "-c", CHILD, *([compressor] if compressor else [])]
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"load failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "process_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--warm-runs", type=int, default=3, help="warm loads (median is used)")
    parser.add_argument("--compressor", default=None, help="checkpoint (default: bundled)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="semidyn-bench-cache-") as cache:
        cold = one_load(cache, args.compressor)
        warm = [one_load(cache, args.compressor) for _ in range(args.warm_runs)]

    def median(key: str) -> float:
        return statistics.median(w[key] for w in warm)

    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    print("| load | from_pretrained (s) | imports (s) | whole process (s) |")
    print("|---|---|---|---|")
    print(f"| cold (empty cache) | {cold['load_s']:.2f} | {cold['import_s']:.2f} | "
          f"{cold['process_s']:.2f} |")  # fmt: skip
    print(f"| warm (median of {len(warm)}) | {median('load_s'):.2f} | {median('import_s'):.2f} | "
          f"{median('process_s'):.2f} |")  # fmt: skip
    print(f"cold / warm from_pretrained: {cold['load_s'] / median('load_s'):.1f}x")


if __name__ == "__main__":
    main()
