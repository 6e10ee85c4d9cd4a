"""Can the decoder learn to answer from the latents at all, given enough passes? A capacity check.

    python benchmarks/fit_capacity.py                       # 64 questions, 400 steps, ratio 4
    python benchmarks/fit_capacity.py --samples 32 --steps 200 --out /tmp/fit

Every variant of the default's recipe trained on the CPU answers about as often as the fifth
phase (docs/experiments.md), which saw each of its few hundred training answers about once. This
asks whether more passes over the same answers would teach the decoder to read them from the
latents, or whether the latents at this ratio (or a LoRA decoder reading them) cannot carry them:

1. Take the single-paragraph teacher answers of ``runs/default/teacher.jsonl`` (``recipes/default.py
   teach``) whose text holds the gold span, so each target is right, on paragraphs with at least
   two such answers; per paragraph the last is held aside and the others train, up to
   ``--samples`` (`split_aside`).
2. Answer at ``--ratio`` with the bundled default: the trained questions reading their own
   paragraph's latents and another question's (`memorization.swap_paragraphs`); the held-aside
   questions, which the base decoder answers right from the same paragraphs' text but training
   never shows; and ``--held-out`` questions of the held-out articles (the ones ``eval`` asks).
   The untouched base decoder on the full text gives each set's ceiling.
3. Train the bundled default on the trained answers alone (the fifth phase's settings: KD and CE
   on the teacher's answer, encoder side held, only ``--ratio``) for ``--steps`` steps of batch 4,
   so each answer is seen ``4 × steps / samples`` times; answer every set again.

Reading: the trained questions right from their own latents and wrong from another's means the
decoder learnt to get these answers out of these latents, either by reading them or by keying
answers it learnt by heart to its paragraph's latents; the held-aside questions tell the two apart
(reading the trained paragraphs better carries over to them, keyed memory does not), and the
held-out articles say what the passes cost elsewhere. Right with neither latents means the
latents at this ratio, or the adapter reading them, do not carry the answers. Records under
``--out``/records/<full|before|after>_<set>; ``fit_capacity.json`` and ``fit_capacity.md`` in
``--out``. Checkpoints go to ``--run-dir``/<run key> (``runs/fit_capacity``, not kept in git):
the key digests the starting model's fingerprint, the trained answers and the training
settings, so an interrupted run resumes from its last checkpoint (every 50 steps) and another
configuration (a newly shipped default included) never finishes or reuses it; answers already
recorded under ``--out`` for the same model are not asked again (another model's are refused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import ROOT, SEED, parser, portable, recipe_split, setup
from memorization import EVAL, swap_paragraphs

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.data import QASample, sample
from semidyn_rag.evaluation import Evaluator, select_settings
from semidyn_rag.metrics import substring_match
from semidyn_rag.training.samples import TrainSample, read_jsonl
from semidyn_rag.training.trainer import TrainConfig, Trainer

logger = logging.getLogger("benchmarks.fit_capacity")

RUN = ROOT.parent / "runs"
TEACHER = RUN / "default" / "teacher.jsonl"
HEAD_LAYER = 2  # as recipes/default.py reads the ratio head (encoding stops there)


def right_answers(path: Path, limit: int = 0) -> list[TrainSample]:
    """The single-paragraph teacher answers among the first ``limit`` lines of ``path`` (0: all)
    that hold their gold span, in file order. A limit keeps the pick fixed while a longer
    ``teach`` run appends to the file.

    Raises:
        FileNotFoundError: ``path`` is missing (``recipes/default.py teach`` writes it).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python recipes/default.py teach`")
    taught = read_jsonl(path)
    return [
        s
        for s in (taught[:limit] if limit else taught)
        if len(s.contexts) == 1
        and s.teacher is not None
        and s.provenance.get("gold")
        and substring_match(s.answer, [s.provenance["gold"]])
    ]


def split_aside(
    right: Sequence[TrainSample], count: int
) -> tuple[list[TrainSample], list[TrainSample]]:
    """``count`` answers to train on, and one held-aside answer on each of their paragraphs.

    Only paragraphs with at least two answers in ``right`` take part, in order of first
    appearance: the last answer of each is held aside (unless its question is also asked in
    training), the others train until there are ``count``.

    Raises:
        ValueError: fewer than ``count`` answers to train on, fewer than two paragraphs, or no
            held-aside question that training does not also ask.
    """
    by_paragraph: dict[str, list[TrainSample]] = {}
    for s in right:
        by_paragraph.setdefault(s.contexts[0], []).append(s)
    trained: list[TrainSample] = []
    aside: list[TrainSample] = []
    for answers in by_paragraph.values():
        if len(trained) == count:
            break
        if len(answers) < 2:
            continue
        trained += answers[:-1][: count - len(trained)]
        aside.append(answers[-1])
    if len(trained) < count:
        raise ValueError(
            f"{len(trained)} right answers on paragraphs with another right answer to hold "
            f"aside, asked {count}: teach more questions (`--teach-limit 0`)"
        )
    if len({s.contexts[0] for s in trained}) < 2:
        # swap_paragraphs needs another paragraph's latents for each question
        raise ValueError(f"the {count} answers to train on share one paragraph: ask more")
    asked = {s.question for s in trained}
    kept = [s for s in aside if s.question not in asked]
    if not kept:  # the report would lose its held-aside row without a word
        raise ValueError("every held-aside question is also asked in training: no row to compare")
    return trained, kept


def run_key(start: str, samples: Sequence[TrainSample], config: TrainConfig) -> str:
    """A short digest of what decides the trained weights: the starting model (its
    fingerprint), the trained answers (ids and texts) and the training settings (all but
    ``output_dir``)."""
    what = {
        "start": start,
        "samples": [(s.id, s.question, s.answer) for s in samples],
        "config": config.model_dump(mode="json", exclude={"output_dir"}),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def as_questions(samples: list[TrainSample]) -> list[QASample]:
    """The training samples as evaluation questions, their gold span the reference."""
    return [
        QASample(
            id=s.id,
            question=s.question,
            contexts=s.contexts,
            answers=[s.provenance["gold"]],
            source=s.source,
        )
        for s in samples
    ]


def answer_rates(
    model: SemiDynamicCompressor,
    sets: dict[str, list[QASample]],
    ratio: float,
    out: Path,
    when: str,
) -> dict[str, float]:
    """Accuracy at ``ratio`` on each named set of questions (records in ``out/records/<when>_<name>``)."""
    setting = select_settings(model, [f"fixed_ratio_{ratio:g}"])[0]
    rates = {}
    for name, qs in sets.items():
        evaluator = Evaluator(model, qs, out / "records" / f"{when}_{name}", **EVAL)
        rates[name] = evaluator.run_setting(setting).summary.accuracy
    logger.info("%s training: %s", when, rates)
    return rates


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(out=ROOT / "results" / "fit_capacity")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--held-out", type=int, default=100, help="held-out questions (as eval)")
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument(
        "--teacher-limit",
        type=int,
        default=512,
        help="read the first N teacher answers (512: what `teach` writes by default; 0: all)",
    )
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16")
    p.add_argument("--run-dir", type=Path, default=RUN / "fit_capacity", help="checkpoints")
    args = p.parse_args()
    if (
        args.samples < 2
        or args.steps < 1
        or args.ratio < 1
        or args.held_out < 0
        or args.teacher_limit < 0
    ):
        p.error("--samples >= 2, --steps >= 1, --ratio >= 1, --held-out >= 0, --teacher-limit >= 0")
    setup(args)
    samples, aside = split_aside(right_answers(args.teacher, args.teacher_limit), args.samples)
    trained = as_questions(samples)
    _, held_out = recipe_split(args.squad)
    sets = {
        "trained": trained,
        "trained_other": swap_paragraphs(trained),
        "aside": as_questions(aside),
        "held_out": sample(held_out, args.held_out, SEED) if args.held_out else [],
    }
    sets = {name: qs for name, qs in sets.items() if qs}
    model = SemiDynamicCompressor.from_pretrained(
        args.checkpoint, device=args.device, dtype=torch.float32, head_layer=HEAD_LAYER
    )
    results: dict = {
        "samples": len(samples),
        "steps": args.steps,
        "ratio": args.ratio,
        "questions": {name: len(qs) for name, qs in sets.items()},
    }
    full = select_settings(model, ["full_context"])[0]
    results["full_context"] = {
        name: Evaluator(model, qs, args.out / "records" / f"full_{name}", **EVAL)
        .run_setting(full)
        .summary.accuracy
        for name, qs in sets.items()
        if name != "trained_other"
    }
    results["before"] = answer_rates(model, sets, args.ratio, args.out, "before")
    config = TrainConfig(
        steps=args.steps,
        batch_size=4,
        lr=2e-4,
        warmup_steps=10,
        encoder_warmup_steps=args.steps,  # the encoder side held, as in the fifth phase
        mse_weight=0.0,
        kd_weight=1.0,
        train_ratios=[args.ratio],
        mixed_precision=args.mixed_precision,
        output_dir=str(args.run_dir),  # under the run key, below
        save_every=min(50, args.steps),
        eval_every=0,
        resume_from="auto",
    )
    key = run_key(model.fingerprint, samples, config)
    config = config.model_copy(update={"output_dir": str(args.run_dir / key)})
    trainer = Trainer(model, samples, config)
    trainer.train()
    results["passes"] = round(4 * trainer.step / len(samples), 1)
    results["after"] = answer_rates(model.eval(), sets, args.ratio, args.out, "after")
    results["command"] = " ".join(
        ["python", "benchmarks/fit_capacity.py", *map(portable, sys.argv[1:])]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fit_capacity.json").write_text(json.dumps(results, indent=2) + "\n")
    report = _report(results)
    (args.out / "fit_capacity.md").write_text(report)
    print(report)


ROWS = {
    "trained": "the trained questions, their own paragraph's latents",
    "trained_other": "the trained questions, another paragraph's latents",
    "aside": "held-aside questions on the trained paragraphs (right from text, not trained)",
    "held_out": "held-out articles (the questions `eval` asks)",
}


def _report(r: dict) -> str:
    lines = [
        f"# Fitting {r['samples']} teacher answers at ratio {r['ratio']:g} "
        f"({r['steps']} steps, each answer seen {r['passes']} times)\n",
        "| questions | n | before | after | full context (base decoder, text) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, n in r["questions"].items():
        full = r["full_context"].get(name)
        lines.append(
            f"| {ROWS[name]} | {n} | {r['before'][name]:.3f} | {r['after'][name]:.3f} | "
            + ("" if full is None else f"{full:.3f}")
            + " |"
        )
    lines += [
        "",
        "Every trained and held-aside teacher answer holds its gold span; those rows are scored "
        "against that span, the held-out row against all of SQuAD's answers to the question.",
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
