"""Recipe of the bundled default compressor (SmolLM2-135M-Instruct as encoder and decoder base).

    python recipes/default.py synth     # synthetic QA tasks from the teacher (resumable)
    python recipes/default.py train     # converter fit + three SFT phases (resumable)
    python recipes/default.py teach     # the base decoder answers training questions on full text
    python recipes/default.py density   # surprisal labels on a mix of text kinds, head on layer 2
    python recipes/default.py distill   # fourth phase: distil the teacher's answers (resumable)
    python recipes/default.py teach-mixed  # teacher answers on retrieved HotpotQA top-5 paragraphs
    python recipes/default.py teach-unanswerable  # teacher answers to SQuAD's unanswerable questions
    python recipes/default.py mix       # fifth phase: prompts mixing text and latents (resumable)
    python recipes/default.py broad --grad-accum 8 --mixed-precision bf16  # the device run, on a CPU
    python recipes/default.py ship      # fp16 copy of the last phase's checkpoint + fitted head
    python recipes/default.py eval      # held-out SQuAD articles: table, peers, Pareto plot

``make train-default`` runs them all. Data: SQuAD (whole articles held out for evaluation) and
HotpotQA training rows from ``../shared/data``, plus synthetic QA tasks written by the synthesis
pipeline with SmolLM2 itself as the teacher (the only LLM available offline here). The first three
phases learn from gold answers; the fourth from the untouched base decoder's own answers on the
full text (sequence- and token-level distillation, PISCO-style), which is what "accuracy kept
under compression" measures; the fifth the same on retrieved multi-paragraph prompts in which the
retriever's best paragraphs are plain text (selective expansion). The ratio head is fitted in closed form to surprisal labels
(`training.density`): SmolLM2's summaries carry no density signal, its surprisal does.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from semidyn_rag import CompressorConfig, SemiDynamicCompressor
from semidyn_rag.checkpoint import CONFIG_NAME, DEFAULT_CHECKPOINT, MODULES_NAME
from semidyn_rag.data import load_hotpotqa, sample, squad_article_split
from semidyn_rag.evaluation import CheckpointRef, Evaluator, select_settings
from semidyn_rag.loading import SMOLLM2, SMOLLM2_GGUF
from semidyn_rag.training.cloze import cloze_samples
from semidyn_rag.training.density import (
    Surprisal,
    bits_per_latent,
    fit_ratio_head,
    head_features,
    install_head,
    surprisal,
    surprisal_label,
)
from semidyn_rag.training.distill import teacher_answers
from semidyn_rag.training.samples import (
    TrainSample,
    density_label,
    from_qa_samples,
    read_jsonl,
    reconstruction_samples,
    write_jsonl,
)
from semidyn_rag.training.synth import HFTeacher, Seed, SynthConfig, synthesize
from semidyn_rag.training.trainer import STATE_DIR, TrainConfig, Trainer, list_checkpoints

logger = logging.getLogger("recipes.default")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RUN = ROOT / "runs" / "default"
RESULTS = ROOT / "benchmarks" / "results" / "default_eval"
EVAL_ARTICLES = 4
SEED = 0

COMPRESSOR = CompressorConfig(
    encoder_model=SMOLLM2,
    encoder_gguf_file=SMOLLM2_GGUF,
    mode="semi_dynamic",
    pool_layer=2,  # pooled states still close to token embeddings the decoder can learn to read
    converter_hidden=1024,  # 4096 in the paper; smaller keeps the shipped files under 40 MB
    max_segment_tokens=512,
)
TRAIN = TrainConfig(  # first phase of the run that produced the shipped default (README)
    steps=700,
    batch_size=4,
    lr=2e-4,
    warmup_steps=10,
    schedule="constant",
    mse_weight=1.0,
    ratio_sampling="multi",
    train_ratios=[2, 4, 8],  # where 700 CPU steps can teach the decoder something
    align_steps=1000,  # converter fitted to mean pooled decoder embeddings first ...
    align_contexts=480,
    encoder_warmup_steps=700,  # ... and held there: only the decoder adapter and the head train
    max_context_tokens=384,
    seed=SEED,
    output_dir=str(RUN / "checkpoints"),
    save_every=25,
    keep_last=2,
    resume_from="auto",
    log_every=10,
    eval_every=100,
)
SPECIALIZE = TrainConfig.model_validate(
    {**TRAIN.model_dump(), "steps": 1400, "train_ratios": [4], "encoder_warmup_steps": 1400}
)
"""Second phase: resumes the first one's last checkpoint and trains the decoder at ratio 4 alone,
the lowest ratio the bar counts, with reconstruction samples mixed in; the encoder side stays held."""
WIDEN = TrainConfig.model_validate(
    {**SPECIALIZE.model_dump(), "steps": 2000, "train_ratios": [4, 8], "encoder_warmup_steps": 2000}
)
"""Third phase: the same mix at ratios 4 and 8, so that the selector's choices above 4 are read too."""
DISTILL = TrainConfig.model_validate(
    {
        **WIDEN.model_dump(),
        "steps": 200,
        "train_ratios": [4, 8],
        "encoder_warmup_steps": 200,
        "mse_weight": 0.0,  # the head is fitted in closed form (`density`), not by gradient
        "align_steps": 0,  # the converter the decoder learned to read stays as it is
        "kd_weight": 1.0,
        "output_dir": str(RUN / "distill"),
        "save_every": 20,
    }
)
"""Fourth phase: sequence- and token-level distillation of the base decoder's full-text answers
(``teach``) at ratios 4 and 8, with a quarter as many reconstruction samples mixed in. It starts
from the third phase's last checkpoint (``--init default``: from the bundled default, which is that
checkpoint in fp16) with a fresh optimizer, in its own directory."""
MIX = TrainConfig.model_validate(
    {**DISTILL.model_dump(), "steps": 150, "output_dir": str(RUN / "mix")}
)
"""Fifth phase: the fourth one's settings on retrieved multi-paragraph prompts in which the
retriever's best 0-2 paragraphs are plain text and the rest latents (selective expansion), mixed
with as many single-paragraph distilled samples and a third as many reconstructions. It starts
from the bundled default (the fourth phase shipped) with a fresh optimizer."""
RELEASE = TrainConfig.model_validate(
    {
        **MIX.model_dump(),
        "steps": 160,
        "encoder_warmup_steps": 0,  # encoder adapter and converter train from step 0
        "module_lr_scale": 1.0,  # the converter moves no faster than the adapters (collapse)
        "output_dir": str(RUN / "release"),
        "eval_every": 40,
    }
)
"""Sixth phase: the fifth one's data with the encoder side released. Every earlier phase held the
encoder adapter and the converter where alignment put them, so the latents stayed the converter's
regression onto mean token embeddings; now that the decoder reads those, encoder and converter
learn from its distillation and reconstruction losses what it can read best. It starts from the
bundled default (the fifth phase shipped) with a fresh optimizer; ``density`` would refit the head
on the released encoder's layer 2. Measured and not shipped: 160 steps lowered held-out accuracy at
r=4 within noise (docs/experiments.md)."""
ADAPT = TrainConfig.model_validate(
    {
        **RELEASE.model_dump(),
        "decoder_warmup_steps": 160,  # held throughout: the decoder reads as the fifth phase taught
        "output_dir": str(RUN / "adapt"),
    }
)
"""``RELEASE`` with the decoder's adapter held: the encoder side (its adapter below the pooled
layer and the converter) learns alone what the decoder the fifth phase trained reads best. In
``RELEASE`` both sides moved at once and the decoder's use of the latents fell; this separates
the two."""
NUDGE = TrainConfig.model_validate(
    {**ADAPT.model_dump(), "lr": 2e-5, "output_dir": str(RUN / "nudge")}
)
"""``ADAPT`` at a tenth of the rate. With the decoder held the rate moves only the encoder side,
whose LoRA scale (alpha / r = 8) makes 2e-4 a large step; this asks whether ``ADAPT``'s drop in
`latent_use` within 40 steps is the step size."""
NUDGE2 = TrainConfig.model_validate(
    {
        **NUDGE.model_dump(),
        "steps": 480,
        "decoder_warmup_steps": 480,
        "output_dir": str(RUN / "nudge2"),
        "eval_every": 80,
    }
)
"""``NUDGE`` continued: 480 more steps from ``nudge`` shipped (``ship --phase nudge`` first), with a
fresh optimizer, because 160 steps at 2e-5 moved the encoder side little."""
RECALL = TrainConfig.model_validate(
    {
        **MIX.model_dump(),
        "steps": 240,
        "encoder_warmup_steps": 240,  # held throughout (MIX's 200 would release it at step 200)
        "output_dir": str(RUN / "recall"),
        "eval_every": 80,
    }
)
"""Experiment after the sixth phase: the fifth phase's settings (encoder side held) with every
distilled sample and as many reconstructions as QA samples, because what the latents lose on
held-out questions is exact tokens (names, numbers), which reconstruction trains directly.
Measured and not shipped: 240 steps lowered held-out accuracy at r=4 and r=8 within noise
(docs/experiments.md)."""
SCALE = TrainConfig.model_validate(
    {
        **MIX.model_dump(),
        "steps": 600,
        "encoder_warmup_steps": 600,  # held throughout, as in the fifth phase (MIX's 200 >= 150)
        "output_dir": str(RUN / "scale"),
        "eval_every": 100,
    }
)
"""The fifth phase's settings and proportions on all the data there is: every teacher answer
(``teach --teach-limit 0`` answers every training question), the mixed prompts and a third as many
reconstructions. The CPU phases saw 448-640 samples; this is the phase ``recipes/device_run.py``
runs by default on a GPU, where the teacher answers take a minute (it runs on the CPU too, slowly)."""
ANNEAL = TrainConfig.model_validate(
    {
        **SCALE.model_dump(),
        "steps": 240,
        "encoder_warmup_steps": 240,
        "schedule": "linear",  # 2e-4 down to 0: every earlier phase held the rate constant
        "min_lr_ratio": 0.0,
        "output_dir": str(RUN / "anneal"),
        "eval_every": 80,
    }
)
"""The decay step of a warmup-stable-decay schedule (Hu et al. 2024, MiniCPM; Hägele et al. 2024):
every phase before it trained at a constant 2e-4, where the loss plateaus above what the same
weights reach once the rate falls. ``SCALE``'s data (every teacher answer), from the bundled
default with a fresh optimizer: ten warm-up steps to 2e-4 (``warmup_steps``, as in every phase),
then a linear decay that reaches 0 at step 240 (the last step's rate is 2e-4 / 230). The rate is a
function of the step, so a resumed anneal keeps its schedule; ``ship`` refuses one not finished."""
MIRROR = TrainConfig.model_validate(
    {
        **MIX.model_dump(),
        "steps": 160,
        "encoder_warmup_steps": 160,  # held throughout, as in the fifth phase
        "hidden_weight": 4.0,  # ~0.15 at the start: 0.6 sits beside the LM and KD terms (~0.9 each)
        "output_dir": str(RUN / "mirror"),
        "eval_every": 40,
    }
)
"""The fifth phase's settings and ``RELEASE``'s data, plus hidden-state distillation
(`loss.hidden_state_loss`): at the question and answer positions, every layer of the decoder
reading latents is pulled toward the base decoder reading the plain text. Answering through the
adapter's own reconstruction of the latents answers more questions than reading them directly
(``benchmarks/reconstruction.py``), so the latents carry more than the decoder's direct reading
takes; the answer tokens' KL says only what to answer, this says what the question's positions
should have gathered from the context."""
SHALLOW = TrainConfig.model_validate(
    {
        **MIX.model_dump(),
        "steps": 160,
        "encoder_warmup_steps": 160,  # converter held after alignment, as in the fifth phase
        "align_steps": 3000,  # a new converter for the new layer, fitted before the decoder trains
        "align_contexts": 1000,
        "output_dir": str(RUN / "shallow"),
        "eval_every": 40,
    }
)
"""The fifth phase's decoder taught to read latents pooled from the encoder's input embeddings
(``POOL_LAYERS``) instead of its layer 2. The converter regresses pooled states onto the mean
decoder embeddings of their windows; from layer 2 it reaches a held-out relative error of 0.25 and
its latents keep 0.57 of a window's tokens at r=4, from layer 0 0.03 and 0.74, near the 0.75 the
exact means hold (``benchmarks/latent_tokens.py``). The fifth phase's decoder reads the sharper
latents no worse untouched; this asks whether it learns to use what they add. The ratio head
still reads layer 2. ``RELEASE``'s data, from the bundled default with a fresh optimizer."""
SHALLOW2 = TrainConfig.model_validate(
    {
        **SHALLOW.model_dump(),
        "steps": 320,
        "encoder_warmup_steps": 320,
        "align_steps": 0,  # the converter ``shallow`` aligned stays as it is
        "output_dir": str(RUN / "shallow2"),
        "eval_every": 80,
    }
)
"""``SHALLOW`` continued: 320 more steps from ``shallow`` shipped (``ship --phase shallow`` first),
with a fresh optimizer, on ``SCALE``'s data (every teacher answer), because 160 steps on 640
examples left both its answers and its reconstructions where the fifth phase's were."""
JOINT = TrainConfig.model_validate(
    {
        **RELEASE.model_dump(),
        "steps": 2000,
        "output_dir": str(RUN / "joint"),
        "eval_every": 200,
    }
)
"""The paper's end-to-end training at GPU scale: ``RELEASE``'s optimisation (encoder adapter,
converter and decoder adapter all train from step 0) on ``SCALE``'s data (every teacher answer),
for thousands of steps. Every CPU phase that moved the encoder side ran 160-640 steps; this is the
phase ``recipes/device_pack.py --run-args="--phase joint"`` runs on a GPU (a CPU takes days)."""
DIVERSE = TrainConfig.model_validate({**JOINT.model_dump(), "output_dir": str(RUN / "diverse")})
"""``JOINT`` on a corpus of thousands of paragraphs beside the teacher answers (`corpus_tasks`):
cloze questions on every HotpotQA training paragraph, distractors included, and 1,000
reconstruction pieces drawn from them.
On the H200, ``joint`` learnt its training questions (r=4 0.25 on 100 of them, 0.10 with another
question's paragraph, against 0.13 and 0.03 for the fifth phase) and held-out ones no better
(0.15): 2,405 questions on 12 SQuAD articles and 284 HotpotQA rows are passed over many times in
a long run. Questions the decoder cannot know by heart make it read the latents."""
BROAD = TrainConfig.model_validate({**JOINT.model_dump(), "output_dir": str(RUN / "broad")})
"""``DIVERSE`` plus the teacher's answers to SQuAD 2.0's unanswerable questions on the training
articles (`unanswerable_questions`): 2,359 more human-written questions beside the 2,405
answered ones, the question data a long run is short of."""
READ = TrainConfig.model_validate(
    {
        **SCALE.model_dump(),
        "steps": 800,
        "encoder_warmup_steps": 800,  # held throughout: the latents stay joint's
        "output_dir": str(RUN / "read"),
        "eval_every": 200,
    }
)
"""The decoder alone learning to read ``joint``'s latents, from ``joint`` shipped (``ship --phase
joint`` after installing the GPU checkpoint; not the fifth phase). ``joint``'s encoder side made
the latents carry more (answers through the decoder's own reconstruction 21 of 100 at r=4), but
its decoder answered 15 directly, having learnt its training questions by heart. Here the encoder
side is held and the decoder adapter trains on ``RELEASE``'s draw plus `corpus_tasks`: mostly
cloze questions it cannot know by heart."""
QUESTION_FIRST = "Question: {question}\nContext: {context}\nQuestion: {question}"
"""A prompt that asks before the context and again after it (`ASK`)."""
ASK = TrainConfig.model_validate(
    {
        **SCALE.model_dump(),
        "steps": 480,
        "encoder_warmup_steps": 480,  # held throughout, as in the fifth phase
        "output_dir": str(RUN / "ask"),
        "eval_every": 160,
    }
)
"""The decoder taught to read latents after the question (``PROMPT_TEMPLATES``): in the default
prompt a causal decoder passes over the latents before it knows what it is asked, so their
positions' states can only hold what any question might need; asked first, its 30 layers over the
latents can decode what this question needs, while the latents stay question-independent and
storable. ``SCALE``'s data and the fifth phase's settings, from the bundled default with a fresh
optimizer. Untrained, the fifth phase read no better with this prompt (docs/experiments.md)."""
WEIGH = TrainConfig.model_validate(
    {**ASK.model_dump(), "gain_cap": 5.0, "output_dir": str(RUN / "weigh")}
)
"""``ASK``'s run on the default prompt, with the answer tokens of the teacher's answers weighed by
their context gain (LongCE, Fang et al. 2025; its cap of 5): a teacher answer of 20-30 tokens
mostly restates the question, and the uniform mean over its tokens spends most of the gradient
on what the decoder predicts without any context. The fifth phase answers as few of its own
training questions from the right latents (0.13) as of held-out ones (0.14): it does not fit
the tokens that take reading."""
CONTINUES = {"nudge2": "nudge", "shallow2": "shallow", "read": "joint"}
"""Phases that start from another phase shipped (``ship --phase <it>`` first), not from the fifth."""
POOL_LAYERS = {"shallow": 0, "shallow2": 0}
"""Phases that pool another encoder layer than the bundled default's (0: the input embeddings)."""
PROMPT_TEMPLATES = {"ask": QUESTION_FIRST}
"""Phases that train on another prompt template than the bundled default's; a checkpoint keeps
its template, so the phase shipped answers with the prompt it was trained on."""
DEVICE = TrainConfig.model_validate({**MIX.model_dump(), "output_dir": str(RUN / "device")})
"""Where ``recipes/device_fetch.py`` installs a checkpoint trained on a GPU by
``recipes/device_run.py`` (docs/gpu.md), so that ``ship --phase device`` ships it."""
PHASES = {
    "distill": DISTILL,
    "mix": MIX,
    "release": RELEASE,
    "adapt": ADAPT,
    "nudge": NUDGE,
    "nudge2": NUDGE2,
    "recall": RECALL,
    "scale": SCALE,
    "anneal": ANNEAL,
    "mirror": MIRROR,
    "shallow": SHALLOW,
    "shallow2": SHALLOW2,
    "joint": JOINT,
    "diverse": DIVERSE,
    "broad": BROAD,
    "read": READ,
    "ask": ASK,
    "weigh": WEIGH,
    "device": DEVICE,
}
"""The phases ``ship`` can ship, by name (``--phase``); the bundled default is ``mix``."""
RECONSTRUCTION_WORDS = 48
"""Piece length of the later phases' reconstruction samples (~64 tokens, 16 latents at r=4)."""
MONITOR = 16
"""HotpotQA rows kept out of training to watch, during training, whether the latents are read."""


