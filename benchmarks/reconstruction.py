"""What do the latents carry, and how much of it does an answer use?

    python benchmarks/reconstruction.py                    # the bundled default, ratios 2 4 8
    python benchmarks/reconstruction.py --checkpoint runs/default/recall/checkpoint-240 --out x

Two measurements on the held-out SQuAD articles (those ``recipes/default.py eval`` holds out):

1. **Reconstruction.** The first ``--words`` words of ``--pieces`` held-out paragraphs are
   compressed at each ratio and the decoder (its adapter on) is asked to repeat them
   (``RECONSTRUCTION_PROMPT``, greedy; see `reconstruct`). Scored with `reconstruction_counts`: the share of the
   words it reproduces in order, and of the names and numbers it reproduces at all.
2. **Answering through a reconstruction.** For ``--questions`` held-out questions (the ones
   ``eval`` asks, by the same seed), at each ratio: the answer read from the latents directly
   (what ``eval`` measures), and the answer the untouched base decoder reads from the text the
   adapter reconstructed from those same latents. If the second answers more often, the latents
   carry answers the decoder's direct reading misses; if the same, what they carry is the limit.
   Full context (base decoder on the text) is the ceiling both share. Pairs by exact McNemar.

Writes ``reconstruction.json`` and ``reconstruction.md`` (and every generation, for reading) to
``--out``. A diagnostic, not a product path: reconstructing costs a generation as long as the text.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from pathlib import Path

import torch
from _common import SEED, load_model, parser, portable, recipe_split, setup

from semidyn_rag.data import QASample, sample
from semidyn_rag.metrics import (
    ReconstructionCounts,
    mcnemar_exact,
    reconstruction_counts,
    substring_match,
)
from semidyn_rag.modeling import LatentPrompt, SemiDynamicCompressor
from semidyn_rag.training.samples import RECONSTRUCTION_PROMPT

logger = logging.getLogger("benchmarks.reconstruction")

ANSWER_TOKENS = 24  # as recipes/default.py evaluates
BATCH = 8


def reconstruct(
    model: SemiDynamicCompressor,
    texts: list[str],
    ratio: float,
    piece_tokens: int = 64,
    slack: float = 1.25,
) -> list[str]:
    """The adapter's reconstruction of each text from its latents at ``ratio``, greedy.

    Each text is compressed whole (the latents a question reads), then its latent sequence is cut
    into even slices of about ``piece_tokens / ratio`` latents, the length the reconstruction
    samples were trained on (a whole paragraph asked at once drifts after a few dozen words); each
    slice is reconstructed with room for ``slack`` times the tokens it stands for, and the slices'
    texts are joined. Batched: one ``generate`` per ``BATCH`` slices.
    """
    per_slice = max(1.0, piece_tokens / ratio)
    slices: list[tuple[int, torch.Tensor]] = []
    for i, compressed in enumerate(model.compress(texts, ratio=ratio)):
        count = max(1, round(compressed.num_latents / per_slice))
        slices += [(i, part) for part in torch.tensor_split(compressed.latents, count)]
    parts: list[list[str]] = [[] for _ in texts]
    for start in range(0, len(slices), BATCH):
        batch = slices[start : start + BATCH]
        prompts = [model.latent_prompt(RECONSTRUCTION_PROMPT, [lat]) for _, lat in batch]
        budget = math.ceil(slack * ratio * max(lat.shape[0] for _, lat in batch))
        outputs = model.complete(prompts, max_new_tokens=budget, do_sample=False)
        for (i, _), text in zip(batch, outputs, strict=True):
            parts[i].append(text.strip())
    return [" ".join(p) for p in parts]


def answer_from_text(
    model: SemiDynamicCompressor, questions: list[QASample], texts: list[str]
) -> list[str]:
    """The untouched base decoder's answers, each question reading its text in ``eval``'s
    full-context prompt."""
    template = model.config.prompt_template
    prompts = [
        LatentPrompt.from_parts([template.format(context=t, question=q.question)])
        for q, t in zip(questions, texts, strict=True)
    ]
    return _complete(model, prompts, adapter=False)


def answer_from_latents(
    model: SemiDynamicCompressor, questions: list[QASample], ratio: float
) -> list[str]:
    """Answers read from the latents directly (``eval``'s ``fixed_ratio_<ratio>``)."""
    prompts = model.prompts_for(
        [q.question for q in questions], [q.contexts for q in questions], ratio=ratio
    )
    return _complete(model, prompts, adapter=True)


def _complete(
    model: SemiDynamicCompressor, prompts: list[LatentPrompt], adapter: bool
) -> list[str]:
    out = []
    for start in range(0, len(prompts), BATCH):
        out += model.complete(
            prompts[start : start + BATCH],
            adapter=adapter,
            max_new_tokens=ANSWER_TOKENS,
            do_sample=False,
        )
    return out


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(out=Path(__file__).resolve().parent / "results" / "reconstruction")
    p.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--pieces", type=int, default=48, help="paragraphs to reconstruct")
    p.add_argument("--words", type=int, default=48, help="words of each paragraph (as trained)")
    p.add_argument("--questions", type=int, default=100, help="0 skips the second measurement")
    args = p.parse_args()
    if args.pieces < 1 or args.words < 1 or args.questions < 0:
        p.error("--pieces and --words must be >= 1 and --questions >= 0")
    dtype = setup(args)
    model, what, trained = load_model(args, dtype)
    if not trained:
        p.error("an untrained compressor has no reading to measure: pass --checkpoint")
    _, held_out = recipe_split(args.squad)
    paragraphs = list(dict.fromkeys(c for s in held_out for c in s.contexts))
    random.Random(SEED).shuffle(paragraphs)
    pieces = [" ".join(t.split()[: args.words]) for t in paragraphs[: args.pieces]]
    questions = sample(held_out, args.questions, SEED)
    distinct = list(dict.fromkeys(q.contexts[0] for q in questions))
    if any(len(q.contexts) != 1 for q in questions):
        raise ValueError("SQuAD questions have one paragraph each; these do not")

    results: dict = {"model": what, "ratios": {}, "pieces": len(pieces), "words": args.words}
    generations: dict = {}
    full: list[str] = []
    if questions:
        full = answer_from_text(model, questions, [q.contexts[0] for q in questions])
        results["questions"] = len(questions)
        results["full_context"] = _accuracy(questions, full)
    for ratio in args.ratios:
        counts = sum(
            (
                reconstruction_counts(t, g)
                for t, g in zip(pieces, reconstruct(model, pieces, ratio))
            ),
            ReconstructionCounts(),
        )
        row: dict = {
            "word_recall": counts.word_recall,
            "detail_recall": counts.detail_recall if counts.details else None,
            "counts": counts.model_dump(),
        }
        logger.info("ratio %g: reconstruction %s", ratio, row)
        if questions:
            rebuilt = dict(zip(distinct, reconstruct(model, distinct, ratio), strict=True))
            via = answer_from_text(model, questions, [rebuilt[q.contexts[0]] for q in questions])
            direct = answer_from_latents(model, questions, ratio)
            right = {name: _correct(questions, outs) for name, outs in (("d", direct), ("v", via))}
            only_direct, only_via, p_value = mcnemar_exact(right["d"], right["v"])
            row |= {
                "direct": _accuracy(questions, direct),
                "via_reconstruction": _accuracy(questions, via),
                "only_direct": only_direct,
                "only_via_reconstruction": only_via,
                "mcnemar_p": p_value,
                "paragraph_word_recall": sum(
                    (reconstruction_counts(t, g) for t, g in rebuilt.items()),
                    ReconstructionCounts(),
                ).word_recall,
            }
            generations[f"{ratio:g}"] = {
                "reconstructions": rebuilt,
                "direct": dict(zip([q.id for q in questions], direct, strict=True)),
                "via_reconstruction": dict(zip([q.id for q in questions], via, strict=True)),
            }
            logger.info("ratio %g: answers %s", ratio, row)
        results["ratios"][f"{ratio:g}"] = row
    if questions:
        generations["full_context"] = dict(zip([q.id for q in questions], full, strict=True))

    args.out.mkdir(parents=True, exist_ok=True)
    results["command"] = " ".join(
        ["python", "benchmarks/reconstruction.py", *map(portable, sys.argv[1:])]
    )
    (args.out / "reconstruction.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "generations.json").write_text(json.dumps(generations, indent=1) + "\n")
    report = _report(results)
    (args.out / "reconstruction.md").write_text(report)
    print(report)


def _correct(questions: list[QASample], outputs: list[str]) -> dict[str, bool]:
    return {q.id: substring_match(o, q.answers) for q, o in zip(questions, outputs, strict=True)}


def _accuracy(questions: list[QASample], outputs: list[str]) -> float:
    return sum(_correct(questions, outputs).values()) / len(questions)


def _report(results: dict) -> str:
    lines = [
        f"# What the latents carry ({results['model']})",
        "",
        f"Reconstruction of the first {results['words']} words of {results['pieces']} held-out "
        "paragraphs: words reproduced in order, names and numbers reproduced.",
        "",
        "| ratio | word recall | detail recall |",
        "|---:|---:|---:|",
    ]
    for ratio, row in results["ratios"].items():
        detail = "–" if row["detail_recall"] is None else f"{row['detail_recall']:.3f}"
        lines.append(f"| {ratio} | {row['word_recall']:.3f} | {detail} |")
    if "questions" in results:
        lines += [
            "",
            f"Answers to {results['questions']} held-out questions; full context (base decoder "
            f"on the text): {results['full_context']:.3f}.",
            "",
            "| ratio | from latents | via reconstruction | only latents / only via, p "
            "| paragraph word recall |",
            "|---:|---:|---:|---|---:|",
        ]
        for ratio, row in results["ratios"].items():
            lines.append(
                f"| {ratio} | {row['direct']:.3f} | {row['via_reconstruction']:.3f} | "
                f"{row['only_direct']} / {row['only_via_reconstruction']}, "
                f"{row['mcnemar_p']:.2f} | {row['paragraph_word_recall']:.3f} |"
            )
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
