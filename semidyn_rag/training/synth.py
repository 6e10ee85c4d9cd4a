"""Density-aware data synthesis with a teacher LLM (paper Sec. 3.4).

Phase 1 (tasks for the LM loss): QA pairs, a summary, and multi-document QA over shuffled passages.
Phase 2 (labels): an ultra-concise summary whose token length ``L_sum`` gives each context's density
label ``y = log2(L_ctx / L_sum)`` (Eq. 6), attached to every sample that contains that context.

Teachers: `OpenAITeacher` (any OpenAI-compatible ``/v1/chat/completions`` endpoint) or `HFTeacher`
(a local causal LM with its chat template). Output is `TrainSample` JSON lines with provenance;
a seed is done once its line is in ``<out>.seeds.jsonl``, so a rerun skips it. Every teacher answer
that fails a check is dropped *and counted* by reason in the returned `SynthStats`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from ..extras import require
from ..readers import jsonl_rows, parquet_rows, read_text
from .samples import TrainSample, density_label

logger = logging.getLogger(__name__)

TaskKind = Literal["density", "qa", "summary", "multi_doc"]
ALL_TASKS: tuple[TaskKind, ...] = ("density", "qa", "summary", "multi_doc")

SYSTEM = "You are a careful data annotator. Follow the requested output format exactly."
PROMPTS: dict[TaskKind, str] = {
    "density": (
        "Rewrite the text as an extremely concise summary that keeps every piece of information "
        "but omits all redundant words (telegraphic style is fine). Reply with the summary only."
        "\n\nText:\n{text}"
    ),
    "qa": (
        "Read the text and write {n} different question-answer pairs about it. Each answer must be "
        "a short span copied exactly from the text. Reply with JSON only, in this form: "
        '[{{"question": "...", "answer": "..."}}]\n\nText:\n{text}'
    ),
    "summary": "Summarize the text in a few sentences. Reply with the summary only.\n\nText:\n{text}",
    "multi_doc": (
        "Below are {k} passages. Write one question that needs the passages to be answered (best: "
        "one that combines facts from more than one passage) and its short answer, copied exactly "
        'from the passages. Reply with JSON only, in this form: {{"question": "...", "answer": '
        '"..."}}\n\n{passages}'
    ),
}
SUMMARY_QUESTION = "Summarize the context."
DENSITY_QUESTION = "Summarize the context as concisely as possible, omitting redundant words."


# --- teachers ------------------------------------------------------------------------------------


class TeacherError(RuntimeError):
    """The teacher could not be reached or answered with an error (the seed is retried later)."""


class Teacher(Protocol):
    name: str

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float) -> str:
        """The assistant's reply to ``messages``."""
        ...


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions server (vLLM, llama.cpp, OpenAI...).

    Needs the ``synth`` extra (httpx); raises :class:`~semidyn_rag.extras.MissingExtraError`
    without it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"openai:{model}"
        self.max_retries = max_retries
        self.backoff = backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._httpx = require("httpx", "the OpenAI-compatible teacher")
        self.client = self._httpx.Client(timeout=timeout, headers=headers)

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        error: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.post(self.url, json=body)
            except self._httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                error = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise TeacherError(
                    f"{self.url}: HTTP {response.status_code}: {response.text[:200]}"
                )
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise TeacherError(
                    f"{self.url}: not a chat completion: {response.text[:200]}"
                ) from e
            return content or ""
        raise TeacherError(f"{self.url}: gave up after {self.max_retries + 1} tries ({error})")


class HFTeacher:
    """A local causal LM (``from_pretrained``) answering through its chat template."""

    def __init__(
        self, name_or_path: str, *, gguf_file: str | None = None, device: str | None = None
    ) -> None:
        from ..loading import load_base, load_tokenizer

        self.name = f"hf:{name_or_path}"
        # a GGUF teacher loads from the converted cache; remote code never runs here
        self.tokenizer = load_tokenizer(name_or_path, gguf_file, trust_remote_code=False)
        self.model = load_base(name_or_path, gguf_file, trust_remote_code=False).eval()
        if device:
            self.model.to(device)

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float) -> str:
        import torch

        tok = self.tokenizer
        if tok.chat_template:
            prompt = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
        else:  # a base model: plain text, the reply continues it
            prompt = "\n\n".join(m["content"] for m in messages) + "\n\n"
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        if temperature > 0:
            sampling: dict[str, object] = {"do_sample": True, "temperature": temperature}
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.inference_mode():
            out = self.model.generate(
                **ids,
                max_new_tokens=max_tokens,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
                **sampling,
            )
        return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


