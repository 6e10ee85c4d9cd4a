"""Does the decoder answer from memory?

    python benchmarks/memorization.py                      # the bundled default, ratio 4
    python benchmarks/memorization.py --checkpoint runs/default/recall/checkpoint-240 --ratios 4 8 --out x

A trained compressor's adapter has seen its training questions with their answers; it may have
learnt the answers rather than how to read them from the latents. At each ratio, on
``--questions`` SQuAD training questions and as many held-out ones (the articles
``recipes/default.py eval`` holds out; each set by the same seed as ``eval`` samples):

1. **Own paragraph**: the answer read from the latents of the question's own paragraph (what
   ``eval``'s ``fixed_ratio_<r>`` measures).
2. **Another question's paragraph**: the same question reading the latents of another question's
   paragraph (`swap_paragraphs`: the next question in the list whose paragraph differs, cyclically).
   Right answers here came from the decoder, not from the latents (save the few whose answer that
   other paragraph happens to hold too; counted as ``answer_in_other``).
3. **Full context**: the untouched base decoder on the text, the ceiling.

A decoder that answers training questions from another question's paragraph has learnt their
answers; the gap between own and another paragraph on held-out questions is what it reads from the
latents. Answers by `semidyn_rag.evaluation.Evaluator` (batch 8, 24 new tokens, as ``eval``), its
records under ``--out``/records/{train,train_swapped,held_out,held_out_swapped} (a rerun resumes
them); ``memorization.json`` and ``memorization.md`` in ``--out``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from _common import SEED, load_model, parser, portable, recipe_split, setup

from semidyn_rag.data import QASample, sample
from semidyn_rag.evaluation import Evaluator, select_settings
from semidyn_rag.metrics import substring_match

logger = logging.getLogger("benchmarks.memorization")

EVAL = {"batch_size": 8, "max_new_tokens": 24}  # as recipes/default.py evaluates
SPLITS = ("train", "held_out")


def swap_paragraphs(questions: Sequence[QASample]) -> list[QASample]:
    """Each question with the contexts of the next question in the list whose contexts differ
    from its own, cyclically (questions asked of one paragraph skip each other), under the id
    ``<its id>@<the other's id>``: an evaluation resumed by id never takes an answer given with
    other contexts for it.

    ``ValueError`` when the questions do not span at least two different paragraphs.
    """
    if len({tuple(q.contexts) for q in questions}) < 2:
        raise ValueError("swapping paragraphs needs questions on at least two different paragraphs")
    n = len(questions)
    swapped = []
    for i, q in enumerate(questions):
        other = next(
            questions[(i + k) % n]
            for k in range(1, n)
            if questions[(i + k) % n].contexts != q.contexts
        )
        swapped.append(
            q.model_copy(update={"id": f"{q.id}@{other.id}", "contexts": other.contexts})
        )
    return swapped


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(out=Path(__file__).resolve().parent / "results" / "memorization")
    p.add_argument("--ratios", type=float, nargs="+", default=[4.0])
    p.add_argument("--questions", type=int, default=100, help="of each split")
    args = p.parse_args()
    if args.questions < 2 or any(r < 1 for r in args.ratios):
        p.error("--questions must be >= 2 and every ratio >= 1")
    dtype = setup(args)
    model, what, trained = load_model(args, dtype)
    if not trained:
        p.error("an untrained compressor has learnt nothing to remember: pass --checkpoint")
    train, held_out = recipe_split(args.squad)
    asked = {
        "train": sample(train, args.questions, SEED),
        "held_out": sample(held_out, args.questions, SEED),
    }
    soft = select_settings(model, [f"fixed_ratio_{r:g}" for r in args.ratios])
    full = select_settings(model, ["full_context"])

    results: dict = {
        "model": what,
        "questions": {},
        "answer_in_other": {},
        "full_context": {},
        "ratios": {},
    }
    for split in SPLITS:
        questions = asked[split]
        swapped = swap_paragraphs(questions)
        results["questions"][split] = len(questions)
        results["answer_in_other"][split] = sum(
            substring_match(" ".join(s.contexts), s.answers) for s in swapped
        )
        own, other = (
            Evaluator(model, qs, args.out / "records" / name, **EVAL)
            for qs, name in ((questions, split), (swapped, f"{split}_swapped"))
        )
        results["full_context"][split] = own.run_setting(full[0]).summary.accuracy
        logger.info("%s: full context %.3f", split, results["full_context"][split])
        for setting in soft:
            row = {
                "own": own.run_setting(setting).summary.accuracy,
                "other": other.run_setting(setting).summary.accuracy,
            }
            mine, theirs = own.records(setting), other.records(setting)
            row["other_only"] = sum(
                theirs[t.id].correct and not mine[q.id].correct
                for q, t in zip(questions, swapped, strict=True)
            )
            results["ratios"].setdefault(f"{setting.ratio:g}", {})[split] = row
            logger.info("%s, %s: %s", split, setting.name, row)

    args.out.mkdir(parents=True, exist_ok=True)
    results["command"] = " ".join(
        ["python", "benchmarks/memorization.py", *map(portable, sys.argv[1:])]
    )
    (args.out / "memorization.json").write_text(json.dumps(results, indent=2) + "\n")
    report = _report(results)
    (args.out / "memorization.md").write_text(report)
    print(report)


def _report(results: dict) -> str:
    n = results["questions"]
    lines = [
        f"# Does the decoder answer from memory? ({results['model']})",
        "",
        f"Substring accuracy on {n['train']} SQuAD training questions and {n['held_out']} "
        "held-out ones (the articles `eval` holds out), each question reading the latents of its "
        "own paragraph or of another question's paragraph; full context is the base decoder on "
        "the text.",
        "",
        "| reading | training questions | held-out questions |",
        "|---|---:|---:|",
    ]
    for ratio, row in results["ratios"].items():
        train, held = row["train"], row["held_out"]
        lines += [
            f"| own paragraph, r={ratio} | {train['own']:.3f} | {held['own']:.3f} |",
            f"| another question's paragraph, r={ratio} | {train['other']:.3f} "
            f"| {held['other']:.3f} |",
        ]
    full, inside = results["full_context"], results["answer_in_other"]
    only = ", ".join(
        f"r={ratio}: {row['train']['other_only']} training, {row['held_out']['other_only']} "
        "held-out"
        for ratio, row in results["ratios"].items()
    )
    lines += [
        f"| full context | {full['train']:.3f} | {full['held_out']:.3f} |",
        "",
        "A decoder that answers training questions with another question's paragraph has learnt "
        "their answers; the gap between own and another question's paragraph on held-out "
        "questions is what it reads from the latents. The other paragraph holds an answer of "
        f"{inside['train']} training and {inside['held_out']} held-out questions (those may be "
        f"read, not remembered). Right only with the other paragraph: {only}.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
