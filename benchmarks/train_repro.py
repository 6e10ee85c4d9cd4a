"""CPU-scale reproduction: fixed-ratio vs semi-dynamic vs fully dynamic, trained from scratch.

Two generated tasks whose information density varies widely between contexts; the density label is
Eq. 6 with the facts as the ultra-concise summary, ``y = log2(L_ctx / L_facts)``.

- ``--task names`` (default): each context holds ``k`` facts "The code of X is 123." (k from 1 to
  16) mixed with a varying amount of redundant filler; the question asks for one code by name.
  Compression never binds here: the small decoder only looks up 1-2 facts, compressed or not.
- ``--task binding``: every context is about 64 tokens, holding k = 1, 2, 4 or 8 typed facts
  "The color is red." ("The code is 42.", ...) and filler in the rest, so density is set by k
  alone; the question asks for one attribute. The plain-text base answers all of them (1.00).
  Latents pool the encoder's layer 1 (``--pool-layer 1``), so each latent holds its own window's
  facts and a context's capacity grows with its latent count: at a fixed ratio the dense contexts
  run out of latents before the sparse ones. Pooled from the last layer, every latent carried the
  same mixture of the whole context and accuracy stayed flat from r=2 to r=32 (the decoder found
  about 0.36 of the facts asked in 8-fact contexts at every ratio): compression did not bind.

A small Qwen3 (`semidyn_rag.tiny`) starts from random weights and is first *pretrained* on the task
in plain text (answer loss only; on the binding task it is asked up to ``--pretrain-questions``
facts per context), standing in for the pretrained LLM the paper starts from: without that step
neither reading a context nor reading latents is learned in a CPU budget (all settings stayed at
chance).
The compressors are then trained on top of that base, base weights included (``train_base``), with
the full- and no-context accuracy of the plain-text base as reference rows.

Models: ``multi`` is trained on the candidate ratios drawn per step plus the ratio head (MSE); the
same weights are evaluated at each fixed ratio (the fixed-ratio baseline) and with the DRS across a
``scale`` sweep (semi-dynamic), so the two differ only in how the ratio is chosen. ``fully_dynamic``
is trained on the unquantized windows its labels imply, ``round(2**y)``, the paper's failing
baseline. ``--separate-fixed`` also trains one model per fixed ratio, as the paper does. The table
gives, for each chosen-ratio row, the fixed-ratio line's accuracy at the same average ratio
(interpolated in log2 ratio).

    python benchmarks/train_repro.py            # names task, < 20 minutes on 2 cores
    python benchmarks/train_repro.py --quick    # smoke run, a few minutes
    python benchmarks/train_repro.py --task binding --pretrain-only    # the base, ~6 minutes
    python benchmarks/train_repro.py --task binding --reuse-base       # the comparison, ~15

Writes ``benchmarks/results/train_repro.{json,md}`` (binding: ``train_repro_binding.*``) and
checkpoints under ``runs/repro/`` (binding: ``runs/repro_bind/``; ``--reuse-base`` reuses the
pretrained base there when it was made with the same settings).
"""

from __future__ import annotations

import argparse
import itertools
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
BINDING_FACTS = (1, 2, 4, 8)
BINDING_CONVERTER_HIDDEN = 64
# binding task: each attribute has its own values, all one token in the task's tokenizer
_ATTRIBUTE_TABLE = """
color: red blue green black white yellow pink brown grey orange
city: Paris Rome Lima Oslo Cairo Delhi Tokyo Quito Dakar Sofia
animal: cat dog fox owl bear wolf deer frog duck goat
fruit: apple pear plum fig lime kiwi mango melon grape peach
metal: iron gold zinc tin lead copper silver nickel cobalt chrome
month: January February March April May June July August September October
tool: hammer saw drill knife axe rake spade brush chisel wrench
sport: golf polo judo chess tennis rugby hockey boxing skiing rowing
"""
ATTRIBUTES = {
    key: values.split()
    for key, values in (line.split(": ") for line in _ATTRIBUTE_TABLE.strip().splitlines())
} | {"code": [str(c) for c in range(10, 100)]}
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


