"""Soft compression (the bundled default) against text-compression peers on held-out SQuAD.

    python benchmarks/eval_peers.py --limit 40 --settings full_context no_context \
        fixed_ratio_4 fixed_ratio_8 truncation_4 truncation_8 llmlingua_4 longllmlingua_4

The held-out questions are those of the default recipe (whole SQuAD articles it never trained on,
same split and seed). Every setting runs on the same questions and the same decoder; results go to
``benchmarks/results/peers_eval/`` (table, Pareto plot, per-question records), resumable. Compare
two settings question by question with ``benchmarks/paired.py``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from _common import SEED, SQUAD, recipe_split
from _timing import passive_openmp

from semidyn_rag.data import sample
from semidyn_rag.evaluation import CheckpointRef, Evaluator, select_settings

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=None, help="default: the bundled compressor")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--settings", nargs="+", default=["quick"])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "peers_eval")
    args = parser.parse_args()
    passive_openmp()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _, held_out = recipe_split(SQUAD)
    model = CheckpointRef(args.checkpoint)
    evaluator = Evaluator(
        model, sample(held_out, args.limit, SEED), args.out, max_new_tokens=args.max_new_tokens
    )
    evaluator.run(select_settings(model, args.settings))
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
