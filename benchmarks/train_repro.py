"""CPU-scale reproduction: fixed-ratio vs semi-dynamic vs fully dynamic, trained from scratch.

A generated task whose information density varies widely between contexts: each context holds
``k`` facts "The code of X is 123." (k from 1 to 16) mixed with a varying amount of redundant filler;
the question asks for one code. The density label is Eq. 6 with the facts as the ultra-concise
summary, ``y = log2(L_ctx / L_facts)``. A small Qwen3 (`semidyn_rag.tiny`) starts from random
weights and is first *pretrained* on the task in plain text (answer loss only), standing in for
the pretrained LLM the paper starts from: without that step neither reading a context nor reading
latents is learned in a CPU budget (all settings stayed at chance). The compressors are then
trained on top of that base, base weights included (``train_base``), with the full- and
no-context accuracy of the plain-text base as reference rows.

Models: ``multi`` is trained on the candidate ratios drawn per step plus the ratio head (MSE); the
same weights are evaluated at each fixed ratio (the fixed-ratio baseline) and with the DRS across a
``scale`` sweep (semi-dynamic), so the two differ only in how the ratio is chosen. ``fully_dynamic``
is trained on the unquantized windows its labels imply, ``round(2**y)``, the paper's failing
baseline. ``--separate-fixed`` also trains one model per fixed ratio, as the paper does.

    python benchmarks/train_repro.py            # full run, < 20 minutes on 2 cores
    python benchmarks/train_repro.py --quick    # smoke run, a few minutes

Writes ``benchmarks/results/train_repro.{json,md}`` and checkpoints under ``runs/repro/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch

from semidyn_rag.config import CompressorConfig, LoraSettings
from semidyn_rag.metrics import average_compression_ratio, substring_match
from semidyn_rag.modeling import LatentPrompt, SemiDynamicCompressor
from semidyn_rag.tiny import build_qwen3, build_tokenizer
from semidyn_rag.training import TrainConfig, Trainer, TrainSample, density_label

logger = logging.getLogger("train_repro")

ROOT = Path(__file__).resolve().parents[1]
RATIOS = [2.0, 4.0, 8.0, 16.0, 32.0]
FACT_TOKENS = 8  # about one "The code of Name is 42." in the task's tokenizer
SCALES = [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
SYLLABLES = ["ka", "lo", "mi", "ru", "ze", "po", "ta", "ne", "vi", "so", "du", "fe", "ga", "bi"]
FILLER = [
    "Nothing else of note happened that day.",
    "The weather stayed mild and the sky was grey.",
    "People walked by and the shops were open as usual.",
    "It was an ordinary afternoon in the quiet town.",
    "Some birds sang in the trees near the old road.",
    "The clock on the wall kept ticking slowly.",
    "As always, the streets were calm and the day went on.",
]


# --- the task -------------------------------------------------------------------------------


def make_names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize())
    return sorted(names)


def make_sample(
    rng: random.Random, names: list[str], count_tokens, max_tokens: int, index: int
) -> tuple[TrainSample, int]:
    """One context: k facts + filler up to a drawn density; returns the sample and L_facts.

    The density ``y`` is drawn uniformly in [0, 4] first; the fact count k (1-16) is then drawn
    log-uniformly among the counts whose context still fits ``max_tokens`` at that density.
    """
    y_target = rng.uniform(0, 4)
    k_max = max(1, min(16, int(max_tokens / (FACT_TOKENS * 2**y_target))))
    k = max(1, round(2 ** rng.uniform(0, math.log2(k_max))))
    people = rng.sample(names, k)
    facts = [f"The code of {p} is {rng.randint(10, 99)}." for p in people]
    fact_tokens = count_tokens(" ".join(facts))
    target = min(max_tokens, fact_tokens * 2**y_target)
    sentences = list(facts)
    length = sum(count_tokens(" " + f) for f in facts)
    while length < target:
        filler = rng.choice(FILLER)
        if length + count_tokens(" " + filler) > max_tokens:
            break
        sentences.insert(rng.randint(0, len(sentences)), filler)
        length += count_tokens(" " + filler)
    context = " ".join(sentences)
    asked = rng.randrange(k)
    # the answer keeps its leading space: the same token as in the context, so it is a pure copy
    answer = " " + facts[asked].rsplit(" ", 1)[1].rstrip(".")
    sample = TrainSample(
        id=str(index),
        contexts=[context],
        question=f"What is the code of {people[asked]}?",
        answer=answer,
        y=[density_label(count_tokens(context), fact_tokens)],
        source="repro",
        provenance={"facts": k},
    )
    return sample, fact_tokens


def build_data(args: argparse.Namespace, work: Path):
    rng = random.Random(args.seed)
    names = make_names(rng, args.names)
    # tokenizer corpus: sentences as they appear in contexts (after a space), every code and name
    corpus = [
        f"The code of {n} is {c}. {rng.choice(FILLER)}" for n in names for c in range(10, 100)
    ]
    corpus += [f"{a} {b} What is the code of {n}?" for a in FILLER for b in FILLER for n in names]
    corpus += [str(c) for c in range(10, 100)] * 20  # answers start a line: no leading space
    tokenizer = build_tokenizer(corpus, vocab_size=args.vocab)
    base = build_qwen3(
        work / "base",
        tokenizer,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=args.hidden * 2,
        max_positions=1024,
        seed=args.seed,
    )

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    train = [make_sample(rng, names, count, args.max_tokens, i)[0] for i in range(args.train)]
    evaluation = [
        make_sample(random.Random(10_000 + i), names, count, args.max_tokens, i)[0]
        for i in range(args.eval)
    ]
    return base, train, evaluation


# --- models ---------------------------------------------------------------------------------


def pretrain_base(base: Path, samples, args: argparse.Namespace) -> dict:
    """Stand in for a pretrained LLM: causal-LM training of the random base on the task in text.

    The paper starts from pretrained models that already read a context and answer from it; a
    random model has neither skill, and learning to read compressed latents and to look facts up
    at once does not happen in a CPU budget (earlier runs of this benchmark stayed at chance).
    Training on "Context: <text>\nQuestion: <q> <answer>" documents gives the base that skill on
    plain text; the compressor then has to learn only what the paper's SFT teaches.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    prompts = [f"Context: {s.contexts[0]}\nQuestion: {s.question}" for s in samples]
    answers = [f"{s.answer}{tokenizer.eos_token}" for s in samples]
    # tokenized once; token_type_ids mark the answer (the second text of each pair)
    encoded = tokenizer(
        prompts, answers, return_token_type_ids=True, add_special_tokens=False
    ).encodings
    rows = [
        {"input_ids": e.ids, "token_type_ids": e.type_ids, "attention_mask": e.attention_mask}
        for e in encoded
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    start, model = time.perf_counter(), model.train()
    for step in range(args.pretrain_steps):
        for group in optimizer.param_groups:  # linear warmup, cosine decay to 10%
            warm = min(1.0, (step + 1) / max(1, args.pretrain_steps // 20))
            cosine = 0.55 + 0.45 * math.cos(math.pi * step / args.pretrain_steps)
            group["lr"] = args.lr * warm * cosine
        picks = torch.randint(len(rows), (args.batch_size,), generator=generator).tolist()
        batch = tokenizer.pad([rows[i] for i in picks], return_tensors="pt")
        # loss on the answer only: its few tokens would drown in the filler's otherwise
        labels = batch["input_ids"].masked_fill(batch.pop("token_type_ids") == 0, -100)
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, args.pretrain_steps // 10) == 0:
            logger.info("pretrain step %d/%d loss %.4f", step + 1, args.pretrain_steps, loss.item())
    model.save_pretrained(base)
    return {"seconds": round(time.perf_counter() - start, 1), "final_loss": float(loss)}


def new_model(base: Path, mode: str, args: argparse.Namespace, **fields) -> SemiDynamicCompressor:
    torch.manual_seed(args.seed)
    config = CompressorConfig(
        encoder_model=str(base),
        mode=mode,
        ratios=args.ratios,
        converter_hidden=args.hidden * 2,
        encoder_lora=LoraSettings(r=8, alpha=16),
        decoder_lora=LoraSettings(r=8, alpha=16),
        max_segment_tokens=max(64, args.max_tokens),
        use_chat_template=False,  # the question's name right before the answer: fewer hops
        **fields,
    )
    return SemiDynamicCompressor.from_config(config)


def train(model, samples, name: str, sampling: str, args: argparse.Namespace) -> dict:
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.01,
        mse_weight=1.0,
        ratio_sampling=sampling,
        train_base=True,
        module_lr_scale=args.module_lr_scale,
        seed=args.seed,
        output_dir=str(ROOT / "runs" / "repro" / name),
        log_every=max(1, args.steps // 10),
        progress=False,  # the log lines carry the loss; a bar per step floods the log
    )
    start = time.perf_counter()
    history = Trainer(model, samples, config).train()
    tail = history[-min(20, len(history)) :]
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": sum(h.loss for h in tail) / len(tail),
        "final_lm_loss": sum(h.lm_loss for h in tail) / len(tail),
        "final_mse": sum(h.mse_loss for h in tail) / len(tail),
        # repository-relative: the results are committed and name no machine's directories
        "checkpoint": str(
            (Path(config.output_dir or ".") / f"checkpoint-{config.steps}").relative_to(ROOT)
        ),
    }


@torch.inference_mode()
def evaluate(model, samples, *, ratio: float | None = None, scale: float = 0.0) -> dict:
    """Substring accuracy and the paper's average compression ratio (correct answers only)."""
    model.eval()
    contexts = model.compress([s.contexts[0] for s in samples], scale, ratio, batch_size=64)
    prompts = [
        LatentPrompt(model.format_prompt(s.question, 1), [c.latents])
        for s, c in zip(samples, contexts, strict=True)
    ]
    correct = _answered(model, prompts, samples)
    tokens = [c.num_tokens for c in contexts]
    latents = [c.num_latents for c in contexts]
    chosen = Counter(int(c.ratio) for c in contexts)
    return {
        "accuracy": sum(correct) / len(correct),
        "avg_ratio_correct": average_compression_ratio(tokens, latents, correct),
        "avg_ratio_all": average_compression_ratio(tokens, latents),
        "log2_ratio_std": _std([math.log2(c.compression) for c in contexts]),
        "chosen_ratios": dict(sorted(chosen.items())),
        "accuracy_by_facts": _by_facts(samples, correct),
    }


@torch.inference_mode()
def evaluate_text(model, samples, *, with_context: bool) -> dict:
    """The base decoder on plain text (full context, or none): the reference points."""
    template = model.config.prompt_template
    prompts = [
        LatentPrompt(
            template.format(context=s.contexts[0], question=s.question)
            if with_context
            else s.question
        )
        for s in samples
    ]
    correct = _answered(model, prompts, samples, adapter=False)
    return {
        "accuracy": sum(correct) / len(correct),
        "avg_ratio_correct": 1.0 if with_context else None,
        "avg_ratio_all": 1.0,
        "log2_ratio_std": 0.0,
        "chosen_ratios": {},
        "accuracy_by_facts": _by_facts(samples, correct),
    }


def _answered(model, prompts, samples, **kwargs) -> list[bool]:
    """Generate in batches of 64 and check each answer by substring match."""
    outputs: list[str] = []
    for start in range(0, len(prompts), 64):
        outputs += model.complete(prompts[start : start + 64], max_new_tokens=5, **kwargs)
    return [substring_match(o, [s.answer]) for o, s in zip(outputs, samples, strict=True)]


def _by_facts(samples, correct: list[bool]) -> dict[str, float]:
    by_facts: dict[str, list[bool]] = {}
    for s, ok in zip(samples, correct, strict=True):
        bucket = (
            "1-2" if s.provenance["facts"] <= 2 else "3-6" if s.provenance["facts"] <= 6 else "7-16"
        )
        by_facts.setdefault(bucket, []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(by_facts.items())}


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# --- report ---------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = [
        "# CPU-scale reproduction: fixed-ratio vs semi-dynamic vs fully dynamic",
        "",
        f"Setup: {results['setup']}",
        "",
        "| method | setting | accuracy | avg ratio (correct) | avg ratio (all) | "
        "std log2 ratio | acc 1-2 / 3-6 / 7-16 facts |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        acc = row["accuracy_by_facts"]
        ratio = row["avg_ratio_correct"]
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['accuracy']:.3f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {row['avg_ratio_all']:.2f} | "
            f"{row['log2_ratio_std']:.2f} | "
            + " / ".join(f"{acc.get(b, float('nan')):.2f}" for b in ("1-2", "3-6", "7-16"))
            + " |"
        )
    lines += ["", "Training:", ""]
    for name, info in results["training"].items():
        detail = (
            f" (lm {info['final_lm_loss']:.3f}, mse {info['final_mse']:.3f}), `{info['checkpoint']}`"
            if "checkpoint" in info
            else " (answer tokens, last batch)"
        )
        lines.append(
            f"- `{name}`: {info['seconds']} s, final loss {info['final_loss']:.3f}{detail}"
        )
    lines += ["", f"Total wall time: {results['total_seconds']} s", ""]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (a few minutes)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--module-lr-scale", type=float, default=5.0)
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="plain-text pretraining of the base"
    )
    parser.add_argument("--train", type=int, default=6000, help="training samples")
    parser.add_argument("--eval", type=int, default=400, help="evaluation samples")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=768)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--names", type=int, default=24, help="distinct names in the facts")
    parser.add_argument(
        "--threads", type=int, default=1, help="1 or 2 (2 is slower on a contended machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS, help="DRS candidates")
    parser.add_argument("--scales", type=float, nargs="+", default=SCALES, help="scale sweep")
    parser.add_argument("--separate-fixed", action="store_true", help="one model per ratio too")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_repro"))
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 150 if args.quick else 1000
    if args.pretrain_steps is None:
        args.pretrain_steps = 300 if args.quick else 1500
    if args.quick:
        args.train, args.eval = min(args.train, 1000), min(args.eval, 100)
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, args.threads))
    begin = time.perf_counter()
    work = ROOT / "runs" / "repro"
    base, train_set, eval_set = build_data(args, work)
    ys = [s.y[0] for s in train_set if s.y]
    logger.info(
        "data: %d train, %d eval; label y in [%.2f, %.2f]",
        len(train_set),
        len(eval_set),
        min(ys),
        max(ys),
    )
    rows, training = [], {}
    training["pretrain"] = pretrain_base(base, train_set, args)
    reference = new_model(base, "semi_dynamic", args)
    for with_context in (False, True):
        rows.append(
            {
                "method": "base decoder, plain text",
                "setting": "full context" if with_context else "no context",
                **evaluate_text(reference, eval_set, with_context=with_context),
            }
        )

    multi = new_model(base, "semi_dynamic", args)
    training["multi"] = train(multi, train_set, "multi", "multi", args)
    for ratio in args.ratios:
        rows.append(
            {
                "method": "fixed ratio (multi-ratio weights)",
                "setting": f"r={ratio:g}",
                **evaluate(multi, eval_set, ratio=ratio),
            }
        )
    for scale in args.scales:
        rows.append(
            {
                "method": "semi-dynamic",
                "setting": f"scale={scale:+.1f}",
                **evaluate(multi, eval_set, scale=scale),
            }
        )

    dynamic = new_model(base, "fully_dynamic", args)
    training["fully_dynamic"] = train(dynamic, train_set, "fully_dynamic", "mode", args)
    for scale in [s for s in args.scales if s >= 0 and s.is_integer()]:
        rows.append(
            {
                "method": "fully dynamic",
                "setting": f"scale={scale:+.1f}",
                **evaluate(dynamic, eval_set, scale=scale),
            }
        )

    if args.separate_fixed:
        for ratio in args.ratios:
            name = f"fixed_{ratio:g}"
            model = new_model(base, "fixed_ratio", args, fixed_ratio=ratio)
            training[name] = train(model, train_set, name, "mode", args)
            rows.append(
                {
                    "method": "fixed ratio (own model)",
                    "setting": f"r={ratio:g}",
                    **evaluate(model, eval_set),
                }
            )

    results = {
        "setup": (
            f"Qwen3 from scratch, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
            f"pretrained on the task in plain text for {args.pretrain_steps} steps, then "
            f"shared base + LoRA, base trained too; {args.steps} steps x batch {args.batch_size}, "
            f"lr {args.lr} (converter x{args.module_lr_scale}); {len(train_set)} train / {len(eval_set)} eval contexts of <= "
            f"{args.max_tokens} tokens with 1-16 facts; ratios {args.ratios}; {args.threads} threads"
            + (" (quick)" if args.quick else "")
        ),
        "rows": rows,
        "training": training,
        "total_seconds": round(time.perf_counter() - begin, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    logger.info("wrote %s.{json,md}\n%s", out, markdown(results))


if __name__ == "__main__":
    main()
