"""How much token identity do the latents keep, and is the converter where it is lost?

    python benchmarks/latent_tokens.py                       # the bundled default
    python benchmarks/latent_tokens.py --refit-steps 3000    # also refit the converter, then eval

On held-out SQuAD paragraphs (those ``recipes/default.py eval`` holds out), at each ratio:

1. **Token recall of the latents.** Each latent's nearest decoder input embeddings (cosine): the
   share of its window's distinct tokens among the ``w + k - 1`` nearest, for a window of ``w``
   distinct tokens, ``k`` = 4 and 16. The same for the exact mean embedding of the window, the
   target the converter was fitted to (`training.align`): what a perfect converter would give.
2. **The converter's fit.** Its error against those mean embeddings relative to their variance
   (`align.align_converter`'s measure), on held-out paragraphs.
3. With ``--refit-steps N``: the converter refitted for ``N`` more steps on ``--refit-contexts``
   training paragraphs (SQuAD training articles and HotpotQA training rows), its held-out error
   again, and fixed ratios 4 and 8 on ``--questions`` held-out questions with the decoder as it
   is. Does a converter closer to the mean embeddings make the latents easier to read?
   ``--pool-layer L`` pools another encoder layer (0: the embeddings themselves), so the
   refitted converter maps that layer's pooled states, for the decoder trained on layer 2's.

Writes ``latent_tokens.json`` and ``latent_tokens.md`` (and with a refit, the evaluation's
records) to ``--out``.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import torch
from _common import SEED, load_model, parser, portable, recipe_split, setup

from semidyn_rag import pooling
from semidyn_rag.data import load_hotpotqa, sample
from semidyn_rag.evaluation import Evaluator, select_settings
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.training.align import align_converter

logger = logging.getLogger("benchmarks.latent_tokens")

HOTPOT_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa" / "train.jsonl"
MAX_TOKENS = 384  # the recipe's training contexts
KS = (4, 16)


@torch.no_grad()
def token_recall(
    model: SemiDynamicCompressor, token_lists: list[list[int]], ratio: int
) -> dict[str, dict[int, float]]:
    """Nearest-embedding recall (see the module docstring) of the latents and of the exact mean
    embeddings, ``{"latents": {k: recall}, "mean_embedding": {k: recall}}``, micro-averaged."""
    config = model.config
    if config.backbone != "mean_pooling":
        raise ValueError("token recall is defined for the mean_pooling backbone")
    if config.pool_eos:
        raise ValueError("with pool_eos the last window covers the <eos>, which has no token here")
    table = model.decoder.get_input_embeddings().weight.float()
    unit = torch.nn.functional.normalize(table, dim=-1)
    # an explicit ratio pools with fixed_ratio_alignment when set (`backbones.MeanPooling.extract`)
    align = config.fixed_ratio_alignment or config.pooling_alignment
    size = config.max_segment_tokens
    found = {"latents": dict.fromkeys(KS, 0), "mean_embedding": dict.fromkeys(KS, 0)}
    total = 0
    for ids, compressed in zip(token_lists, model.compress_tokens(token_lists, ratio=ratio)):
        windows, means = [], []
        # compress_tokens pools each segment of max_segment_tokens on its own (`_segments`)
        for start in range(0, len(ids), size):
            segment = ids[start : start + size]
            means.append(pooling.mean_pool(table[torch.as_tensor(segment)], ratio, align))
            count = pooling.num_windows(len(segment), ratio)
            first = len(segment) - count * ratio if align == "end" else 0  # "end" pads the front
            windows += [
                set(segment[max(0, first + j * ratio) : first + (j + 1) * ratio])
                for j in range(count)
            ]
        means = torch.cat(means)
        if not means.shape[0] == len(windows) == compressed.num_latents:
            raise ValueError("latents and windows do not line up: pooling changed")
        for window, latent, mean in zip(windows, compressed.latents.float(), means, strict=True):
            total += len(window)
            for name, vector in (("latents", latent), ("mean_embedding", mean)):
                sims = torch.nn.functional.normalize(vector, dim=-1) @ unit.T
                for k in KS:
                    top = set(sims.topk(len(window) + k - 1).indices.tolist())
                    found[name][k] += len(window & top)
    return {name: {k: hits / total for k, hits in row.items()} for name, row in found.items()}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.set_defaults(out=Path(__file__).resolve().parent / "results" / "latent_tokens")
    p.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--paragraphs", type=int, default=60)
    p.add_argument("--refit-steps", type=int, default=0)
    p.add_argument("--refit-contexts", type=int, default=3000)
    p.add_argument("--questions", type=int, default=100)
    p.add_argument(
        "--pool-layer",
        type=int,
        default=None,
        help="pool this encoder layer instead (0: the embeddings); needs --refit-steps, as the "
        "converter was fitted to another layer",
    )
    args = p.parse_args()
    if args.pool_layer is not None and not args.refit_steps:
        p.error("--pool-layer needs --refit-steps: the shipped converter reads another layer")
    dtype = setup(args)
    model, what, trained = load_model(args, dtype)
    if not trained:
        p.error("an untrained converter has nothing to measure: pass --checkpoint")
    if args.pool_layer is not None:
        model = SemiDynamicCompressor.from_pretrained(
            args.checkpoint, device=args.device, dtype=dtype, pool_layer=args.pool_layer
        ).eval()
        what += f", pooling layer {args.pool_layer}"
    train, held_out = recipe_split(args.squad)
    paragraphs = list(dict.fromkeys(c for s in held_out for c in s.contexts))
    random.Random(SEED).shuffle(paragraphs)
    held_ids = [ids[:MAX_TOKENS] for ids in model.tokenize(paragraphs[: args.paragraphs])]

    results: dict = {"model": what, "paragraphs": len(held_ids), "recall": {}}
    for ratio in args.ratios:
        results["recall"][str(ratio)] = token_recall(model, held_ids, ratio)
        logger.info("ratio %d: %s", ratio, results["recall"][str(ratio)])
    results["held_out_error"] = align_converter(model, held_ids, steps=0, progress=False)[0]
    if args.refit_steps:
        pool = list(dict.fromkeys(c for s in train for c in s.contexts))
        pool += list(dict.fromkeys(c for s in load_hotpotqa(HOTPOT_TRAIN) for c in s.contexts))
        random.Random(SEED).shuffle(pool)
        fit = [ids[:MAX_TOKENS] for ids in model.tokenize(pool[: args.refit_contexts])]
        before, after = align_converter(model, fit, steps=args.refit_steps, seed=SEED)
        model.eval()
        refit = {
            "fit_error": [before, after],
            "held_out_error": align_converter(model, held_ids, steps=0, progress=False)[0],
            "recall": {str(r): token_recall(model, held_ids, r) for r in args.ratios},
        }
        chosen = select_settings(model, ["fixed_ratio_4", "fixed_ratio_8"])
        samples = sample(held_out, args.questions, SEED)
        Evaluator(model, samples, args.out / "refit_eval", max_new_tokens=24).run(chosen)
        refit["eval"] = (args.out / "refit_eval" / "results.md").read_text()
        results["refit"] = refit
    results["command"] = " ".join(
        ["python", "benchmarks/latent_tokens.py", *map(portable, sys.argv[1:])]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latent_tokens.json").write_text(json.dumps(results, indent=2) + "\n")
    report = _report(results)
    (args.out / "latent_tokens.md").write_text(report)
    print(report)


def _recall_table(recall: dict) -> list[str]:
    lines = [
        "| ratio | latents, k=4 | latents, k=16 | mean embedding, k=4 | mean embedding, k=16 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for ratio, row in recall.items():
        lat, mean = row["latents"], row["mean_embedding"]
        lines.append(f"| {ratio} | {lat[4]:.3f} | {lat[16]:.3f} | {mean[4]:.3f} | {mean[16]:.3f} |")
    return lines


def _report(results: dict) -> str:
    lines = [
        f"# Token identity in the latents ({results['model']})",
        "",
        f"{results['paragraphs']} held-out paragraphs: share of each window's distinct tokens "
        "among the nearest decoder embeddings of its latent (and of its exact mean embedding).",
        "",
        *_recall_table(results["recall"]),
        "",
        f"Converter error against the mean embeddings, held out: {results['held_out_error']:.3f}.",
    ]
    if "refit" in results:
        refit = results["refit"]
        before, after = refit["fit_error"]
        lines += [
            "",
            f"Refitted: fit error {before:.3f} -> {after:.3f}, held out "
            f"{refit['held_out_error']:.3f}.",
            "",
            *_recall_table(refit["recall"]),
            "",
            refit["eval"],
        ]
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
