"""Evaluation harness: the paper's settings on one decoder, resumable, with a Pareto plot.

Settings: no context and full uncompressed context (both on the untouched base decoder, the honest
baselines of the same base), each fixed ratio, and the semi-dynamic model across a ``scale`` sweep.
Every answered sample is appended to ``records/<setting>.jsonl`` as soon as its batch is done, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from tqdm.auto import tqdm

from .data import QASample
from .metrics import EvalRecord, EvalSummary, summarize
from .modeling import LatentPrompt, SemiDynamicCompressor

logger = logging.getLogger(__name__)

SettingKind = Literal["no_context", "full_context", "fixed_ratio", "semi_dynamic"]
PAPER_SCALES = tuple(x / 2 for x in range(-4, 9))  # -2 ... 4 in steps of 0.5


class EvalSetting(BaseModel):
    """One point (or baseline line) of the accuracy-vs-ratio plot."""

    kind: SettingKind
    ratio: float | None = None
    scale: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "fixed_ratio":
            return f"fixed_ratio_{self.ratio:g}"
        if self.kind == "semi_dynamic":
            return f"semi_dynamic_scale_{self.scale:+g}"
        return self.kind


def default_settings(
    model: SemiDynamicCompressor, scales: Sequence[float] = PAPER_SCALES
) -> list[EvalSetting]:
    """Both baselines, every trained ratio, and (for a semi-dynamic model) the scale sweep."""
    settings = [EvalSetting(kind="no_context"), EvalSetting(kind="full_context")]
    settings += [EvalSetting(kind="fixed_ratio", ratio=r) for r in model.config.ratios]
    if model.config.mode == "semi_dynamic":
        settings += [EvalSetting(kind="semi_dynamic", scale=s) for s in scales]
    return settings


class SettingResult(BaseModel):
    setting: EvalSetting
    name: str
    summary: EvalSummary


class Evaluator:
    """Runs settings over samples with batched generation, writing records as it goes."""

    def __init__(
        self,
        model: SemiDynamicCompressor,
        samples: Sequence[QASample],
        out_dir: str | Path,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 32,
    ) -> None:
        self.model = model
        self.samples = list(samples)
        self.out_dir = Path(out_dir)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self._token_counts = {
            s.id: sum(len(ids) for ids in model.tokenize(s.contexts)) for s in self.samples
        }

    def _records_path(self, setting: EvalSetting) -> Path:
        return self.out_dir / "records" / f"{setting.name}.jsonl"

    def _load(self, setting: EvalSetting) -> dict[str, EvalRecord]:
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

    def _answer(self, setting: EvalSetting, batch: list[QASample]) -> list[EvalRecord]:
        model, gen = self.model, {"max_new_tokens": self.max_new_tokens}
        if setting.kind in ("no_context", "full_context"):
            prompts = [
                LatentPrompt(
                    model.config.prompt_template.format(
                        context="\n".join(s.contexts), question=s.question
                    )
                    if setting.kind == "full_context"
                    else s.question
                )
                for s in batch
            ]
            outputs = model.complete(prompts, adapter=False, **gen)
            latents = [
                self._token_counts[s.id] if setting.kind == "full_context" else 1 for s in batch
            ]
            ratios: list[list[float]] = [[] for _ in batch]
        else:
            ratio = setting.ratio if setting.kind == "fixed_ratio" else None
            flat = model.compress([c for s in batch for c in s.contexts], setting.scale, ratio)
            bounds = itertools.accumulate([len(s.contexts) for s in batch], initial=0)
            edges = list(bounds)
            contexts = [flat[a:b] for a, b in itertools.pairwise(edges)]
            prompts = [
                LatentPrompt(model.format_prompt(s.question, len(c)), [x.latents for x in c])
                for s, c in zip(batch, contexts, strict=True)
            ]
            outputs = model.complete(prompts, **gen)
            latents = [sum(x.num_latents for x in c) for c in contexts]
            ratios = [[r for x in c for r in x.segment_ratios] for c in contexts]
        return [
            EvalRecord(
                id=s.id,
                prediction=out,
                answers=s.answers,
                num_tokens=self._token_counts[s.id] if setting.kind != "no_context" else 0,
                num_latents=n,
                ratios=r,
            )
            for s, out, n, r in zip(batch, outputs, latents, ratios, strict=True)
        ]

    def _owner(self, setting: EvalSetting) -> str:
        """Who wrote a setting's records: the base decoder for text settings, else the compressor
        (its fingerprint), and the generation length. Resuming only ever continues the same one."""
        cfg = self.model.config
        who = (
            f"base decoder {cfg.decoder_model or cfg.encoder_model}"
            if setting.kind in ("no_context", "full_context")
            else f"compressor {self.model.fingerprint}"
        )
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
        owner_file.write_text(owner + "\n")

    def run_setting(self, setting: EvalSetting) -> SettingResult:
        self._claim(setting)
        done = self._load(setting)
        todo = [s for s in self.samples if s.id not in done]
        path = self._records_path(setting)
        with path.open("a") as sink, tqdm(total=len(self.samples), desc=setting.name) as bar:
            bar.update(len(self.samples) - len(todo))
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start : start + self.batch_size]
                for record in self._answer(setting, batch):
                    sink.write(record.model_dump_json() + "\n")
                    done[record.id] = record
                sink.flush()
                bar.update(len(batch))
        summary = summarize([done[s.id] for s in self.samples])
        return SettingResult(setting=setting, name=setting.name, summary=summary)

    def run(self, settings: Sequence[EvalSetting]) -> list[SettingResult]:
        """Evaluate every setting, then write ``results.json``, ``results.md`` and ``pareto.png``."""
        results = [self.run_setting(s) for s in settings]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(
            json.dumps([r.model_dump() for r in results], indent=2)
        )
        (self.out_dir / "results.md").write_text(results_table(results))
        plot_pareto(results, self.out_dir / "pareto.png")
        return results


def results_table(results: Sequence[SettingResult]) -> str:
    """Markdown table: accuracy and the paper's average ratio (over correct answers) per setting."""
    lines = [
        "| setting | n | accuracy | avg ratio (correct) | avg ratio (all) | var log2 ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r.summary
        if r.setting.kind == "no_context":
            ratio_c = ratio_a = "no context"
        else:
            ratio_c = f"{s.avg_ratio_correct:.2f}" if s.avg_ratio_correct else "–"
            ratio_a = f"{s.avg_ratio:.2f}"
        var = f"{s.log2_ratio_variance:.3f}" if s.log2_ratio_variance is not None else "–"
        lines.append(f"| {r.name} | {s.n} | {s.accuracy:.3f} | {ratio_c} | {ratio_a} | {var} |")
    return "\n".join(lines) + "\n"


def plot_pareto(results: Sequence[SettingResult], path: str | Path) -> None:
    """Accuracy vs average compression ratio (log2 axis), baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=150)
    styles = {"fixed_ratio": ("o-", "fixed ratio"), "semi_dynamic": ("s-", "semi-dynamic")}
    for kind, (marker, label) in styles.items():
        points = sorted(
            (r.summary.avg_ratio_correct, r.summary.accuracy)
            for r in results
            if r.setting.kind == kind and r.summary.avg_ratio_correct
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker, label=label)
    baselines = {"full_context": ("k--", "full context"), "no_context": ("r:", "no context")}
    for kind, (style, label) in baselines.items():
        for r in results:
            if r.setting.kind == kind:
                ax.axhline(r.summary.accuracy, color=style[0], ls=style[1:], label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("average compression ratio (correct answers)")
    ax.set_ylabel("substring accuracy")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