def squad_split():
    return squad_article_split(
        DATA / "squad" / "dev-v2.0-part.json", n_eval_articles=EVAL_ARTICLES, seed=SEED
    )


def synth(limit: int) -> None:
    """Synthetic QA tasks on training paragraphs, written by the teacher (labels: see below)."""
    train, _ = squad_split()
    paragraphs = list(dict.fromkeys(c for s in train for c in s.contexts))
    seeds = [Seed(id=f"squad-{i}", text=t) for i, t in enumerate(paragraphs)]
    teacher = HFTeacher(SMOLLM2, gguf_file=SMOLLM2_GGUF)
    config = SynthConfig(
        tasks=["qa"], qa_per_seed=2, max_new_tokens=160, temperature=0.0, limit=limit
    )
    stats = synthesize(seeds, teacher, RUN / "synth.jsonl", config, count_tokens(teacher.tokenizer))
    logger.info("synthesis stats: %s", stats.model_dump_json())


def count_tokens(tokenizer):
    """Encoder tokens of a text, the unit the density labels count."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "and",
        "or",
        "but",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "as",
        "which",
        "who",
        "whom",
        "whose",
        "what",
        "when",
        "where",
        "while",
        "than",
        "then",
        "there",
        "their",
        "they",
        "he",
        "she",
        "his",
        "her",
        "him",
        "we",
        "our",
        "you",
        "your",
        "i",
        "not",
        "no",
        "also",
        "has",
        "have",
        "had",
        "do",
        "does",
        "did",
        "can",
        "could",
        "would",
        "should",
        "may",
        "might",
        "will",
        "shall",
        "into",
        "over",
        "under",
        "about",
        "after",
        "before",
        "between",
        "during",
    ]
)


def extractive_label(text: str, count) -> float:
    """Density label from an extractive ultra-concise summary: the text's distinct content words.

    SmolLM2-135M, the only LLM available offline here, mostly copies the text when asked for an
    ultra-concise summary (y ~ 0), so its labels carry no signal; repeated and function words are
    what such a summary drops, and their share is what this proxy measures (Eq. 6 on its length).
    """
    words = [w for w in re.findall(r"[\w'-]+", text) if w.lower() not in STOPWORDS]
    summary = " ".join(dict.fromkeys(words))
    return density_label(count(text), max(1, count(summary)))


def _labelled(samples: list[TrainSample], count) -> list[TrainSample]:
    return [
        s.model_copy(update={"y": [extractive_label(c, count) for c in s.contexts]})
        for s in samples
    ]


def training_samples(count) -> tuple[list[TrainSample], list[TrainSample]]:
    """Training samples and held-aside monitor samples, density labels attached.

    Training: SQuAD train articles, HotpotQA gold passages and synthetic tasks; monitor: the last
    ``MONITOR`` HotpotQA rows.
    """
    train, _ = squad_split()
    hotpot = load_hotpotqa(DATA / "hotpotqa" / "train.jsonl")
    synthetic = read_jsonl(RUN / "synth.jsonl") if (RUN / "synth.jsonl").exists() else []
    samples = _labelled([*from_qa_samples([*train, *hotpot[:-MONITOR]]), *synthetic], count)
    logger.info("%d training samples (%d synthetic)", len(samples), len(synthetic))
    return samples, _labelled(from_qa_samples(hotpot[-MONITOR:]), count)


TEACHER = RUN / "teacher.jsonl"
"""The base decoder's answers (and top-k targets) on the full training contexts (``teach``)."""
TEACH_CHUNK = 64
TEACH_LIMIT = 512
"""Training questions the teacher answers (the first ones, in `training_samples` order): what
one CPU session could afford; more is better."""


