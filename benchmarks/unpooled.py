"""Where do the answers go: the bundled default with its latents not pooled (r=1) beside r=2 and 4.

    python benchmarks/unpooled.py                      # 100 held-out questions, r = 1, 2, 4
    python benchmarks/unpooled.py --ratios 1 --questions 40 --out /tmp/unpooled

At r=1 every encoder state (layer 2 of the bundled default) goes through the converter into the
decoder on its own, with nothing averaged: the same path as the compressed latents, less the
pooling. Accuracy there near full context says the converter and the decoder read encoder states
well and the answers are lost where windows are averaged; accuracy far below it says the reading
itself loses them, whatever the ratio. r=1 is not among the candidates the default was trained
on (`selector.check_ratio` refuses it in use), so this diagnostic adds it to the loaded model's
candidates. Same questions and generation as ``recipes/default.py eval`` (its held-out articles,
the first ``--questions`` of them by the seed); records under ``--out``/records,
``unpooled.json`` and ``unpooled.md`` in ``--out``.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
from _common import ROOT, SEED, parser, portable, recipe_split, setup
from memorization import EVAL

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.data import sample
from semidyn_rag.evaluation import Evaluator, select_settings

logger = logging.getLogger("benchmarks.unpooled")

HEAD_LAYER = 2  # as recipes/default.py reads the ratio head (encoding stops there)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(out=ROOT / "results" / "unpooled")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--questions", type=int, default=100, help="held-out questions (as eval)")
    args = p.parse_args()
    if args.questions < 1 or any(r < 1 for r in args.ratios):
        p.error("--questions must be >= 1 and every ratio >= 1")
    setup(args)
    model = SemiDynamicCompressor.from_pretrained(
        args.checkpoint, device=args.device, dtype=torch.float32, head_layer=HEAD_LAYER
    )
    added = sorted(set(args.ratios) - set(model.config.ratios))
    if added:
        logger.warning("ratios %s are not among the trained candidates: added for this run", added)
        model.config.ratios = sorted({*model.config.ratios, *args.ratios})
    _, held_out = recipe_split(args.squad)
    questions = sample(held_out, args.questions, SEED)
    evaluator = Evaluator(model, questions, args.out / "records", **EVAL)
    names = ["full_context", *(f"fixed_ratio_{r:g}" for r in args.ratios)]
    results = {
        "questions": len(questions),
        "untrained_ratios": added,
        "accuracy": {
            s.name: evaluator.run_setting(s).summary.accuracy for s in select_settings(model, names)
        },
        "command": " ".join(["python", "benchmarks/unpooled.py", *map(portable, sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unpooled.json").write_text(json.dumps(results, indent=2) + "\n")
    full = results["accuracy"]["full_context"]
    lines = [
        f"# The bundled default with and without pooling ({len(questions)} held-out questions)\n",
        "| setting | accuracy | of full context |",
        "|---|---:|---:|",
        *(
            f"| {name} | {acc:.2f} | {acc / full:.0%} |" if full else f"| {name} | {acc:.2f} | – |"
            for name, acc in results["accuracy"].items()
        ),
        "",
        f"Ratios not trained on (added for this run): {added or 'none'}.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    (args.out / "unpooled.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
