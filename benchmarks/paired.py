"""Paired comparison of evaluation settings on the same questions (exact McNemar test).

    python benchmarks/paired.py benchmarks/results/default_eval/records fixed_ratio_4 no_context
    python benchmarks/paired.py benchmarks/results/peers_eval/records fixed_ratio_4  # vs all

Prints, for setting ``a`` against each other setting, the questions only one of them answers and
the p-value that says whether such a difference can be noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from semidyn_rag.metrics import mcnemar_exact


def correct_by_id(path: Path) -> dict[str, bool]:
    """``id -> correct`` of one setting's evaluation records."""
    with path.open() as f:
        return {row["id"]: row["correct"] for row in map(json.loads, f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("records", type=Path, help="an evaluation's records/ directory")
    parser.add_argument("a", help="a setting name, e.g. fixed_ratio_4")
    parser.add_argument(
        "others", nargs="*", help="settings to compare it with (default: every other one there)"
    )
    args = parser.parse_args()
    first = correct_by_id(args.records / f"{args.a}.jsonl")
    others = args.others or sorted(p.stem for p in args.records.glob("*.jsonl") if p.stem != args.a)
    print(f"| {args.a} vs | accuracy {args.a} / other | only {args.a} | only other | McNemar p |")
    print("|---|---:|---:|---:|---:|")
    for name in others:
        other = correct_by_id(args.records / f"{name}.jsonl")
        only_a, only_b, p = mcnemar_exact(first, other)
        acc_a, acc_b = (sum(d.values()) / len(d) for d in (first, other))
        print(f"| {name} | {acc_a:.3f} / {acc_b:.3f} | {only_a} | {only_b} | {p:.3f} |")


if __name__ == "__main__":
    main()