def teach_into(
    model: SemiDynamicCompressor, path: Path, samples: list[TrainSample], what: str
) -> None:
    """Append the untouched base decoder's answers to ``samples`` (`distill.teacher_answers`, full
    text) to ``path`` in chunks of `TEACH_CHUNK`, skipping those it holds: a rerun continues.
    A last line cut by a kill mid-write (no newline after it) is dropped first, with a warning:
    its answer is written again."""
    if path.exists():
        text = path.read_bytes()
        whole = text[: text.rfind(b"\n") + 1]
        if len(whole) < len(text):
            logger.warning(
                "%s: dropping a last line cut mid-write (%d bytes)", path, len(text) - len(whole)
            )
            path.write_bytes(whole)
    done = {s.id for s in read_jsonl(path)} if path.exists() else set()
    todo = [s for s in samples if s.id not in done]
    logger.info("%s: %d of %d samples left", what, len(todo), len(samples))
    for start in range(0, len(todo), TEACH_CHUNK):
        chunk = teacher_answers(model, todo[start : start + TEACH_CHUNK], progress=False)
        write_jsonl(chunk, path, append=True)
        logger.info("%s: %d/%d", what, min(start + TEACH_CHUNK, len(todo)), len(todo))


def teach(limit: int | None = None) -> None:
    """Distillation targets: the untouched base decoder answers every training question from the
    full text (`distill.teacher_answers`). Appends in chunks; a rerun continues where it stopped."""
    model = SemiDynamicCompressor.from_pretrained(None).eval()
    samples, _ = training_samples(count_tokens(model.tokenizer))
    samples = [s for s in samples if s.provenance.get("kind") == "qa"][: limit or None]
    teach_into(model, TEACHER, samples, "teacher")