def make_binding_sample(
    rng: random.Random, count_tokens, max_tokens: int, index: int
) -> tuple[TrainSample, int]:
    """One context of the binding task: k in {1, 2, 4, 8} attribute facts, filler up to ``max_tokens``.

    Facts are "The <attribute> is <value>." with k distinct attributes of `ATTRIBUTES`; the
    question asks for one of them. Every context has about the same length, so density is set by
    k alone: eight facts and two filler sentences (y near 0.6) or one fact in filler (y near 3.6).
    A fixed ratio gives every context the same number of latents although the dense ones carry
    eight times the facts. Each attribute has its own values, so the decoder finds the answer by
    its type, a look-up a small base learns in a few thousand steps (a look-up by a name key,
    "The code of Pota is 65.", stayed at chance for 4-8 facts after 1,500 steps).
    """
    k = rng.choice(BINDING_FACTS)
    keys = rng.sample(sorted(ATTRIBUTES), k)
    values = [rng.choice(ATTRIBUTES[key]) for key in keys]
    facts = [f"The {key} is {value}." for key, value in zip(keys, values, strict=True)]
    fact_tokens = count_tokens(" ".join(facts))
    sentences = list(facts)
    while True:  # filler until the next sentence would not fit (counted in place: a sentence
        # that opens the context has no leading space and may take more tokens)
        longer = list(sentences)
        longer.insert(rng.randint(0, len(sentences)), rng.choice(FILLER))
        if count_tokens(" ".join(longer)) > max_tokens:
            break
        sentences = longer
    context = " ".join(sentences)
    asked = rng.randrange(k)
    sample = TrainSample(
        id=str(index),
        contexts=[context],
        question=f"What is the {keys[asked]}?",
        answer=" " + values[asked],  # leading space: the value's token in the context
        y=[density_label(count_tokens(context), fact_tokens)],
        source="repro-binding",
        provenance={
            "facts": k,
            "table": ";".join(f"{a}={v}" for a, v in zip(keys, values, strict=True)),
        },
    )
    return sample, fact_tokens


