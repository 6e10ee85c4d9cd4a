"""Evaluation harness: soft compression (ours) and hard text-compression peers on one decoder.

Settings, all on the same questions and the same decoder:

* baselines on the untouched base decoder: no context, full uncompressed context;
* soft compression (ours): each fixed ratio, and the semi-dynamic model across a ``scale`` sweep;
* hard compression (peers, :mod:`semidyn_rag.peers`), text read by the untouched base decoder at
  each ratio ``r``: truncation of every context to its first ``ceil(n/r)`` decoder tokens, and
  LLMLingua / LongLLMLingua scored by the same base LM (optional extra ``llmlingua``);
* selective expansion (``expand_top_K``, :mod:`semidyn_rag.expansion`): the first ``K`` contexts
  (a sample's contexts are taken to be in retrieval order, best first) go to the decoder as plain
  text and the rest as latents, in one mixed prompt read by the decoder with its adapter.

Every answered sample is appended to ``records/<setting>.jsonl`` as soon as its batch is done, so
an interrupted run resumes where it stopped, and a rerun whose answers are all recorded finishes
without loading a model (pass a :class:`CheckpointRef` instead of a loaded compressor).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, model_validator
from tqdm.auto import tqdm

from .config import CompressorConfig
from .data import QASample
from .metrics import EvalRecord, EvalSummary, summarize
from .peers import PEER_KINDS, HardCompression, truncate_texts
from .store import known_fingerprint, remember_fingerprint

if TYPE_CHECKING:
    from .lingua import LinguaPeer
    from .modeling import LatentPrompt, SemiDynamicCompressor

logger = logging.getLogger(__name__)

SettingKind = Literal[
    "no_context",
    "full_context",
    "fixed_ratio",
    "semi_dynamic",
    "truncation",
    "llmlingua",
    "longllmlingua",
    "expand",
]
Family = Literal["baseline", "soft", "hard"]
PAPER_SCALES = tuple(x / 2 for x in range(-4, 9))  # -2 ... 4 in steps of 0.5
QUICK_SCALES = (0.0, 1.0, 2.0)
QUICK_MAX_RATIO = 8.0
PRESETS = ("quick", "paper", "peers")
"""Names that ``--settings`` expands: ``quick`` (the default: baselines, trained ratios up to 8,
scales 0/1/2, truncation at those ratios), ``paper`` (baselines, every trained ratio, the scale
sweep -2...4, every peer at every ratio) and ``peers`` (every peer at every trained ratio)."""
_LINGUA = ("llmlingua", "longllmlingua")


class EvalSetting(BaseModel):
    """One point (or baseline line) of the accuracy-vs-ratio plot.

    ``ratio`` is required by the kinds that compress to a ratio (``fixed_ratio`` and the peers);
    ``scale`` is the semi-dynamic sweep's parameter (and the latent contexts' of ``expand``);
    ``k`` is required by ``expand``: how many contexts go as plain text.
    """

    kind: SettingKind
    ratio: float | None = None
    scale: float = 0.0
    k: int | None = None

    @model_validator(mode="after")
    def _needs_ratio(self) -> EvalSetting:
        if (self.kind == "fixed_ratio" or self.kind in PEER_KINDS) and not (
            self.ratio is not None and self.ratio >= 1
        ):
            raise ValueError(f"setting {self.kind} needs a ratio >= 1, got {self.ratio}")
        if self.kind == "expand" and not (self.k is not None and self.k >= 0):
            raise ValueError(f"setting expand needs k >= 0 (contexts kept as text), got {self.k}")
        return self

    @property
    def name(self) -> str:
        if self.kind == "expand":
            scale = f"_scale_{self.scale:+g}" if self.scale else ""
            return f"expand_top_{self.k}{scale}"
        if self.kind == "fixed_ratio" or self.kind in PEER_KINDS:
            return f"{self.kind}_{self.ratio:g}"
        if self.kind == "semi_dynamic":
            return f"semi_dynamic_scale_{self.scale:+g}"
        return self.kind

    @property
    def family(self) -> Family:
        """``baseline`` (plain text or none), ``soft`` (our latents) or ``hard`` (a text peer)."""
        if self.kind in ("fixed_ratio", "semi_dynamic", "expand"):
            return "soft"
        return "hard" if self.kind in PEER_KINDS else "baseline"


_NAME = re.compile(
    r"^(?:(?P<plain>no_context|full_context)"
    r"|(?P<kind>fixed_ratio|truncation|llmlingua|longllmlingua)_(?P<ratio>\d+(?:\.\d+)?)"
    r"|semi_dynamic_scale_(?P<scale>[+-]?\d+(?:\.\d+)?)"
    r"|expand_top_(?P<k>\d+)(?:_scale_(?P<kscale>[+-]?\d+(?:\.\d+)?))?)$"
)


def parse_setting(name: str) -> EvalSetting:
    """The setting a name stands for (the inverse of :attr:`EvalSetting.name`).

    ``no_context``, ``full_context``, ``fixed_ratio_4``, ``semi_dynamic_scale_+1.5``,
    ``truncation_8``, ``llmlingua_4``, ``longllmlingua_4``, ``expand_top_1``,
    ``expand_top_1_scale_+1``; ``ValueError`` names the forms otherwise.
    """
    match = _NAME.match(name.strip())
    if match is None:
        raise ValueError(
            f"unknown setting {name!r}: use a preset ({', '.join(PRESETS)}), a pattern such as "
            "'truncation_*', or a name: no_context, full_context, fixed_ratio_R, "
            "semi_dynamic_scale_+S, truncation_R, llmlingua_R, longllmlingua_R, expand_top_K"
        )
    if match["k"]:
        return EvalSetting(kind="expand", k=int(match["k"]), scale=float(match["kscale"] or 0))
    if match["plain"]:
        return EvalSetting(kind=match["plain"])
    if match["kind"]:
        return EvalSetting(kind=match["kind"], ratio=float(match["ratio"]))
    return EvalSetting(kind="semi_dynamic", scale=float(match["scale"]))


def peer_settings(ratios: Sequence[float], kinds: Sequence[str] = PEER_KINDS) -> list[EvalSetting]:
    """Each text-compression peer (``kinds``, from `PEER_KINDS`) at each ratio."""
    unknown = sorted(set(kinds) - set(PEER_KINDS))
    if unknown:
        raise ValueError(f"unknown peers {unknown}; known: {', '.join(PEER_KINDS)}")
    return [EvalSetting(kind=k, ratio=r) for k in kinds for r in ratios]


def default_settings(
    model: SemiDynamicCompressor | CheckpointRef,
    scales: Sequence[float] = PAPER_SCALES,
    *,
    peers: bool | Sequence[str] = False,
) -> list[EvalSetting]:
    """Both baselines, every trained ratio, (for a semi-dynamic model) the scale sweep and, with
    ``peers`` (``True``: all of `PEER_KINDS`, or a list of kinds), the peers at every ratio."""
    ratios = list(model.config.ratios)
    settings = [EvalSetting(kind="no_context"), EvalSetting(kind="full_context")]
    settings += [EvalSetting(kind="fixed_ratio", ratio=r) for r in ratios]
    if model.config.mode == "semi_dynamic":
        settings += [EvalSetting(kind="semi_dynamic", scale=s) for s in scales]
    if peers:
        settings += peer_settings(ratios, PEER_KINDS if peers is True else peers)
    return settings


def quick_settings(
    model: SemiDynamicCompressor | CheckpointRef, scales: Sequence[float] = QUICK_SCALES
) -> list[EvalSetting]:
    """A short sweep: baselines, the trained ratios up to 8 (else the smallest), the semi-dynamic
    model at ``scales``, and truncation at the same ratios."""
    ratios = [r for r in model.config.ratios if r <= QUICK_MAX_RATIO] or [min(model.config.ratios)]
    settings = [EvalSetting(kind="no_context"), EvalSetting(kind="full_context")]
    settings += [EvalSetting(kind="fixed_ratio", ratio=r) for r in ratios]
    if model.config.mode == "semi_dynamic":
        settings += [EvalSetting(kind="semi_dynamic", scale=s) for s in scales]
    return settings + peer_settings(ratios, ["truncation"])


def select_settings(
    model: SemiDynamicCompressor | CheckpointRef,
    names: Sequence[str] = ("quick",),
    scales: Sequence[float] | None = None,
) -> list[EvalSetting]:
    """Settings chosen by name, in order, without duplicates.

    Each entry is a preset (`PRESETS`), a setting name (:func:`parse_setting`) or a shell pattern
    (``truncation_*``, ``*_4``) matched against the ``paper`` preset's names. ``scales`` replaces
    the presets' semi-dynamic scales. ``ValueError`` for an unknown name or a pattern that
    matches nothing.
    """
    paper = default_settings(model, PAPER_SCALES if scales is None else scales, peers=True)
    chosen: dict[str, EvalSetting] = {}
    for entry in names:
        if entry == "quick":
            found = quick_settings(model, QUICK_SCALES if scales is None else scales)
        elif entry == "paper":
            found = paper
        elif entry == "peers":
            found = peer_settings(model.config.ratios)
        elif any(c in entry for c in "*?["):
            found = [s for s in paper if fnmatch.fnmatchcase(s.name, entry)]
            if not found:
                raise ValueError(
                    f"pattern {entry!r} matches no setting of this model; some names: "
                    + ", ".join(s.name for s in paper[:8])
                )
        else:
            found = [parse_setting(entry)]
        for setting in found:
            chosen.setdefault(setting.name, setting)
    return list(chosen.values())


class SettingResult(BaseModel):
    setting: EvalSetting
    name: str
    summary: EvalSummary


class CheckpointRef:
    """A compressor checkpoint that is loaded only when an answer must be computed.

    ``config`` is read from the checkpoint's JSON (our layout or the paper's) without loading any
    model. ``source_key`` hashes what determines the loaded model (the checkpoint's weight and
    config files, the base model files' names, sizes and times, the dtype): an evaluation that has
    seen this key with a loaded model knows its fingerprint, so a fully recorded rerun never loads
    it. ``None`` (bundled default) and local directories are supported; for a hub id
    ``source_key`` is ``None`` and the model is always loaded.
    """

    def __init__(
        self,
        name_or_path: str | Path | None = None,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        self.name_or_path = name_or_path
        self.device = device
        self.dtype = dtype
        self._config: CompressorConfig | None = None
        self._directory = self._local_directory(name_or_path)

    @staticmethod
    def _local_directory(name_or_path: str | Path | None) -> Path | None:
        if name_or_path is None:
            return Path(__file__).parent / "default"
        path = Path(name_or_path)
        return path if path.is_dir() else None

    def __repr__(self) -> str:
        return f"CheckpointRef({self.name_or_path or 'bundled default'!s})"

    @property
    def config(self) -> CompressorConfig:
        """The checkpoint's config (a hub checkpoint is loaded to get it)."""
        if self._config is None:
            self._config = self._read_config()
        return self._config

    def _read_config(self) -> CompressorConfig:
        directory = self._directory
        from .checkpoint import CONFIG_NAME, OFFICIAL_CONFIG, official_config, read_config

        if directory is not None and (directory / CONFIG_NAME).is_file():
            return read_config(directory)
        if directory is not None and (directory / OFFICIAL_CONFIG).is_file():
            return official_config(json.loads((directory / OFFICIAL_CONFIG).read_text()))
        return self.load().config

    @functools.cached_property
    def source_key(self) -> str | None:
        """Hash of the files that determine the loaded model (computed once); ``None`` for a hub id."""
        if self._directory is None or not self._directory.is_dir():
            return None
        digest = hashlib.sha256(f"dtype={self.dtype}".encode())
        files = sorted(
            p
            for p in self._directory.rglob("*")
            if p.is_file() and p.suffix in {".json", ".safetensors", ".pth", ".bin"}
        )
        for path in files:
            digest.update(str(path.relative_to(self._directory)).encode())
            digest.update(path.read_bytes())
        cfg = self.config
        for name, gguf in (
            (cfg.encoder_model, cfg.encoder_gguf_file),
            (cfg.decoder_model, cfg.decoder_gguf_file),
        ):
            digest.update(f"{name}|{gguf}".encode())
            base = _base_directory(name)
            for path in sorted(base.iterdir()) if base else ():
                if path.is_file():
                    stat = path.stat()
                    digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:32]

    def load(self) -> SemiDynamicCompressor:
        from .modeling import SemiDynamicCompressor

        logger.info("loading compressor %s", self.name_or_path or "(bundled default)")
        model = SemiDynamicCompressor.from_pretrained(
            self.name_or_path, device=self.device, dtype=self.dtype
        )
        return model.eval()