MIXED_TEACHER = RUN / "teacher_mixed.jsonl"
"""The base decoder's answers on the retrieved top paragraphs of HotpotQA training rows."""
RETRIEVED = 5
"""Paragraphs retrieved per HotpotQA question (of its ten: two gold, eight distractors)."""
MAX_EXPANDED = 2
"""Each mixed sample expands the retriever's best ``k`` paragraphs, ``k`` uniform in 0..2."""
MIXED_LIMIT = 192
"""HotpotQA rows the mixed teacher answers (the first ones of `retrieved_hotpot`): what one CPU
session afforded next to other work; more is better."""


def retrieved_hotpot(limit: int | None = None) -> list[TrainSample]:
    """HotpotQA training rows (minus the monitor rows) with their ``RETRIEVED`` paragraphs most
    similar to the question under all-MiniLM-L6-v2, best first, as `expand_top_k` would see them;
    the first ``k`` are flagged ``expanded`` with ``k`` drawn per row (seeded).

    ``limit``: the first rows only, the same as ``retrieved_hotpot()[:limit]``, encoding only
    them (each row ranks its own paragraphs, and the draws go row by row in order)."""
    from semidyn_rag.embeddings import encode, load_sentence_model

    rows = from_qa_samples(load_hotpotqa(DATA / "hotpotqa" / "train.jsonl", distractors=True))
    rows = rows[:-MONITOR][:limit]
    embedder = load_sentence_model(None)
    rng = random.Random(SEED)
    out = []
    for row in rows:
        q, *ps = encode(embedder, [row.question, *row.contexts], batch_size=16, normalize=True)
        scores = [sum(a * b for a, b in zip(q, p, strict=True)) for p in ps]
        order = sorted(range(len(ps)), key=lambda i: (-scores[i], i))[:RETRIEVED]
        k = rng.randint(0, MAX_EXPANDED)
        out.append(
            row.model_copy(
                update={
                    "contexts": [row.contexts[i] for i in order],
                    "expanded": [rank < k for rank in range(len(order))],
                    "provenance": {**row.provenance, "kind": "retrieved", "expanded": k},
                }
            )
        )
    return out


def teach_mixed() -> None:
    """Teacher answers (full text of every retrieved paragraph) for `retrieved_hotpot`; resumable."""
    model = SemiDynamicCompressor.from_pretrained(None).eval()
    teach_into(model, MIXED_TEACHER, retrieved_hotpot(MIXED_LIMIT), "mixed teacher")


