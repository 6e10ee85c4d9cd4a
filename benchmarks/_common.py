"""What the benchmarks share: arguments, the model under test, real SQuAD text, memory, reports."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _timing import load_note, passive_openmp

from semidyn_rag.checkpoint import DEFAULT_CHECKPOINT
from semidyn_rag.config import CompressorConfig
from semidyn_rag.data import QASample, load_squad, squad_article_split
from semidyn_rag.loading import SMOLLM2, SMOLLM2_GGUF
from semidyn_rag.modeling import SemiDynamicCompressor

logger = logging.getLogger("benchmarks")

ROOT = Path(__file__).resolve().parent
SQUAD = ROOT.parents[1] / "shared" / "data" / "squad" / "dev-v2.0-part.json"


EVAL_ARTICLES, SEED = 4, 0  # as recipes/default.py holds them out


def recipe_split(path: Path = SQUAD) -> tuple[list[QASample], list[QASample]]:
    """SQuAD ``(training, held-out)`` questions, split by article as ``recipes/default.py``
    splits them, so a benchmark asks the questions ``eval`` asks."""
    return squad_article_split(path, n_eval_articles=EVAL_ARTICLES, seed=SEED)


def portable(value: object) -> str:
    """``value`` as the results files show it: an absolute path becomes relative to the
    repository (``../shared/...`` for the workspace's data beside it; only its name when it lies
    elsewhere), so committed results name no machine's directories."""
    text = str(value)
    if not isinstance(value, (Path, str)) or not os.path.isabs(text):
        return text
    path, repo = Path(text).resolve(), ROOT.parent
    if path.is_relative_to(repo.parent):
        return os.path.relpath(path, repo)
    return path.name


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--reps", type=int, default=3, help="timed rounds (after one warm-up round)")
    p.add_argument(
        "--large", action="store_true", help="GPU-sized settings (use with --device cuda)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a trained compressor directory; default: semidyn_rag/default/ if present, "
        "else an untrained compressor on SmolLM2-135M-Instruct (same cost)",
    )
    p.add_argument("--squad", type=Path, default=SQUAD)
    p.add_argument("--out", type=Path, default=ROOT / "results", help="results directory")
    return p


def setup(args: argparse.Namespace) -> torch.dtype:
    passive_openmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "semidyn_rag.loading"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def load_model(
    args: argparse.Namespace, dtype: torch.dtype
) -> tuple[SemiDynamicCompressor, str, bool]:
    """The compressor under test, a one-line description of it, and whether it is trained."""
    start = time.perf_counter()
    trained = bool(args.checkpoint) or (DEFAULT_CHECKPOINT / "semidyn_config.json").exists()
    if trained:
        model = SemiDynamicCompressor.from_pretrained(
            args.checkpoint, device=args.device, dtype=dtype
        )
        what = f"trained checkpoint {portable(args.checkpoint or DEFAULT_CHECKPOINT)}"
    else:
        config = CompressorConfig(encoder_model=SMOLLM2, encoder_gguf_file=SMOLLM2_GGUF)
        model = SemiDynamicCompressor.from_config(config, device=args.device, dtype=dtype)
        what = "untrained compressor (fresh LoRA, head, converter) on SmolLM2-135M-Instruct"
    model.eval()
    logger.info("loaded %s in %.1f s", what, time.perf_counter() - start)
    return model, f"{what}, {str(dtype).removeprefix('torch.')} on {args.device}", trained


@dataclass
class Passage:
    text: str
    question: str


def squad_passages(path: Path) -> list[Passage]:
    """Distinct SQuAD paragraphs in file order, each with its first answerable question."""
    seen: dict[str, Passage] = {}
    for sample in load_squad(path):
        seen.setdefault(sample.contexts[0], Passage(sample.contexts[0], sample.question))
    return list(seen.values())


def take_tokens(
    model: SemiDynamicCompressor, passages: Sequence[Passage], total: int, start: int = 0
) -> list[list[int]]:
    """Token ids of consecutive paragraphs from ``start``, the last one cut to sum to ``total``."""
    chunks, have = [], 0
    for ids in model.tokenize([p.text for p in passages[start:]]):
        chunks.append(ids[: total - have])
        have += len(chunks[-1])
        if have == total:
            return chunks
    raise ValueError(f"the SQuAD file holds fewer than {total} tokens from paragraph {start}")


def peak_bytes(fn: Callable[[], object], device: str) -> tuple[int, object]:
    """Peak bytes torch allocates during ``fn()`` above what was allocated before, and its result.

    CUDA: ``max_memory_allocated``. CPU: the sizes of the allocation and free events the profiler
    records with ``profile_memory``: every allocation and free
    made while profiling, in time order (the allocator's own running total is not used: it keeps
    tensors freed after an earlier profiling session). The running sum's maximum is the peak of
    tensors created by ``fn`` (KV cache, activations, logits); model weights are not included.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    peak = live = 0
    for _, size in sorted(events):  # size < 0 for a free
        live += size
        peak = max(peak, live)
    return peak, out


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """Markdown tables with notes; written to ``<out>/<name>.md`` and ``.json`` and printed."""

    name: str
    title: str
    args: argparse.Namespace
    model: str = ""
    sections: list[tuple[str, str]] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)
    load_start: str = field(default_factory=load_note)

    def table(
        self, heading: str, headers: Sequence[str], rows: Sequence[Sequence[object]], note: str = ""
    ) -> None:
        self.sections.append((heading, md_table(headers, rows) + (f"\n\n{note}" if note else "")))
        self.data.setdefault("tables", {})[heading] = {"headers": list(headers), "rows": rows}

    def write(self) -> str:
        settings = {k: portable(v) for k, v in vars(self.args).items()}
        head = [
            f"# {self.title}",
            "",
            f"- model: {self.model}",
            f"- torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads",
            f"- load at start: {self.load_start}; at end: {load_note()}",
            f"- settings: `{' '.join(f'--{k}={v}' for k, v in settings.items())}`",
            f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
            "- ratios are medians over rounds of paired, interleaved measurements (same run)",
        ]
        text = "\n".join(head) + "\n\n" + "\n\n".join(f"## {h}\n\n{b}" for h, b in self.sections)
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / f"{self.name}.md").write_text(text + "\n")
        payload = {
            "title": self.title,
            "model": self.model,
            "settings": settings,
            "load_start": self.load_start,
            "load_end": load_note(),
            **self.data,
        }
        (self.args.out / f"{self.name}.json").write_text(json.dumps(payload, indent=1, default=str))
        print(text)
        return text