# --- seeds ----------------------------------------------------------------------------------------


class Seed(BaseModel):
    id: str
    text: str


def _text_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_seeds(path: str | Path) -> list[Seed]:
    """Seed texts from ``.txt`` (blank-line-separated paragraphs), ``.jsonl`` or ``.parquet``
    (a ``text``/``context``/``content`` field; ``id`` optional, else a hash of the text)."""
    path = Path(path)
    if path.suffix == ".txt":
        paragraphs = re.split(r"\n\s*\n", read_text(path))
        rows = [{"text": p} for p in paragraphs if p.strip()]
    elif path.suffix == ".jsonl":
        rows = [row for _, row in jsonl_rows(path)]
    elif path.suffix == ".parquet":
        rows = [row for _, row in parquet_rows(path, purpose=f"reading seeds from {path}")]
    else:
        raise ValueError(f"{path}: seeds must be .txt, .jsonl or .parquet")
    seeds = []
    for number, row in enumerate(rows):
        text = next((row[k] for k in ("text", "context", "content") if row.get(k)), None)
        if not isinstance(text, str):
            raise ValueError(f"{path}: row {number} has no text/context/content field")
        text = text.strip()
        if text:
            seeds.append(Seed(id=str(row.get("id") or _text_id(text)), text=text))
    return seeds


# --- checks on teacher output ---------------------------------------------------------------------


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def grounded(answer: str, context: str) -> bool:
    """The answer occurs in the context (normalized), or for a long answer 80% of its words do."""
    ans, ctx = _normalize(answer), _normalize(context)
    if not ans:
        return False
    if ans in ctx:
        return True
    words = ans.split()
    return len(words) >= 4 and sum(w in set(ctx.split()) for w in words) >= 0.8 * len(words)


def summary_grounded(summary: str, context: str, threshold: float = 0.5) -> bool:
    """At least ``threshold`` of the summary's words (3+ letters) come from the context."""
    words = [w for w in _normalize(summary).split() if len(w) >= 3]
    vocab = set(_normalize(context).split())
    return bool(words) and sum(w in vocab for w in words) >= threshold * len(words)


def clean_reply(text: str) -> str:
    """Drop a reasoning block and surrounding whitespace."""
    return re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()


def parse_json(text: str) -> object:
    """The first JSON value in ``text`` (code fences and chatter around it are tolerated)."""
    text = clean_reply(text)
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise ValueError("no JSON value in reply")
    value, _ = json.JSONDecoder().raw_decode(text[min(starts) :])
    return value