UNANSWERABLE_TEACHER = RUN / "teacher_unanswerable.jsonl"
"""The base decoder's answers to `unanswerable_questions` on the full paragraph (``teach-unanswerable``)."""
NO_GOLD = "(no gold answer)"
"""The placeholder answer of an `unanswerable_questions` sample: the teacher replaces it, and it
stays in the provenance's ``gold``."""


def unanswerable_questions() -> list[TrainSample]:
    """SQuAD 2.0's unanswerable questions on the training articles (2,359 beside their 2,121
    answerable ones), as questions for the teacher.

    Crowdworkers wrote them against the same paragraphs to look answerable; reading the full
    paragraph, the base decoder still answers each from it, usually with the passage the question
    was written about. Distillation needs that answer, not a gold one (PISCO), so they double the
    human-written questions a long run can learn from without adding one it could answer from
    memory of another. Each carries `NO_GOLD` as its answer until the teacher answers it.
    """
    train, _ = squad_article_split(
        DATA / "squad" / "dev-v2.0-part.json",
        n_eval_articles=EVAL_ARTICLES,
        seed=SEED,
        answerable_only=False,
    )
    return [
        TrainSample(
            id=f"{s.id}-unanswerable",
            contexts=list(s.contexts),
            question=s.question,
            answer=NO_GOLD,
            source=s.source,
            provenance={"kind": "qa-unanswerable", "title": s.title},
        )
        for s in train
        if not s.answers
    ]


def teach_unanswerable() -> None:
    """Teacher answers for `unanswerable_questions`; resumable."""
    model = SemiDynamicCompressor.from_pretrained(None).eval()
    teach_into(model, UNANSWERABLE_TEACHER, unanswerable_questions(), "unanswerable teacher")


HEAD_LAYER = 2
"""The ratio head reads layer 2's ``<eos>`` state, the layer pooling reads: encoding stops there."""
DENSITY = ROOT / "benchmarks" / "results" / "density"
HEAD_FILE = RUN / "ratio_head.safetensors"
PER_KIND = 60
"""Texts of each kind in the head's training mix (and 25 in the held-aside mix)."""
REFERENCE_RATIO = 4.0
"""The median training prose gets this ratio at scale 0 (it calibrates the bits per latent)."""
RIDGES = (1e-3, 1e-2, 1e-1, 1.0)


def _mix_sources(held: bool) -> tuple[list[str], list[str]]:
    """Paragraphs and names for `density_mix`: training articles, or held-out ones and HotpotQA dev."""
    train, held_out = squad_split()
    hotpot = DATA / "hotpotqa" / ("dev.jsonl" if held else "train.jsonl")
    rows = load_hotpotqa(hotpot, distractors=True)
    squad = held_out if held else train
    paragraphs = list(
        dict.fromkeys(
            [c for s in squad for c in s.contexts]
            + [c.split(": ", 1)[-1] for s in rows for c in s.contexts]
        )
    )
    names = sorted({c.split(": ", 1)[0] for s in rows for c in s.contexts})
    return paragraphs, names


def _surprisal_cached(model: SemiDynamicCompressor, texts: list[str]) -> list[Surprisal]:
    """`surprisal` (256 tokens per text), remembered in ``RUN/surprisal.json`` by text hash."""
    import hashlib

    path = RUN / "surprisal.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    key = {t: hashlib.sha256(t.encode()).hexdigest() for t in texts}
    todo = [t for t in texts if key[t] not in cache]
    if todo:
        for text, s in zip(todo, surprisal(model, todo, max_tokens=256), strict=True):
            cache[key[text]] = [s.bits, s.tokens]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache))
    return [Surprisal(*cache[key[t]]) for t in texts]


def density() -> None:
    """Surprisal labels on a mix of text kinds, a ridge-fitted head on layer ``HEAD_LAYER``, and
    the checks of the selector (label spread, Spearman on held-aside texts, ratios per kind)."""
    import numpy as np
    from density_mix import KINDS, mix
    from scipy.stats import spearmanr

    from semidyn_rag import selector

    model = SemiDynamicCompressor.from_pretrained(None, head_layer=HEAD_LAYER).eval()
    sets = {
        name: mix(*_mix_sources(held), per_kind, SEED + 17 * held, held=held)
        for name, held, per_kind in (("train", False, PER_KIND), ("held", True, 25))
    }
    stats = {k: _surprisal_cached(model, [t.text for t in v]) for k, v in sets.items()}
    prose = sorted(
        s.bits_per_token for s, t in zip(stats["train"], sets["train"]) if t.kind == "prose"
    )
    b = bits_per_latent(float(np.median(prose)), REFERENCE_RATIO)
    labels = {k: torch.tensor([surprisal_label(s, b) for s in v]) for k, v in stats.items()}
    feats = {k: head_features(model, [t.text for t in v]) for k, v in sets.items()}
    # choose the ridge on a split of the training mix, then refit on all of it
    n = len(labels["train"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    fit_idx, val_idx = order[: int(0.8 * n)], order[int(0.8 * n) :]
    scores = {}
    for ridge in RIDGES:
        fit = fit_ratio_head(feats["train"][fit_idx], labels["train"][fit_idx], ridge)
        pred = feats["train"][val_idx] @ fit.weight + fit.bias
        scores[ridge] = float(spearmanr(pred, labels["train"][val_idx]).statistic)
    ridge = max(scores, key=scores.get)
    fit = fit_ratio_head(feats["train"], labels["train"], ridge)
    install_head(model, fit)
    HEAD_FILE.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.ratio_head.state_dict().items()},
        HEAD_FILE,
    )
    pred_held = (feats["held"] @ fit.weight + fit.bias).tolist()
    cfg = model.config
    chosen = [
        selector.select_ratio(y, 0.0, cfg.ratios, cfg.quantize, cfg.compare_space)
        for y in pred_held
    ]
    per_kind = {}
    for kind in KINDS:
        idx = [i for i, t in enumerate(sets["held"]) if t.kind == kind]
        per_kind[kind] = {
            "label_mean": float(labels["held"][idx].mean()),
            "pred_mean": float(np.mean([pred_held[i] for i in idx])),
            "ratios": {str(r): sum(chosen[i] == r for i in idx) for r in cfg.ratios},
        }
    report = {
        "bits_per_latent": b,
        "ridge": ridge,
        "ridge_val_spearman": scores,
        "train_label_std": float(labels["train"].std()),
        "train_label_std_prose": float(
            labels["train"][[t.kind == "prose" for t in sets["train"]]].std()
        ),
        "train_rmse": fit.train_rmse,
        "held_spearman": float(spearmanr(pred_held, labels["held"]).statistic),
        "held_rmse": float(((torch.tensor(pred_held) - labels["held"]) ** 2).mean().sqrt()),
        "held_distinct_ratios_scale0": sorted({float(r) for r in chosen}),
        "per_kind_held": per_kind,
    }
    DENSITY.mkdir(parents=True, exist_ok=True)
    (DENSITY / "density.json").write_text(json.dumps(report, indent=1))
    logger.info("density report: %s", json.dumps(report, indent=1))


