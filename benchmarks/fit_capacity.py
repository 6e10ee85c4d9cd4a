"""Can the decoder learn to answer from the latents at all, given enough passes? A capacity check.

    python benchmarks/fit_capacity.py                       # 64 questions, 400 steps, ratio 4
    python benchmarks/fit_capacity.py --samples 32 --steps 200 --out /tmp/fit

Every variant of the default's recipe trained on the CPU answers about as often as the fifth
phase (docs/experiments.md), which saw each of its few hundred training answers about once. This
asks whether more passes over the same answers would teach the decoder to read them from the
latents, or whether the latents at this ratio (or a LoRA decoder reading them) cannot carry them:

1. Take the first ``--samples`` single-paragraph teacher answers of ``runs/default/teacher.jsonl``
   (``recipes/default.py teach``) whose text holds the gold span, so each target is right.
2. Answer their questions with the bundled default at ``--ratio``, reading the latents of the
   question's own paragraph and of another question's (`memorization.swap_paragraphs`), and with
   the untouched base decoder on the full text.
3. Train the bundled default on those answers alone (the fifth phase's settings: KD and CE on the
   teacher's answer, encoder side held, only ``--ratio``) for ``--steps`` steps of batch 4, so
   each answer is seen ``4 × steps / samples`` times; answer the same questions again.

Reading: own right and other wrong after training means the decoder learnt to read these answers
from the latents (the limit of the CPU phases is data and steps); right with another paragraph's
latents too means it learnt them by heart; right with neither means the latents at this ratio, or
the adapter reading them, do not carry them. Records under ``--out``/records/<before|after>_<own|
other>; ``fit_capacity.json`` and ``fit_capacity.md`` in ``--out``. Checkpoints go to ``--run-dir``
(``runs/fit_capacity``, not kept in git; a rerun resumes there).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from _common import ROOT, parser, portable, setup
from memorization import EVAL, swap_paragraphs

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.data import QASample
from semidyn_rag.evaluation import Evaluator, select_settings
from semidyn_rag.metrics import substring_match
from semidyn_rag.training.samples import TrainSample, read_jsonl
from semidyn_rag.training.trainer import TrainConfig, Trainer

logger = logging.getLogger("benchmarks.fit_capacity")

RUN = ROOT.parent / "runs"
TEACHER = RUN / "default" / "teacher.jsonl"
HEAD_LAYER = 2  # as recipes/default.py reads the ratio head (encoding stops there)


def right_answers(path: Path, count: int) -> list[TrainSample]:
    """The first ``count`` single-paragraph teacher answers in ``path`` that hold their gold span.

    Raises:
        FileNotFoundError: ``path`` is missing (``recipes/default.py teach`` writes it).
        ValueError: fewer than ``count`` such answers (or fewer than two paragraphs among them).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python recipes/default.py teach`")
    picked = [
        s
        for s in read_jsonl(path)
        if len(s.contexts) == 1
        and s.teacher is not None
        and s.provenance.get("gold")
        and substring_match(s.answer, [s.provenance["gold"]])
    ][:count]
    if len(picked) < count or len({s.contexts[0] for s in picked}) < 2:
        raise ValueError(
            f"{path} holds {len(picked)} right single-paragraph answers, asked {count}"
        )
    return picked


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
    model: SemiDynamicCompressor, questions: list[QASample], ratio: float, out: Path, when: str
) -> dict[str, float]:
    """Accuracy at ``ratio`` reading each question's own paragraph and another's."""
    setting = select_settings(model, [f"fixed_ratio_{ratio:g}"])[0]
    rates = {}
    for name, qs in (("own", questions), ("other", swap_paragraphs(questions))):
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
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16")
    p.add_argument("--run-dir", type=Path, default=RUN / "fit_capacity", help="checkpoints")
    args = p.parse_args()
    if args.samples < 2 or args.steps < 1 or args.ratio < 1:
        p.error("--samples >= 2, --steps >= 1 and --ratio >= 1")
    setup(args)
    samples = right_answers(args.teacher, args.samples)
    questions = as_questions(samples)
    model = SemiDynamicCompressor.from_pretrained(
        args.checkpoint, device=args.device, dtype=torch.float32, head_layer=HEAD_LAYER
    )
    results: dict = {"samples": len(samples), "steps": args.steps, "ratio": args.ratio}
    full = select_settings(model, ["full_context"])[0]
    base = Evaluator(model, questions, args.out / "records" / "full", **EVAL)
    results["full_context"] = base.run_setting(full).summary.accuracy
    results["before"] = answer_rates(model, questions, args.ratio, args.out, "before")
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
        output_dir=str(args.run_dir),
        save_every=args.steps,
        eval_every=0,
        resume_from="auto",
    )
    trainer = Trainer(model, samples, config)
    trainer.train()
    results["passes"] = round(4 * trainer.step / len(samples), 1)
    results["after"] = answer_rates(model.eval(), questions, args.ratio, args.out, "after")
    results["command"] = " ".join(
        ["python", "benchmarks/fit_capacity.py", *map(portable, sys.argv[1:])]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fit_capacity.json").write_text(json.dumps(results, indent=2) + "\n")
    report = _report(results)
    (args.out / "fit_capacity.md").write_text(report)
    print(report)


def _report(r: dict) -> str:
    return (
        f"# Fitting {r['samples']} teacher answers at ratio {r['ratio']:g} "
        f"({r['steps']} steps, each answer seen {r['passes']} times)\n\n"
        "| | own paragraph's latents | another paragraph's latents |\n|---|---:|---:|\n"
        f"| before | {r['before']['own']:.3f} | {r['before']['other']:.3f} |\n"
        f"| after | {r['after']['own']:.3f} | {r['after']['other']:.3f} |\n\n"
        f"Full context (base decoder, text): {r['full_context']:.3f}. "
        "Every teacher answer holds its gold span.\n\n"
        f"Command: `{r['command']}`\n"
    )


if __name__ == "__main__":
    main()