def _pairs(value: object) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs from a parsed reply (one object or a list of them)."""
    items = value if isinstance(value, list) else [value]
    pairs = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("expected objects with question and answer")
        q, a = item.get("question"), item.get("answer")
        if not isinstance(q, str) or not isinstance(a, (str, int, float)):
            raise ValueError("expected string question and answer")
        pairs.append((q.strip(), str(a).strip()))
    return pairs


# --- synthesis --------------------------------------------------------------------------------


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tasks: list[TaskKind] = Field(default_factory=lambda: list(ALL_TASKS))
    qa_per_seed: int = Field(2, ge=1)
    multi_doc_passages: int = Field(3, ge=2)
    min_context_tokens: int = Field(16, ge=1)
    max_context_tokens: int = Field(1300, ge=1)
    """Seeds outside [min, max] tokens are skipped (paper: 128-1,300)."""
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.3, ge=0)
    seed: int = 0
    limit: int | None = Field(None, ge=1)
    """Process at most this many new seeds in this run."""


class SynthStats(BaseModel):
    """What happened to every seed and every teacher answer."""

    seeds_total: int = 0
    seeds_already_done: int = 0
    seeds_processed: int = 0
    seeds_out_of_range: int = 0
    seeds_failed: int = 0
    """Seeds whose teacher calls errored (nothing written; retried on the next run)."""
    kept: dict[str, int] = Field(default_factory=dict)
    filtered: dict[str, int] = Field(default_factory=dict)

    @property
    def num_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def num_filtered(self) -> int:
        return sum(self.filtered.values())


class _Seedwork:
    """Synthesis for one seed: teacher calls, checks, counting; samples collected in ``out``."""

    def __init__(self, synth: Synthesizer, seed: Seed, others: list[Seed]) -> None:
        self.s, self.seed, self.others = synth, seed, others
        self.out: list[TrainSample] = []
        self.kept: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()

    def ask(self, kind: TaskKind, **fields: object) -> str:
        cfg = self.s.config
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROMPTS[kind].format(**fields)},
        ]
        return self.s.teacher.chat(
            messages, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature
        )

    def drop(self, kind: str, reason: str, count: int = 1) -> None:
        self.filtered[f"{kind}:{reason}"] += count

    def keep(self, kind: TaskKind, contexts: list[Seed], question: str, answer: str) -> None:
        labels = [self.s.labels.get(c.id) for c in contexts]
        self.out.append(
            TrainSample(
                id=f"{self.seed.id}:{kind}:{self.kept[kind]}",
                contexts=[c.text for c in contexts],
                question=question,
                answer=answer,
                y=labels if any(v is not None for v in labels) else None,
                source="synth",
                provenance={
                    "teacher": self.s.teacher.name,
                    "kind": kind,
                    "seed_id": self.seed.id,
                    "passages": ",".join(c.id for c in contexts),
                },
            )
        )
        self.kept[kind] += 1

    def density(self) -> None:
        summary = clean_reply(self.ask("density", text=self.seed.text))
        if not summary:
            return self.drop("density", "empty")
        n_ctx, n_sum = self.s.count(self.seed.text), self.s.count(summary)
        if n_sum >= n_ctx:
            return self.drop("density", "summary_not_shorter")
        if not summary_grounded(summary, self.seed.text):
            return self.drop("density", "summary_not_grounded")
        self.s.labels[self.seed.id] = density_label(n_ctx, n_sum)
        self.keep("density", [self.seed], DENSITY_QUESTION, summary)
        self.out[-1].provenance.update(ctx_tokens=n_ctx, summary_tokens=n_sum)

    def summary(self) -> None:
        summary = clean_reply(self.ask("summary", text=self.seed.text))
        if not summary:
            return self.drop("summary", "empty")
        if self.s.count(summary) >= self.s.count(self.seed.text):
            return self.drop("summary", "summary_not_shorter")
        if not summary_grounded(summary, self.seed.text):
            return self.drop("summary", "summary_not_grounded")
        self.keep("summary", [self.seed], SUMMARY_QUESTION, summary)

    def qa(self, kind: TaskKind, contexts: list[Seed], reply: str, expected: int) -> None:
        try:
            pairs = _pairs(parse_json(reply))
        except ValueError:
            return self.drop(kind, "unparseable_json", expected)
        joined = "\n".join(c.text for c in contexts)
        seen: set[str] = set()
        for question, answer in pairs[:expected]:
            if not question or not answer:
                self.drop(kind, "empty")
            elif not grounded(answer, joined):
                self.drop(kind, "answer_not_grounded")
            elif _normalize(question) in seen:
                self.drop(kind, "duplicate")
            else:
                seen.add(_normalize(question))
                self.keep(kind, contexts, question, answer)
        if len(pairs) < expected:
            self.drop(kind, "missing", expected - len(pairs))

    def multi_doc(self) -> None:
        k = self.s.config.multi_doc_passages
        if len(self.others) < k - 1:
            return self.drop("multi_doc", "too_few_seeds")
        rng = random.Random(f"{self.s.config.seed}:{self.seed.id}")
        passages = [self.seed, *rng.sample(self.others, k - 1)]
        rng.shuffle(passages)
        listing = "\n\n".join(f"Passage {i + 1}:\n{p.text}" for i, p in enumerate(passages))
        self.qa("multi_doc", passages, self.ask("multi_doc", k=k, passages=listing), 1)

    def run(self) -> None:
        tasks = self.s.config.tasks
        if "density" in tasks:  # first: its label goes into this seed's other samples
            self.density()
        if "qa" in tasks:
            n = self.s.config.qa_per_seed
            self.qa("qa", [self.seed], self.ask("qa", n=n, text=self.seed.text), n)
        if "summary" in tasks:
            self.summary()
        if "multi_doc" in tasks:
            self.multi_doc()


class Synthesizer:
    """Runs the teacher over seeds and appends the kept samples to ``out_path``."""

    def __init__(
        self,
        teacher: Teacher,
        out_path: str | Path,
        config: SynthConfig | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        self.teacher = teacher
        self.out_path = Path(out_path)
        self.state_path = self.out_path.with_name(self.out_path.name + ".seeds.jsonl")
        self.config = config or SynthConfig()
        self.count = count_tokens or (lambda text: len(text.split()))
        self.labels: dict[str, float] = {}

    def _done(self) -> set[str]:
        """Seeds finished in earlier runs (and the density labels they produced)."""
        done: set[str] = set()
        if self.state_path.exists():
            for line in self.state_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    done.add(json.loads(line)["seed_id"])
        if self.out_path.exists():
            with self.out_path.open(encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    record = TrainSample.model_validate_json(line)
                    done.add(str(record.provenance.get("seed_id")))
                    if record.provenance.get("kind") == "density" and record.y:
                        label = record.y[0]
                        if label is not None:
                            self.labels[str(record.provenance["seed_id"])] = label
        return done

    def run(self, seeds: Sequence[Seed]) -> SynthStats:
        cfg = self.config
        stats = SynthStats(seeds_total=len(seeds))
        kept: Counter[str] = Counter()
        filtered: Counter[str] = Counter()
        done = self._done()
        usable = []
        for seed in seeds:
            if seed.id in done:
                stats.seeds_already_done += 1
            elif not cfg.min_context_tokens <= self.count(seed.text) <= cfg.max_context_tokens:
                stats.seeds_out_of_range += 1
            else:
                usable.append(seed)
        todo = usable[: cfg.limit] if cfg.limit else usable
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        for seed in tqdm(todo, desc="synth", disable=not todo):
            others = [s for s in usable if s.id != seed.id]
            work = _Seedwork(self, seed, others)
            try:
                work.run()
            except TeacherError as e:
                logger.warning("seed %s: teacher failed (%s); it will be retried", seed.id, e)
                stats.seeds_failed += 1
                continue
            with self.out_path.open("a", encoding="utf-8") as f:
                f.writelines(sample.model_dump_json() + "\n" for sample in work.out)
            with self.state_path.open("a", encoding="utf-8") as f:
                record = {"seed_id": seed.id, "kept": work.kept, "filtered": work.filtered}
                f.write(json.dumps(record) + "\n")
            kept.update(work.kept)
            filtered.update(work.filtered)
            stats.seeds_processed += 1
        stats.kept, stats.filtered = dict(kept), dict(filtered)
        logger.info(
            "synthesis: %d seeds processed (%d already done, %d failed), %d samples kept, "
            "%d teacher answers filtered %s",
            stats.seeds_processed,
            stats.seeds_already_done,
            stats.seeds_failed,
            stats.num_kept,
            stats.num_filtered,
            stats.filtered,
        )
        return stats


def synthesize(
    seeds: Sequence[Seed] | str | Path,
    teacher: Teacher,
    out_path: str | Path,
    config: SynthConfig | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> SynthStats:
    """Synthesize training samples from ``seeds`` (or a seed file) into ``out_path`` (resumable)."""
    if isinstance(seeds, (str, Path)):
        seeds = load_seeds(seeds)
    return Synthesizer(teacher, out_path, config, count_tokens).run(seeds)