def build_data(args: argparse.Namespace, work: Path, keep_base: bool = False):
    """The task's tokenizer, a random base in ``work/base`` (kept as is with ``keep_base``) and
    the train and evaluation samples; returns ``(base directory, train, eval)``."""
    rng = random.Random(args.seed)
    if args.task == "binding":
        # every fact, question and filler pair as it appears: each value becomes one token
        corpus = [
            f"The {key} is {value}. {filler} What is the {key}?"
            for key, values in ATTRIBUTES.items()
            for value in values
            for filler in FILLER
        ]
        corpus += [" ".join(values) for values in ATTRIBUTES.values()] * 20
    else:
        names = make_names(rng, args.names)
        # tokenizer corpus: sentences as they appear in contexts (after a space), every code and name
        corpus = [
            f"The code of {n} is {c}. {rng.choice(FILLER)}" for n in names for c in range(10, 100)
        ]
        corpus += [
            f"{a} {b} What is the code of {n}?" for a in FILLER for b in FILLER for n in names
        ]
        corpus += [str(c) for c in range(10, 100)] * 20  # answers start a line: no leading space
    tokenizer = build_tokenizer(corpus, vocab_size=args.vocab)
    base = work / "base"
    if not keep_base:
        build_qwen3(
            base,
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

    def sample(rng: random.Random, index: int) -> TrainSample:
        if args.task == "binding":
            return make_binding_sample(rng, count, args.max_tokens, index)[0]
        return make_sample(rng, names, count, args.max_tokens, index)[0]

    train = [sample(rng, i) for i in range(args.train)]
    evaluation = [sample(random.Random(10_000 + i), i) for i in range(args.eval)]
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
    if args.task == "binding":
        rows = _turn_rows(tokenizer, samples)
    else:
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
    return {"seconds": round(time.perf_counter() - start, 1), "final_loss": loss.item()}


def more_questions(
    samples: list[TrainSample], questions: int, seed: int, eos: str
) -> list[TrainSample]:
    """Binding-task training samples that ask up to ``questions`` of a context's facts in turn.

    The answer continues with the next questions and their answers, each answer closed by ``eos``
    ("<a1><eos>\nQuestion: What is the city? <a2><eos>..."; the trainer adds the last ``eos``),
    so the prompt "Context: ...\nQuestion: <q1>" is unchanged and every answer is a look-up the
    loss sees: several per forward pass in the dense contexts, where one question per context
    gives too little signal for the plain-text base to learn the look-up in a CPU budget. Only
    the pretraining uses them: the compressors trained on them (whose loss also covers the
    question tokens) collapsed to the answer prior, 0.10 at every ratio, so they train on one.
    """
    rng = random.Random(seed)
    out = []
    for s in samples:
        facts = dict(item.split("=") for item in str(s.provenance["table"]).split(";"))
        first = s.question.removeprefix("What is the ").removesuffix("?")
        if first not in facts:
            raise ValueError(f"sample {s.id}: the question's attribute {first!r} is not a fact")
        others = [key for key in facts if key != first]
        rng.shuffle(others)
        more = "".join(
            f"{eos}\nQuestion: What is the {key}? {facts[key]}" for key in others[: questions - 1]
        )
        out.append(s.model_copy(update={"answer": s.answer + more}))
    return out


def _turn_rows(tokenizer, samples: list[TrainSample]) -> list[dict]:
    """Pretraining rows of `more_questions` samples with the loss on the answers only.

    Each turn is tokenized as its question and its answer + ``eos`` (as the single-question rows
    are); ``token_type_ids`` mark the answers. Training the plain-text base on the questions'
    tokens as well (unmasked, no ``eos`` between turns) left it answering from the prior (0.20
    full-context accuracy after 2,000 steps, against 1.00 with this masking).
    """
    eos = tokenizer.eos_token
    rows = []
    for s in samples:
        first, *rest = s.answer.split(eos)
        turns = [(f"Context: {s.contexts[0]}\nQuestion: {s.question}", first)]
        turns += [tuple(piece.split("?", 1)) for piece in rest]  # "\nQuestion: ...", " value"
        ids: list[int] = []
        types: list[int] = []
        for i, (prompt, answer) in enumerate(turns):
            prompt_ids = _ids(tokenizer, prompt if i == 0 else prompt + "?")
            answer_ids = _ids(tokenizer, answer + eos)
            ids += prompt_ids + answer_ids
            types += [0] * len(prompt_ids) + [1] * len(answer_ids)
        rows.append({"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * len(ids)})
    return rows


def _eos(base: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base).eos_token


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def new_model(base: Path, mode: str, args: argparse.Namespace, **fields) -> SemiDynamicCompressor:
    torch.manual_seed(args.seed)
    config = CompressorConfig(
        encoder_model=str(base),
        mode=mode,
        ratios=args.ratios,
        converter_hidden=args.converter_hidden,
        encoder_lora=LoraSettings(r=8, alpha=16),
        decoder_lora=LoraSettings(r=8, alpha=16),
        max_segment_tokens=max(64, args.max_tokens),
        pool_layer=None if args.pool_layer < 0 else args.pool_layer,
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
        align_steps=args.align_steps,
        align_target=args.align_target,
        seed=args.seed,
        output_dir=str(Path(args.work) / name),
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
    """Accuracy per fact count: the binding task's k, the names task's 1-2 / 3-6 / 7-16."""
    by_facts: dict[str, list[bool]] = {}
    for s, ok in zip(samples, correct, strict=True):
        k = int(s.provenance["facts"])
        if s.source == "repro-binding":
            bucket = str(k)
        else:
            bucket = "1-2" if k <= 2 else "3-6" if k <= 6 else "7-16"
        by_facts.setdefault(bucket, []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(by_facts.items(), key=lambda kv: _lead(kv[0]))}


def _lead(bucket: str) -> int:
    return int(bucket.split("-")[0])


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# --- report ---------------------------------------------------------------------------------


def fixed_line(rows: list[dict], ratio: float) -> float | None:
    """Accuracy of the fixed-ratio rows interpolated at ``ratio`` (linear in log2 of avg ratio, all).

    ``None`` outside the range the fixed ratios span: the line is not extrapolated.
    """
    points = sorted(
        (math.log2(r["avg_ratio_all"]), r["accuracy"])
        for r in rows
        if r["method"] == "fixed ratio (multi-ratio weights)"
    )
    x = math.log2(ratio)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def markdown(results: dict) -> str:
    rows = results["rows"]
    buckets = list(rows[0]["accuracy_by_facts"])
    lines = [
        "# CPU-scale reproduction: fixed-ratio vs semi-dynamic vs fully dynamic",
        "",
        f"Setup: {results['setup']}",
        "",
        "| method | setting | accuracy | avg ratio (correct) | avg ratio (all) | "
        f"std log2 ratio | acc {' / '.join(buckets)} facts | fixed line at same ratio (all) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        acc = row["accuracy_by_facts"]
        ratio = row["avg_ratio_correct"]
        line = (
            None
            if row["method"].startswith(("fixed", "base"))
            else fixed_line(rows, row["avg_ratio_all"])
        )
        versus = "-" if line is None else f"{line:.3f} ({row['accuracy'] - line:+.3f})"
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['accuracy']:.3f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {row['avg_ratio_all']:.2f} | "
            f"{row['log2_ratio_std']:.2f} | "
            + " / ".join(f"{acc.get(b, float('nan')):.2f}" for b in buckets)
            + f" | {versus} |"
        )
    lines += ["", "Training:", ""]
    for name, info in results["training"].items():
        detail = (
            f" (lm {info['final_lm_loss']:.3f}, mse {info['final_mse']:.3f}), `{info['checkpoint']}`"
            if "checkpoint" in info
            else " (answer tokens, last batch)"
        )
        reused = " (reused from an earlier run)" if info.get("reused") else ""
        lines.append(
            f"- `{name}`: {info['seconds']} s{reused}, final loss {info['final_loss']:.3f}{detail}"
        )
    if "total_seconds" in results:
        lines += ["", f"Total wall time: {results['total_seconds']} s"]
    lines.append("")
    return "\n".join(lines)


# per task: what the defaults of the flags left at None are
TASK_DEFAULTS = {
    "names": {
        "max_tokens": 128,
        "pretrain_steps": 1500,
        "scales": SCALES,
        "converter_hidden": None,  # 2 x hidden
        "align_steps": 0,
        "align_target": "mean",
        "pool_layer": -1,
        "steps": 1000,
        "out": "train_repro",
        "work": "repro",
    },
    "binding": {
        "max_tokens": 64,
        "pretrain_steps": 2000,
        "scales": [-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
        "converter_hidden": BINDING_CONVERTER_HIDDEN,
        "align_steps": 300,
        "align_target": "salient",
        "pool_layer": 1,
        "steps": 2000,
        "out": "train_repro_binding",
        "work": "repro_bind",
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task",
        choices=sorted(TASK_DEFAULTS),
        default="names",
        help="names: codes looked up by name, 1-16 facts in 128 tokens (compression never binds); "
        "binding: 1/2/4/8 typed facts in 64 tokens, latents pooled from layer 1 (compression binds)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (a few minutes)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--module-lr-scale", type=float, default=5.0)
    parser.add_argument(
        "--pretrain-steps", type=int, default=None, help="plain-text pretraining of the base"
    )
    parser.add_argument(
        "--pretrain-questions",
        type=int,
        default=4,
        help="binding task: facts asked per context in plain-text pretraining (`more_questions`); "
        "the compressors train and evaluate on one. Names task: always 1",
    )
    parser.add_argument(
        "--reuse-base",
        action="store_true",
        help="skip pretraining when the work directory holds a base pretrained with these settings",
    )
    parser.add_argument(
        "--pretrain-only",
        action="store_true",
        help="stop after pretraining (and its reference rows)",
    )
    parser.add_argument("--train", type=int, default=6000, help="training samples")
    parser.add_argument("--eval", type=int, default=400, help="evaluation samples")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=768)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument(
        "--converter-hidden",
        type=int,
        default=None,
        help="converter MLP width: the bottleneck each latent passes (default 2 x hidden; "
        f"binding: {BINDING_CONVERTER_HIDDEN})",
    )
    parser.add_argument(
        "--pool-layer",
        type=int,
        default=None,
        help="encoder layer the latents pool (-1: the last, as in the paper; binding: 1)",
    )
    parser.add_argument(
        "--align-steps",
        type=int,
        default=None,
        help="converter alignment before training (`training.align`; 0: off; binding: 300)",
    )
    parser.add_argument(
        "--align-target",
        choices=["mean", "salient"],
        default=None,
        help="what alignment fits a latent to (binding: salient, the window's rarest token)",
    )
    parser.add_argument("--names", type=int, default=24, help="distinct names in the facts")
    parser.add_argument(
        "--threads", type=int, default=1, help="1 or 2 (2 is slower on a contended machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS, help="DRS candidates")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="scale sweep")
    parser.add_argument("--separate-fixed", action="store_true", help="one model per ratio too")
    parser.add_argument("--out", default=None, help="results path without suffix")
    parser.add_argument("--work", default=None, help="checkpoint directory (under the repo)")
    args = parser.parse_args(argv)
    defaults = TASK_DEFAULTS[args.task]
    for key in (
        "max_tokens",
        "pretrain_steps",
        "scales",
        "converter_hidden",
        "align_steps",
        "align_target",
        "pool_layer",
    ):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.converter_hidden = args.converter_hidden or 2 * args.hidden
    args.out = args.out or str(ROOT / "benchmarks" / "results" / defaults["out"])
    args.work = (
        str(Path(args.work).resolve()) if args.work else str(ROOT / "runs" / defaults["work"])
    )
    if not Path(args.work).is_relative_to(ROOT):
        parser.error(
            f"--work must lie inside the repository ({ROOT}): checkpoints are named relative to it"
        )
    if args.pretrain_questions < 1:
        parser.error("--pretrain-questions must be at least 1")
    if args.steps is None:
        args.steps = 150 if args.quick else defaults["steps"]
    if args.quick:
        args.pretrain_steps = min(args.pretrain_steps, 300)
        args.train, args.eval = min(args.train, 1000), min(args.eval, 100)
    return args


def pretrain_settings(args: argparse.Namespace) -> dict:
    """What the pretrained base depends on: a cached base is reused only when all of it matches."""
    keys = ("task", "seed", "names", "vocab", "hidden", "layers", "max_tokens", "train", "lr")
    keys += ("batch_size", "pretrain_steps", "pretrain_questions", "quick")
    return {key: getattr(args, key) for key in keys}


def write_results(
    args: argparse.Namespace, rows: list[dict], training: dict, sizes: tuple[int, int], **extra
) -> dict:
    """Write ``<out>.{json,md}`` with the rows so far; ``extra`` (seconds, complete) goes in too."""
    facts = (
        f"1, 2, 4 or 8 typed facts ({args.pretrain_questions} questions per context in pretraining)"
        if args.task == "binding"
        else "1-16 facts"
    )
    results = {
        "setup": (
            f"Qwen3 from scratch, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
            f"pretrained on the task in plain text for {args.pretrain_steps} steps, then "
            f"shared base + LoRA, base trained too; {args.steps} steps x batch {args.batch_size}, "
            f"lr {args.lr} (converter x{args.module_lr_scale}); {sizes[0]} train / {sizes[1]} "
            f"eval contexts of <= {args.max_tokens} tokens with {facts}; converter width "
            f"{args.converter_hidden}; ratios {args.ratios}; {args.threads} threads"
            + (" (quick)" if args.quick else "")
        ),
        "task": args.task,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "rows": rows,
        "training": training,
        **extra,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))
    return results


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, args.threads))
    begin = time.perf_counter()
    work = Path(args.work)
    stamp = work / "base" / "pretrain.json"
    cached = json.loads(stamp.read_text()) if args.reuse_base and stamp.exists() else None
    reuse = cached is not None and cached["settings"] == pretrain_settings(args)
    if args.reuse_base and not reuse:
        logger.info("no pretrained base with these settings in %s: pretraining", work)
    base, train_set, eval_set = build_data(args, work, keep_base=reuse)
    ys = [s.y[0] for s in train_set if s.y]
    logger.info(
        "data: %d train, %d eval; label y in [%.2f, %.2f]",
        len(train_set),
        len(eval_set),
        min(ys),
        max(ys),
    )
    # the base pretrains on several facts per binding context (`more_questions`)
    pretrain_set = (
        more_questions(train_set, args.pretrain_questions, args.seed, eos=_eos(base))
        if args.task == "binding"
        else train_set
    )
    rows, training = [], {}
    if reuse:
        training["pretrain"] = {**cached["info"], "reused": True}
    else:
        training["pretrain"] = pretrain_base(base, pretrain_set, args)
        stamp.write_text(
            json.dumps({"settings": pretrain_settings(args), "info": training["pretrain"]})
        )
    reference = new_model(base, "semi_dynamic", args)
    for with_context in (False, True):
        rows.append(
            {
                "method": "base decoder, plain text",
                "setting": "full context" if with_context else "no context",
                **evaluate_text(reference, eval_set, with_context=with_context),
            }
        )
    if args.pretrain_only:
        logger.info("reference rows: %s", [(r["setting"], r["accuracy"]) for r in rows])
        return
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

    # partial results: the fixed and semi-dynamic rows are readable while the baseline trains
    write_results(args, rows, training, (len(train_set), len(eval_set)), complete=False)

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

    results = write_results(
        args,
        rows,
        training,
        (len(train_set), len(eval_set)),
        total_seconds=round(time.perf_counter() - begin, 1),
        complete=True,
    )
    logger.info("wrote %s.{json,md}\n%s", args.out, markdown(results))


if __name__ == "__main__":
    main()