def train() -> None:
    """All three phases; each resumes from the last checkpoint in ``output_dir``."""
    torch.manual_seed(SEED)
    model = SemiDynamicCompressor.from_config(COMPRESSOR)
    count = count_tokens(model.tokenizer)  # density labels count encoder tokens
    samples, monitor = training_samples(count)
    Trainer(model, samples, TRAIN, eval_samples=monitor).train()
    contexts = [c for s in samples for c in s.contexts]
    recon = _labelled(reconstruction_samples(contexts, RECONSTRUCTION_WORDS), count)
    logger.info("later phases: %d reconstruction samples mixed in", len(recon))
    for phase in (SPECIALIZE, WIDEN):
        Trainer(model, [*samples, *recon], phase, eval_samples=monitor).train()


def distill(init: str) -> None:
    """The fourth phase (``DISTILL``); resumes its own last checkpoint when there is one."""
    torch.manual_seed(SEED)
    if list_checkpoints(DISTILL.output_dir) or init == "default":
        source = None  # resuming overwrites every trainable tensor; the base comes from the default
    else:
        found = list_checkpoints(TRAIN.output_dir)
        if not found:
            raise SystemExit(
                f"no third-phase checkpoint in {TRAIN.output_dir}: run `train` first, or pass "
                "--init default to start from the bundled default (that checkpoint in fp16)"
            )
        source = found[-1]
    logger.info("distill: weights from %s", source or "the bundled default")
    # the head is not trained here (mse_weight 0): reading it at layer 2 stops the encoder there
    model = SemiDynamicCompressor.from_pretrained(
        source, dtype=torch.float32, head_layer=HEAD_LAYER
    )
    count = count_tokens(model.tokenizer)
    taught = taught_samples(count)
    samples, monitor = training_samples(count)
    contexts = [c for s in samples for c in s.contexts]
    recon = _labelled(reconstruction_samples(contexts, RECONSTRUCTION_WORDS), count)
    recon = random.Random(SEED).sample(recon, min(len(recon), len(taught) // 3))
    logger.info("distill: %d teacher samples, %d reconstruction samples", len(taught), len(recon))
    Trainer(model, [*taught, *recon], DISTILL, eval_samples=monitor).train()


def taught_samples(count, every: bool = False) -> list[TrainSample]:
    """The teacher file's answers, density-labelled: its first ``TEACH_LIMIT`` (what the phases
    that made the default saw; ``teach --teach-limit 0`` appends the rest), or ``every`` one."""
    return _labelled(read_jsonl(TEACHER)[: None if every else TEACH_LIMIT], count)


def mixed_training_set(
    count, single: int, reconstructions: int, every_answer: bool = False
) -> list[TrainSample]:
    """The mixed prompts, ``single`` distilled single-paragraph samples (from `taught_samples`,
    ``every_answer`` passed on) and ``reconstructions`` reconstruction pieces of the SQuAD
    training articles (seeded draws)."""
    mixed = _labelled(read_jsonl(MIXED_TEACHER), count)
    rng = random.Random(SEED)
    taught = rng.sample(taught_samples(count, every_answer), single)
    train, _ = squad_split()
    recon = _labelled(
        reconstruction_samples(
            [c for s in from_qa_samples(train) for c in s.contexts], RECONSTRUCTION_WORDS
        ),
        count,
    )
    recon = rng.sample(recon, reconstructions)
    logger.info("%d mixed, %d single, %d reconstruction", len(mixed), len(taught), len(recon))
    return [*mixed, *taught, *recon]


def _release_draw(mixed: int, taught: int) -> tuple[int, int]:
    return 256, 192  # RELEASE's draw, kept by the phases that vary its optimisation


def _every_answer(mixed: int, taught: int) -> tuple[int, int]:
    return taught, (mixed + taught) // 3  # the fifth phase's proportions on all the data


PHASE_DRAWS = {
    "mix": lambda mixed, taught: (mixed, mixed // 3),
    "release": _release_draw,
    "adapt": _release_draw,
    "nudge": _release_draw,
    "nudge2": _release_draw,
    "mirror": _release_draw,
    "shallow": _release_draw,
    "shallow2": _every_answer,
    "recall": lambda mixed, taught: (taught, mixed + taught),
    "scale": _every_answer,
    "anneal": _every_answer,
    "joint": _every_answer,
    "diverse": _every_answer,
    "broad": _every_answer,
    "read": _release_draw,
    "ask": _every_answer,
    "weigh": _every_answer,
}
"""The phases that start from the bundled default, and what each draws: ``(mixed, taught) ->
(distilled single-paragraph samples, reconstructions)``, from the counts of mixed prompts and of
teacher answers it reads: every answer for the phases drawing `_every_answer`, the first
``TEACH_LIMIT`` for the others."""


CLOZE_PER_PARAGRAPH = 2
CORPUS_RECONSTRUCTIONS = 1000


def corpus_paragraphs() -> list[str]:
    """Distinct paragraphs of the HotpotQA training rows (every one, distractors included; the
    monitor rows left out), minus any whose title is a paragraph title of the HotpotQA dev rows
    (evaluated) or of the monitor rows: thousands of Wikipedia paragraphs, most never asked about.
    """
    path = DATA / "hotpotqa"
    train = load_hotpotqa(path / "train.jsonl", distractors=True)
    held = [*load_hotpotqa(path / "dev.jsonl", distractors=True), *train[-MONITOR:]]
    titles = {c.split(": ", 1)[0] for s in held for c in s.contexts}
    paragraphs = [c for s in train[:-MONITOR] for c in s.contexts]
    return [c for c in dict.fromkeys(paragraphs) if c.split(": ", 1)[0] not in titles]


def corpus_tasks(count) -> list[TrainSample]:
    """`corpus_paragraphs` as training tasks with gold answers: `CLOZE_PER_PARAGRAPH` cloze
    questions on each (`cloze_samples`) and `CORPUS_RECONSTRUCTIONS` reconstruction pieces
    (seeded draws), density-labelled."""
    paragraphs = corpus_paragraphs()
    cloze = cloze_samples(paragraphs, per_text=CLOZE_PER_PARAGRAPH, seed=SEED, source="hotpotqa")
    pieces = reconstruction_samples(paragraphs, RECONSTRUCTION_WORDS, source="hotpotqa")
    pieces = [p.model_copy(update={"id": f"corpus-{p.id}"}) for p in pieces]
    recon = random.Random(SEED).sample(pieces, min(CORPUS_RECONSTRUCTIONS, len(pieces)))
    logger.info(
        "corpus: %d paragraphs, %d cloze, %d reconstruction",
        len(paragraphs),
        len(cloze),
        len(recon),
    )
    return _labelled([*cloze, *recon], count)


PHASE_CORPUS = frozenset({"diverse", "broad", "read"})
"""The phases that add `corpus_tasks` to their draw."""
PHASE_UNANSWERABLE = frozenset({"broad"})
"""The phases that add every answer of `UNANSWERABLE_TEACHER` to their draw."""


def phase_training_set(phase: str, count, every_answer: bool | None = None) -> list[TrainSample]:
    """The training set of ``phase`` (a name in `PHASE_DRAWS`): `mixed_training_set` with that
    phase's draw sizes, from the teacher answers `PHASE_DRAWS` says it reads, unless
    ``every_answer`` says otherwise."""
    draw = PHASE_DRAWS[phase]
    every = draw is _every_answer if every_answer is None else every_answer
    mixed = len(read_jsonl(MIXED_TEACHER))
    taught = len(read_jsonl(TEACHER)[: None if every else TEACH_LIMIT])
    single, reconstructions = draw(mixed, taught)
    samples = mixed_training_set(count, min(single, taught), reconstructions, every_answer=every)
    if phase in PHASE_UNANSWERABLE:
        if not UNANSWERABLE_TEACHER.is_file():
            raise FileNotFoundError(
                f"{UNANSWERABLE_TEACHER} is missing: {phase} trains on it "
                "(python recipes/default.py teach-unanswerable)"
            )
        samples += _labelled(read_jsonl(UNANSWERABLE_TEACHER), count)
    return [*samples, *corpus_tasks(count)] if phase in PHASE_CORPUS else samples


def phase_run(phase: str, grad_accum: int = 1, precision: str = "no") -> TrainConfig:
    """``PHASES[phase]`` run with ``grad_accum`` micro-batches per step in ``precision``.

    ``grad_accum = k`` trains the examples of batch ``k × batch_size`` in each step (the trainer
    draws batches as a pure function of the step), so a CPU reproduces a device run's larger
    batch exactly, as ``recipes/device_run.py`` runs it (batch 32: ``grad_accum = 8``); bf16
    autocast is 1.34× faster on a CPU with AVX-512 BF16 (`benchmarks/bench_train_step.py`). Such
    a run trains as many examples as the phase, in ``ceil(steps / grad_accum)`` steps; the
    learning-rate warmup stays ``warmup_steps`` optimizer steps, as on the device, while a side
    released part-way is released after as many examples. It writes to its own directory
    (``<phase>-accum<k>-bf16``), saves and monitors as often in examples as the phase does, and
    never resumes or ships the phase's own checkpoints.

    Raises:
        ValueError: ``grad_accum`` below 1 or ``precision`` not ``no``/``bf16``.
    """
    if grad_accum < 1 or precision not in ("no", "bf16"):
        raise ValueError(f"grad_accum ≥ 1 and precision no|bf16, got {grad_accum}, {precision!r}")
    config = PHASES[phase]
    if grad_accum == 1 and precision == "no":
        return config
    suffix = (f"-accum{grad_accum}" if grad_accum > 1 else "") + (
        "-bf16" if precision == "bf16" else ""
    )
    fewer = {  # the same cadence in examples
        name: max(1, getattr(config, name) // grad_accum)
        for name in ("save_every", "eval_every", "log_every")
        if getattr(config, name)
    }
    released = {  # released part-way: after as many examples (a side held throughout stays so)
        name: getattr(config, name) // grad_accum
        for name in ("encoder_warmup_steps", "decoder_warmup_steps")
        if getattr(config, name) < config.steps
    }
    return config.model_copy(
        update={
            **fewer,
            **released,
            "steps": math.ceil(config.steps / grad_accum),
            "grad_accum": grad_accum * config.grad_accum,
            "mixed_precision": precision,
            "output_dir": f"{config.output_dir}{suffix}",
        }
    )


def run_flags(grad_accum: int, precision: str) -> str:
    """The command-line flags that select `phase_run`'s run (empty for the phase's own)."""
    return (f" --grad-accum {grad_accum}" if grad_accum != 1 else "") + (
        f" --mixed-precision {precision}" if precision != "no" else ""
    )


def train_phase(phase: str, grad_accum: int = 1, precision: str = "no") -> None:
    """Train ``phase`` (a name in `PHASE_DRAWS`; its config is ``PHASES[phase]``, run as
    `phase_run` says) from the bundled default, which must be what that phase starts from (the
    fifth phase for all but ``mix``, which starts from the fourth: ``make train-default`` ships
    it first), with a fresh optimizer; resumes the run's own last checkpoint."""
    torch.manual_seed(SEED)
    layers = {"pool_layer": POOL_LAYERS[phase]} if phase in POOL_LAYERS else {}
    prompt = {"prompt_template": PROMPT_TEMPLATES[phase]} if phase in PROMPT_TEMPLATES else {}
    if layers and not PHASES[phase].align_steps:
        # without alignment the phase reads the shipped converter, fitted to the shipped layer
        shipped = json.loads((DEFAULT_CHECKPOINT / CONFIG_NAME).read_text()).get("pool_layer")
        if shipped != layers["pool_layer"]:
            raise SystemExit(
                f"{phase} pools layer {layers['pool_layer']} with the bundled default's converter, "
                f"which reads layer {shipped}: ship the phase it continues first"
            )
    model = SemiDynamicCompressor.from_pretrained(
        None, dtype=torch.float32, head_layer=HEAD_LAYER, **layers, **prompt
    )
    count = count_tokens(model.tokenizer)
    _, monitor = training_samples(count)
    config = phase_run(phase, grad_accum, precision)
    Trainer(model, phase_training_set(phase, count), config, eval_samples=monitor).train()


SHIPPED_SUFFIXES = frozenset({".json", ".safetensors"})


def shippable_files(checkpoint: Path) -> list[tuple[Path, Path]]:
    """``(file, path relative to checkpoint)`` of what a shipped compressor holds: the JSON and
    safetensors files of ``checkpoint``, its trainer state left out, in sorted order."""
    found = []
    for path in sorted(checkpoint.rglob("*")):
        relative = path.relative_to(checkpoint)
        if path.is_file() and relative.parts[0] != STATE_DIR and path.suffix in SHIPPED_SUFFIXES:
            found.append((path, relative))
    return found


def ship(phase: str, grad_accum: int = 1, precision: str = "no") -> None:
    """Copy the last checkpoint of ``phase`` (a name in ``PHASES``; run as `phase_run` says) into
    the package, tensors cast to fp16, with the ratio head fitted by ``density`` on layer
    ``HEAD_LAYER`` (so encoding stops there). A phase whose rate decays (``anneal``) ships only
    once it has trained all its steps: before that its last checkpoint was trained at rates the
    decay has not yet lowered."""
    config = phase_run(phase, grad_accum, precision)
    directory = config.output_dir
    found = list_checkpoints(directory)
    if not found or not HEAD_FILE.exists():
        raise SystemExit(f"ship --phase {phase} needs a checkpoint in {directory}, and {HEAD_FILE}")
    last = found[-1]
    done = int(last.name.rpartition("-")[2])
    if config.schedule != "constant" and done < config.steps:
        raise SystemExit(
            f"ship --phase {phase}: {last.name} is step {done} of the {config.steps} of its "
            f"{config.schedule} schedule, whose rate has not decayed yet; finish the phase "
            f"(`python recipes/default.py {phase}{run_flags(grad_accum, precision)}` resumes it)"
        )
    card = DEFAULT_CHECKPOINT / "README.md"
    card_text = card.read_text() if card.exists() else None
    if DEFAULT_CHECKPOINT.exists():
        shutil.rmtree(DEFAULT_CHECKPOINT)
    for path, relative in shippable_files(last):
        target = DEFAULT_CHECKPOINT / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            if relative == Path(MODULES_NAME):
                tensors.update({f"ratio_head.{k}": v for k, v in load_file(HEAD_FILE).items()})
            save_file({k: v.half() for k, v in tensors.items()}, target)
        elif relative == Path(CONFIG_NAME):
            config = json.loads(path.read_text())
            target.write_text(json.dumps({**config, "head_layer": HEAD_LAYER}, indent=2))
        else:
            shutil.copy(path, target)
    if card_text is not None:  # the model card is written by hand, from the evaluation
        card.write_text(card_text)
        logger.warning("kept the model card %s: update its numbers from `eval`", card)
    size = sum(p.stat().st_size for p in DEFAULT_CHECKPOINT.rglob("*")) / 2**20
    logger.info("shipped %s to %s (%.1f MB)", last.name, DEFAULT_CHECKPOINT, size)


EVAL_SETTINGS = (
    "no_context",
    "full_context",
    "fixed_ratio_2",
    "fixed_ratio_4",
    "fixed_ratio_8",
    "truncation_2",
    "truncation_4",
    "truncation_8",
)
"""Baselines, the trained ratios and truncation to the same token budgets (the bar's peer)."""


def evaluate(
    limit: int, scales: list[float], settings: list[str], hotpot_limit: int, out: Path
) -> None:
    """Held-out SQuAD articles into ``out`` (and HotpotQA dev gold passages into
    ``<out>_hotpotqa``): table, Pareto plot, records."""
    model = CheckpointRef(None)
    chosen = select_settings(model, [*settings, *_scale_names(scales)])
    _, held_out = squad_split()
    Evaluator(model, sample(held_out, limit, SEED), out, max_new_tokens=24).run(chosen)
    print((out / "results.md").read_text())
    if hotpot_limit:
        dev = load_hotpotqa(DATA / "hotpotqa" / "dev.jsonl")
        out = out.with_name(f"{out.name}_hotpotqa")
        Evaluator(model, sample(dev, hotpot_limit, SEED), out, max_new_tokens=24).run(chosen)
        print((out / "results.md").read_text())


def _scale_names(scales: list[float]) -> list[str]:
    return [f"semi_dynamic_scale_{s:+g}" for s in scales]


def check_checkout(package: Path = DEFAULT_CHECKPOINT) -> None:
    """Refuse to run when the imported ``semidyn_rag`` is not this checkout's: the phases start
    from, ``ship`` replaces and ``eval`` measures the bundled default of the package imported,
    while the runs and results are this checkout's. A second worktree run without its own
    ``PYTHONPATH`` would overwrite the main checkout's default.

    Raises:
        SystemExit: ``package`` does not lie under `ROOT`.
    """
    if not package.resolve().is_relative_to(ROOT.resolve()):
        raise SystemExit(
            f"this recipe is {ROOT}'s, but it imports the bundled default from {package}: run "
            f"it with PYTHONPATH={ROOT}"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "step",
        choices=[
            "synth",
            "teach",
            "density",
            "train",
            "distill",
            "teach-mixed",
            "teach-unanswerable",
            *PHASE_DRAWS,
            "ship",
            "eval",
        ],
    )
    parser.add_argument("--init", choices=["third-phase", "default"], default="third-phase")
    parser.add_argument("--phase", choices=sorted(PHASES), default="mix", help="what ship ships")
    parser.add_argument(
        "--teach-limit", type=int, default=TEACH_LIMIT, help="teach: questions (0: all)"
    )
    parser.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="a phase or ship: micro-batches per step (8: a device run's batch 32 on the CPU)",
    )
    parser.add_argument(
        "--mixed-precision", choices=["no", "bf16"], default="no", help="a phase or ship"
    )
    parser.add_argument("--synth-limit", type=int, default=40)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--scales", type=float, nargs="*", default=[-1.0, -0.5, 0.0, 0.5, 1.0])
    parser.add_argument("--settings", nargs="+", default=list(EVAL_SETTINGS))
    parser.add_argument("--hotpot-limit", type=int, default=100)
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="eval: the SQuAD results directory"
    )
    args = parser.parse_args()
    check_checkout()
    if args.step not in (*PHASE_DRAWS, "ship") and run_flags(args.grad_accum, args.mixed_precision):
        parser.error(
            f"--grad-accum and --mixed-precision apply to a phase or ship, not {args.step}"
        )
    if args.step == "synth":
        synth(args.synth_limit)
    elif args.step == "distill":
        distill(args.init)
    elif args.step == "density":
        density()
    elif args.step == "teach":
        teach(args.teach_limit)
    elif args.step == "train":
        train()
    elif args.step == "teach-mixed":
        teach_mixed()
    elif args.step == "teach-unanswerable":
        teach_unanswerable()
    elif args.step in PHASE_DRAWS:
        train_phase(args.step, args.grad_accum, args.mixed_precision)
    elif args.step == "ship":
        ship(args.phase, args.grad_accum, args.mixed_precision)
    else:
        evaluate(args.eval_limit, args.scales, args.settings, args.hotpot_limit, args.out)


if __name__ == "__main__":
    main()