def _base_directory(name: str | None) -> Path | None:
    """The local directory of a base model name, or ``None`` (hub id, or not installed)."""
    if name is None:
        return None
    from .loading import resolve_source

    try:
        path = Path(resolve_source(name))
    except FileNotFoundError:
        return None
    return path if path.is_dir() else None


class Evaluator:
    """Runs settings over samples with batched generation, writing records as it goes.

    ``model`` is a loaded compressor, or a :class:`CheckpointRef` that is loaded on first need
    (never, when every answer is already recorded by the same model). Writes, under ``out_dir``:
    ``records/<setting>.jsonl`` (one :class:`EvalRecord` per answer) and ``.owner`` (who wrote
    them), and after :meth:`run` ``results.json``, ``results.md`` and ``pareto.png``.
    """

    def __init__(
        self,
        model: SemiDynamicCompressor | CheckpointRef,
        samples: Sequence[QASample],
        out_dir: str | Path,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 32,
    ) -> None:
        self._model = model
        self.samples = list(samples)
        if not self.samples:
            raise ValueError("no samples to evaluate")
        self.out_dir = Path(out_dir)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self._counts: dict[str, int] | None = None
        self._lingua: dict[str, LinguaPeer] = {}

    # ------------------------------------------------------------------ the model, lazily
    @property
    def loaded(self) -> bool:
        """Whether the compressor has been loaded (it is not, on a fully recorded rerun)."""
        return not isinstance(self._model, CheckpointRef)

    @property
    def model(self) -> SemiDynamicCompressor:
        if isinstance(self._model, CheckpointRef):
            ref, self._model = self._model, self._model.load()
            remember_fingerprint(ref.source_key, self._model.fingerprint, self._fingerprints_dir())
        return self._model

    @property
    def config(self) -> CompressorConfig:
        return self._model.config

    def _fingerprints_dir(self) -> Path:
        """Fingerprints of the checkpoints these records were computed with, by source key."""
        return self.out_dir / "records" / "fingerprints"

    def _fingerprint(self) -> str:
        """The compressor's fingerprint; from an earlier load of the same files when known."""
        if isinstance(self._model, CheckpointRef):
            known = known_fingerprint(self._model.source_key, self._fingerprints_dir())
            if known:
                return known
        return self.model.fingerprint

    @property
    def _token_counts(self) -> dict[str, int]:
        """Encoder tokens of each sample's contexts (needs the model: computed on first use)."""
        if self._counts is None:
            self._counts = {
                s.id: sum(len(ids) for ids in self.model.tokenize(s.contexts)) for s in self.samples
            }
        return self._counts

    # ------------------------------------------------------------------ answering
    def _hard(self, setting: EvalSetting, sample: QASample) -> HardCompression:
        ratio = setting.ratio
        assert ratio is not None  # validated by EvalSetting
        if setting.kind == "truncation":
            tok = self.model.decoder_tokenizer
            start = time.perf_counter()
            kept = truncate_texts(
                sample.contexts,
                ratio,
                lambda t: tok(t, add_special_tokens=False)["input_ids"],
                tok.decode,
            )
            return HardCompression(
                text="\n".join(text for text, _, _ in kept),
                original_tokens=sum(n for _, _, n in kept),
                kept_tokens=sum(k for _, k, _ in kept),
                seconds=time.perf_counter() - start,
                context_ratios=tuple(n / max(k, 1) for _, k, n in kept),
            )
        if setting.kind not in self._lingua:
            from .lingua import LinguaPeer

            self._lingua[setting.kind] = LinguaPeer(
                self.model, question_aware=setting.kind == "longllmlingua"
            )
        return self._lingua[setting.kind].compress(sample.contexts, sample.question, ratio)

    def _answer(self, setting: EvalSetting, batch: list[QASample]) -> list[EvalRecord]:
        from .modeling import LatentPrompt

        model, gen = self.model, {"max_new_tokens": self.max_new_tokens}
        template = model.config.prompt_template
        latency: list[float | None] = [None] * len(batch)
        ratios: list[list[float]] = [[] for _ in batch]
        if setting.family == "baseline":
            full = setting.kind == "full_context"
            prompts = [  # from_parts: a U+E000 in the data is text, not a latent slot
                LatentPrompt.from_parts(
                    [
                        template.format(context="\n".join(s.contexts), question=s.question)
                        if full
                        else s.question
                    ]
                )
                for s in batch
            ]
            outputs = model.complete(prompts, adapter=False, **gen)
            tokens = [self._token_counts[s.id] if full else 0 for s in batch]
            latents = [self._token_counts[s.id] if full else 1 for s in batch]
        elif setting.family == "hard":
            hard = [self._hard(setting, s) for s in batch]
            prompts = [
                LatentPrompt.from_parts([template.format(context=h.text, question=s.question)])
                for s, h in zip(batch, hard, strict=True)
            ]
            outputs = model.complete(prompts, adapter=False, **gen)
            tokens = [h.original_tokens for h in hard]
            # a peer that kept nothing is counted as one token (a record's latents are >= 1)
            latents = [max(h.kept_tokens, 1) for h in hard]
            latency = [h.seconds for h in hard]
            ratios = [list(h.context_ratios) for h in hard]
        elif setting.kind == "expand":
            prompts, latents, ratios, latency = self._expanded_prompts(setting, batch)
            outputs = model.complete(prompts, **gen)
            tokens = [self._token_counts[s.id] for s in batch]
        else:
            ratio = setting.ratio if setting.kind == "fixed_ratio" else None
            start = time.perf_counter()
            flat = model.compress([c for s in batch for c in s.contexts], setting.scale, ratio)
            share = (time.perf_counter() - start) / len(batch)  # batched: each question's share
            edges = list(itertools.accumulate([len(s.contexts) for s in batch], initial=0))
            contexts = [flat[a:b] for a, b in itertools.pairwise(edges)]
            prompts = [
                LatentPrompt(model.format_prompt(s.question, len(c)), [x.latents for x in c])
                for s, c in zip(batch, contexts, strict=True)
            ]
            outputs = model.complete(prompts, **gen)
            tokens = [self._token_counts[s.id] for s in batch]
            latents = [sum(x.num_latents for x in c) for c in contexts]
            ratios = [[r for x in c for r in x.segment_ratios] for c in contexts]
            latency = [share] * len(batch)
        return [
            EvalRecord(
                id=s.id,
                prediction=out,
                answers=s.answers,
                num_tokens=t,
                num_latents=n,
                ratios=r,
                latency_s=sec,
            )
            for s, out, t, n, r, sec in zip(
                batch, outputs, tokens, latents, ratios, latency, strict=True
            )
        ]

    def expanded_prompts(
        self, setting: EvalSetting, batch: Sequence[QASample]
    ) -> list[LatentPrompt]:
        """The decoder prompts of an ``expand`` setting (what its answers are generated from)."""
        return self._expanded_prompts(setting, batch)[0]

    def _expanded_prompts(
        self, setting: EvalSetting, batch: Sequence[QASample]
    ) -> tuple[list[LatentPrompt], list[int], list[list[float]], list[float | None]]:
        """Mixed prompts, context positions, chosen ratios and compression seconds per sample.

        The first ``k`` contexts of each sample (retrieval order: `TopScorePolicy` without scores)
        stay text; the others are compressed in one encoder call for the batch. Positions count
        the text contexts' decoder tokens plus the latents.
        """
        from .expansion import Candidate, TopScorePolicy, choose_expanded, mixed_prompt

        assert setting.k is not None  # validated by EvalSetting
        model, tok = self.model, self.model.decoder_tokenizer
        chosen = [
            choose_expanded(
                TopScorePolicy(), s.question, [Candidate(c) for c in s.contexts], setting.k
            )
            for s in batch
        ]
        todo = [
            c
            for s, ch in zip(batch, chosen, strict=True)
            for i, c in enumerate(s.contexts)
            if i not in ch
        ]
        start = time.perf_counter()
        compressed = iter(model.compress(todo, setting.scale) if todo else [])
        share = (time.perf_counter() - start) / len(batch) if todo else None
        prompts, positions, ratios = [], [], []
        for s, ch in zip(batch, chosen, strict=True):
            parts: list[Any] = []
            count, chosen_ratios = 0, []
            for i, text in enumerate(s.contexts):
                if i in ch:
                    parts.append(text)
                    count += len(tok(text, add_special_tokens=False)["input_ids"])
                else:
                    ctx = next(compressed)
                    parts.append(ctx.latents)
                    count += ctx.num_latents
                    chosen_ratios += list(ctx.segment_ratios)
            prompts.append(mixed_prompt(model, s.question, parts))
            positions.append(max(count, 1))
            ratios.append(chosen_ratios)
        return prompts, positions, ratios, [share] * len(batch)

    # ------------------------------------------------------------------ records
    def _records_path(self, setting: EvalSetting) -> Path:
        return self.out_dir / "records" / f"{setting.name}.jsonl"

    def records(self, setting: EvalSetting) -> dict[str, EvalRecord]:
        """The answers recorded for ``setting`` so far, by sample id (``records/<name>.jsonl``;
        a line cut short by an interruption is left out, so a resumed run answers it again)."""
        path = self._records_path(setting)
        if not path.exists():
            return {}
        records = {}
        for line in path.read_text().splitlines():
            try:
                record = EvalRecord.model_validate_json(line)
            except ValueError:  # a line cut short by an interruption: redo that sample
                continue
            records[record.id] = record
        return records

    def _owner(self, setting: EvalSetting) -> str:
        """Who wrote a setting's records: the base decoder for text settings (and the peer that
        shortened the text), else the compressor (its fingerprint), and the generation length.
        Resuming only ever continues the same one."""
        cfg = self.config
        base = f"base decoder {cfg.decoder_model or cfg.encoder_model}"
        if setting.family == "soft":
            who = f"compressor {self._fingerprint()}"
        elif setting.kind in _LINGUA:
            from .lingua import llmlingua_version

            who = f"{base} via llmlingua {llmlingua_version()} ({setting.kind})"
        elif setting.kind == "truncation":
            who = f"{base} via truncation"
        else:
            who = base
        return f"{who}, max_new_tokens={self.max_new_tokens}"

    def _claim(self, setting: EvalSetting) -> None:
        """Refuse to mix answers of another model into a resumed run (stale records, same name)."""
        path = self._records_path(setting)
        owner_file = path.with_suffix(".owner")
        owner = self._owner(setting)
        if path.exists() and path.stat().st_size:
            found = owner_file.read_text().strip() if owner_file.exists() else "unknown"
            if found != owner:
                raise ValueError(
                    f"{path} holds answers written by {found}, not by {owner}; "
                    "evaluate into another out_dir or delete that file"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        if not owner_file.exists() or owner_file.read_text().strip() != owner:
            owner_file.write_text(owner + "\n")

    def run_setting(self, setting: EvalSetting, progress: tqdm | None = None) -> SettingResult:
        """Answer the samples of one setting that have no record yet, then summarize them all.

        ``progress`` (an overall bar) is advanced per answered sample; without it the setting
        shows its own bar.
        """
        self._claim(setting)
        done = self.records(setting)
        todo = [s for s in self.samples if s.id not in done]
        own = progress is None
        bar = progress or tqdm(total=len(self.samples), desc=setting.name, unit="q")
        if own:
            bar.update(len(self.samples) - len(todo))
        try:
            if todo:
                path = self._records_path(setting)
                with path.open("a") as sink:
                    for start in range(0, len(todo), self.batch_size):
                        batch = todo[start : start + self.batch_size]
                        for record in self._answer(setting, batch):
                            sink.write(record.model_dump_json() + "\n")
                            done[record.id] = record
                        sink.flush()
                        bar.update(len(batch))
        finally:
            if own:
                bar.close()
        summary = summarize([done[s.id] for s in self.samples])
        return SettingResult(setting=setting, name=setting.name, summary=summary)

    def run(self, settings: Sequence[EvalSetting]) -> list[SettingResult]:
        """Evaluate every setting, then write ``results.json``, ``results.md`` and ``pareto.png``.

        One progress bar counts answers over all settings (with an ETA); recorded answers count as
        done. Raises ``ImportError`` before answering anything when an LLMLingua setting has work
        to do and the ``llmlingua`` package is missing, or when the ``plot`` extra (matplotlib,
        for ``pareto.png``) is.
        """
        from .extras import require

        require("matplotlib", "the evaluation's Pareto plot")
        unique = list({s.name: s for s in settings}.values())
        ids = {s.id for s in self.samples}
        recorded = {s.name: len(ids & self.records(s).keys()) for s in unique}
        if any(s.kind in _LINGUA and recorded[s.name] < len(ids) for s in unique):
            from .lingua import llmlingua_version

            llmlingua_version()
        total = len(self.samples) * len(unique)
        with tqdm(total=total, desc="eval", unit="q", dynamic_ncols=True) as bar:
            bar.update(sum(recorded.values()))
            results = []
            for setting in unique:
                bar.set_postfix_str(setting.name, refresh=True)
                results.append(self.run_setting(setting, progress=bar))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(
            json.dumps([r.model_dump() for r in results], indent=2)
        )
        (self.out_dir / "results.md").write_text(results_table(results))
        plot_pareto(results, self.out_dir / "pareto.png")
        return results


# --------------------------------------------------------------------------- reporting
_FAMILY_LABEL = {"baseline": "baseline", "soft": "soft (ours)", "hard": "hard (peer)"}
REACHED_TOLERANCE = 0.1
"""A peer whose ratio over all answers is off its target by more than this fraction is named
under the table (LLMLingua treats its target as a goal)."""


def results_table(results: Sequence[SettingResult]) -> str:
    """Markdown table: soft and hard compression side by side with the baselines.

    Columns: accuracy, accuracy as a fraction of full-context accuracy, the paper's average ratio
    over correct answers and over all answers, the variance of chosen ``log2`` ratios, and the
    compression wall time per question in seconds (soft: the batch's time over its questions).
    Peers that did not reach their target ratio are listed under the table.
    """
    full = next((r.summary.accuracy for r in results if r.setting.kind == "full_context"), None)
    lines = [
        "| setting | type | target | n | accuracy | of full | avg ratio (correct) "
        "| avg ratio (all) | var log2 ratio | compress s/question |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in results:
        s, setting = r.summary, r.setting
        if setting.kind == "no_context":
            ratio_c = ratio_a = "no context"
        else:
            ratio_c = f"{s.avg_ratio_correct:.2f}" if s.avg_ratio_correct else "–"
            ratio_a = f"{s.avg_ratio:.2f}"
        target = (
            f"top {setting.k} as text"
            if setting.kind == "expand"
            else f"scale {setting.scale:+g}"
            if setting.kind == "semi_dynamic"
            else f"{setting.ratio:g}×"
            if setting.ratio is not None
            else "–"
        )
        of_full = f"{s.accuracy / full:.0%}" if full else "–"
        var = f"{s.log2_ratio_variance:.3f}" if s.log2_ratio_variance is not None else "–"
        latency = f"{s.latency_s:.3f}" if s.latency_s is not None else "–"
        lines.append(
            f"| {r.name} | {_FAMILY_LABEL[setting.family]} | {target} | {s.n} | {s.accuracy:.3f} "
            f"| {of_full} | {ratio_c} | {ratio_a} | {var} | {latency} |"
        )
        if setting.family == "hard" and setting.ratio:
            off = abs(s.avg_ratio / setting.ratio - 1)
            if off > REACHED_TOLERANCE:
                notes.append(
                    f"- {r.name} reached {s.avg_ratio:.2f}× over all answers, not the "
                    f"{setting.ratio:g}× requested."
                )
    text = "\n".join(lines) + "\n"
    return text + ("\n" + "\n".join(notes) + "\n" if notes else "")


_POINT_STYLES = {  # kind: (marker, line style, label)
    "fixed_ratio": ("o", "-", "fixed ratio (soft, ours)"),
    "semi_dynamic": ("s", "-", "semi-dynamic (soft, ours)"),
    "truncation": ("v", "--", "truncation (hard)"),
    "llmlingua": ("^", "--", "LLMLingua (hard)"),
    "longllmlingua": ("D", "--", "LongLLMLingua (hard)"),
    "expand": ("P", "-.", "selective expansion (text + latents)"),
}


def pareto_points(results: Sequence[SettingResult]) -> dict[str, list[tuple[float, float, bool]]]:
    """Per compressed kind, ``(ratio, accuracy, any_correct)`` of every setting, by ratio.

    The ratio is the paper's (over correct answers); a setting with no correct answer has none,
    so it is placed at its ratio over all answers and flagged ``any_correct=False``: it is drawn
    (hollow), never dropped.
    """
    points: dict[str, list[tuple[float, float, bool]]] = {}
    for r in results:
        if r.setting.family == "baseline":
            continue
        s = r.summary
        ratio = s.avg_ratio_correct if s.avg_ratio_correct is not None else s.avg_ratio
        points.setdefault(r.setting.kind, []).append(
            (ratio, s.accuracy, s.avg_ratio_correct is not None)
        )
    return {k: sorted(v) for k, v in points.items()}


def plot_pareto(results: Sequence[SettingResult], path: str | Path) -> Path | None:
    """Accuracy vs average compression ratio (log2 axis): soft and hard compression as lines,
    baselines as horizontal lines, every setting drawn (no correct answer: a hollow marker at
    the ratio over all answers).

    Returns the written path, or ``None`` after logging a warning when no compressed setting is
    among ``results`` (nothing to draw); a chart left at ``path`` by an earlier run is then
    removed, so it cannot pass for this one.
    """
    path = Path(path)
    points = pareto_points(results)
    if not points:
        had = path.exists()
        path.unlink(missing_ok=True)
        logger.warning(
            "no Pareto plot: nothing to draw, since no compressed setting was evaluated "
            "(settings: %s)%s",
            ", ".join(r.name for r in results) or "none",
            f"; removed the stale {path}" if had else "",
        )
        return None
    from .extras import require

    matplotlib = require("matplotlib", "the evaluation's Pareto plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "the evaluation's Pareto plot")

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=150)
    any_hollow = False
    for kind, pts in points.items():
        marker, line, label = _POINT_STYLES[kind]
        xs, ys, _ = zip(*pts, strict=True)
        (drawn,) = ax.plot(xs, ys, ls=line, marker=marker, label=label)
        for x, y, ok in pts:
            if not ok:  # hollow: white face over the filled marker
                any_hollow = True
                ax.plot(x, y, marker=marker, color=drawn.get_color(), mfc="white", ls="none")
    baselines = {
        "full_context": ("k", "--", "full context"),
        "no_context": ("r", ":", "no context"),
    }
    for kind, (color, style, label) in baselines.items():
        for r in results:
            if r.setting.kind == kind:
                ax.axhline(r.summary.accuracy, color=color, ls=style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("average compression ratio (correct answers)")
    ax.set_ylabel("substring accuracy")
    if any_hollow:
        ax.set_title("hollow: no correct answer (placed at the ratio over all answers)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "PAPER_SCALES",
    "PRESETS",
    "QUICK_SCALES",
    "CheckpointRef",
    "EvalSetting",
    "Evaluator",
    "SettingResult",
    "default_settings",
    "parse_setting",
    "peer_settings",
    "plot_pareto",
    "quick_settings",
    "results_table",
    "select_settings",
]
