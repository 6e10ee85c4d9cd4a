"""The ``semidyn`` console command.

Each subcommand is one registrar function in `SUBCOMMANDS` that adds its parser and sets
``func``; adding a command (``eval``, ``precompress``, ``store info``...) is one more function
decorated with ``@subcommand("name")``. Config models are exposed field by field: every field of
`CompressorConfig` / `TrainConfig` / `SynthConfig` is a ``--field-name VALUE`` flag (VALUE is read as
JSON when it parses, else as a string: ``--ratios '[2,4,8]'``, ``--train-base true``), and
``--config FILE.json`` supplies the same fields in sections ``compressor``, ``train``, ``synth``
(flags win).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

logger = logging.getLogger("semidyn_rag.cli")

Registrar = Callable[[Any], None]
"""Receives the ``add_subparsers()`` action and adds one subcommand to it."""
SUBCOMMANDS: dict[str, Registrar] = {}


def subcommand(name: str) -> Callable[[Registrar], Registrar]:
    def register(func: Registrar) -> Registrar:
        SUBCOMMANDS[name] = func
        return func

    return register


# --- config models as flags ----------------------------------------------------------------


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_model_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], section: str, skip: tuple = ()
) -> None:
    """One ``--field-name`` flag per field of ``model``; values land in ``args.<section>__<field>``."""
    group = parser.add_argument_group(f"{model.__name__} fields")
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        default = (
            "required"
            if info.is_required()
            else f"default {info.get_default(call_default_factory=True)!r}"
        )
        about = f"{info.description} ({default})" if info.description else default
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"{section}__{name}",
            type=_value,
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=about.replace("%", "%%"),
        )


def model_fields_from(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The section of ``--config`` overlaid with the flags given for it."""
    fields = dict(getattr(args, "config_file", {}).get(section, {}))
    prefix = f"{section}__"
    fields.update({k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)})
    return fields


def _config_file(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a JSON object with sections")
    return data


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="config_file",
        type=_config_file,
        default={},
        metavar="FILE.json",
        help="JSON with sections compressor/train/synth/data; flags override it",
    )


# --- data for training ---------------------------------------------------------------------


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training data (any mix, each flag repeatable)")
    group.add_argument("--samples", action="append", default=[], help="our TrainSample JSON lines")
    group.add_argument("--squad", action="append", default=[], help="official SQuAD JSON")
    group.add_argument("--hotpotqa", action="append", default=[], help="HotpotQA JSON lines")
    group.add_argument(
        "--qa", action="append", default=[], help="any file semidyn_rag.data.load_samples reads"
    )
    group.add_argument("--limit", type=int, default=None, help="at most N samples per file")
    group.add_argument(
        "--reconstruction-words",
        type=int,
        default=0,
        help="also train rewriting every distinct context from its latents, in pieces of N "
        "words (0: off); teaches the decoder to read latents with fewer samples",
    )


def load_training_data(args: argparse.Namespace) -> list:
    """All `TrainSample`s named by the data flags (and the config file's ``data`` section)."""
    from . import data
    from .training import read_jsonl, reconstruction_samples
    from .training.samples import from_qa_samples

    section = args.config_file.get("data", {})
    sources = {
        kind: [*section.get(kind, []), *getattr(args, kind)]
        for kind in ("samples", "squad", "hotpotqa", "qa")
    }
    limit = args.limit if args.limit is not None else section.get("limit")
    out = []
    for kind, paths in sources.items():
        for path in paths:
            if kind == "samples":
                loaded = read_jsonl(path)
                loaded = loaded[:limit] if limit else loaded
            else:
                reader = {
                    "squad": data.load_squad,
                    "hotpotqa": data.load_hotpotqa,
                    "qa": data.load_samples,
                }[kind]
                qa = reader(path)
                loaded = from_qa_samples(data.sample(qa, limit) if limit else qa)
            logger.info("%s: %d training samples", path, len(loaded))
            out.extend(loaded)
    if not out:
        raise SystemExit("no training data: give --samples, --squad, --hotpotqa or --qa")
    words = args.reconstruction_words or section.get("reconstruction_words", 0)
    if words:
        extra = reconstruction_samples([c for s in out for c in s.contexts], words)
        logger.info("%d reconstruction samples of %d words", len(extra), words)
        out.extend(extra)
    return out


# --- train -------------------------------------------------------------------------------------


@subcommand("train")
def _register_train(sub: Any) -> None:
    from .config import CompressorConfig
    from .training import TrainConfig

    parser = sub.add_parser(
        "train",
        help="single-stage SFT of a compressor (Eq. 7)",
        description="Train a compressor: a new one from CompressorConfig fields, or continue "
        "from --init. Checkpoints go to --output-dir/checkpoint-N.",
    )
    _add_common(parser)
    parser.add_argument("--init", help="start from this saved compressor instead of a new one")
    _add_data_flags(parser)
    add_model_flags(parser, CompressorConfig, "compressor")
    add_model_flags(parser, TrainConfig, "train")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .config import CompressorConfig
    from .modeling import SemiDynamicCompressor
    from .training import TrainConfig, Trainer

    train_config = TrainConfig.model_validate(model_fields_from(args, "train"))
    fields = model_fields_from(args, "compressor")
    if args.init:
        model = SemiDynamicCompressor.from_pretrained(args.init, **fields)
    else:
        model = SemiDynamicCompressor.from_config(CompressorConfig.model_validate(fields))
    samples = load_training_data(args)
    history = Trainer(model, samples, train_config).train()
    if not train_config.output_dir:
        logger.warning("no --output-dir: the trained model was not saved")
    last = history[-1] if history else None
    sys.stdout.write(json.dumps({"steps": len(history), "last": last and last.model_dump()}) + "\n")
    return 0


@subcommand("train-regressor")
def _register_train_regressor(sub: Any) -> None:
    from .training import RatioRegressorConfig, TrainConfig

    parser = sub.add_parser(
        "train-regressor",
        help="two-stage variant: train a standalone ratio predictor on density labels",
    )
    _add_common(parser)
    _add_data_flags(parser)
    add_model_flags(parser, RatioRegressorConfig, "regressor")
    add_model_flags(
        parser, TrainConfig, "train", skip=("ratio_sampling", "train_ratios", "train_base")
    )
    parser.set_defaults(func=run_train_regressor)


def run_train_regressor(args: argparse.Namespace) -> int:
    from .training import RatioRegressor, RatioRegressorConfig, TrainConfig, Trainer

    fields = {**model_fields_from(args, "train"), "ratio_sampling": "mode"}
    train_config = TrainConfig.model_validate(fields)
    regressor = RatioRegressor.from_config(
        RatioRegressorConfig.model_validate(model_fields_from(args, "regressor"))
    )
    samples = [s for s in load_training_data(args) if s.y and any(v is not None for v in s.y)]
    if not samples:
        raise SystemExit("no sample carries a density label y")
    Trainer(regressor, samples, train_config).train()
    if train_config.output_dir:
        logger.info("checkpoints (RatioRegressor.from_pretrained) in %s", train_config.output_dir)
    return 0


# --- synth -------------------------------------------------------------------------------------


@subcommand("synth")
def _register_synth(sub: Any) -> None:
    from .training.synth import SynthConfig

    parser = sub.add_parser(
        "synth",
        help="teacher-LLM data synthesis: QA, summaries, multi-doc QA and density labels",
        description="Resumable: seeds already done (see OUT.seeds.jsonl) are skipped.",
    )
    _add_common(parser)
    parser.add_argument(
        "--seeds", action="append", required=True, help=".txt/.jsonl/.parquet seed texts"
    )
    parser.add_argument("--out", required=True, help="output TrainSample JSON lines (appended)")
    teacher = parser.add_argument_group("teacher (one of)")
    teacher.add_argument("--openai-url", help="OpenAI-compatible base URL, e.g. http://h:8000/v1")
    teacher.add_argument("--teacher-model", help="model name for --openai-url")
    teacher.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key"
    )
    teacher.add_argument("--hf-teacher", help="local/hub causal LM path for an in-process teacher")
    teacher.add_argument("--gguf-file", help="GGUF file inside --hf-teacher")
    parser.add_argument(
        "--tokenizer", help="tokenizer whose token counts give y (default: whitespace words)"
    )
    add_model_flags(parser, SynthConfig, "synth")
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from .training.synth import HFTeacher, OpenAITeacher, SynthConfig, Synthesizer, load_seeds

    if bool(args.openai_url) == bool(args.hf_teacher):
        raise SystemExit(
            "give exactly one teacher: --openai-url (+ --teacher-model) or --hf-teacher"
        )
    if args.openai_url:
        if not args.teacher_model:
            raise SystemExit("--openai-url needs --teacher-model")
        teacher = OpenAITeacher(
            args.openai_url, args.teacher_model, api_key=os.environ.get(args.api_key_env)
        )
    else:
        teacher = HFTeacher(args.hf_teacher, gguf_file=args.gguf_file)
    count = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

    seeds = [seed for path in args.seeds for seed in load_seeds(path)]
    config = SynthConfig.model_validate(model_fields_from(args, "synth"))
    stats = Synthesizer(teacher, args.out, config, count).run(seeds)
    sys.stdout.write(stats.model_dump_json(indent=2) + "\n")
    return 0


# --- eval --------------------------------------------------------------------------------------


@subcommand("eval")
def _register_eval(sub: Any) -> None:
    parser = sub.add_parser(
        "eval",
        help="accuracy vs compression: baselines, ours (soft) and text peers (hard), Pareto plot",
        description="Substring accuracy, the average compression ratio over correct answers and "
        "compression time per question for: no context and full context (base decoder), our "
        "fixed ratios and semi-dynamic scales, and text-compression peers read by the base "
        "decoder (truncation to ceil(n/r) tokens; LLMLingua/LongLLMLingua with the extra "
        "'semidyn-rag[llmlingua]'). Writes OUT/results.{md,json}, OUT/pareto.png and "
        "per-sample records; an interrupted run resumes where it stopped, and a run whose "
        "answers are all recorded loads no model.",
    )
    parser.add_argument("data", help="SQuAD .json, HotpotQA .jsonl, or the paper's .parquet")
    parser.add_argument("--compressor", default=None, help="checkpoint (default: bundled)")
    parser.add_argument("--out", required=True, help="results directory")
    parser.add_argument("--limit", type=int, default=None, help="evaluate N sampled rows")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["quick"],
        metavar="NAME",
        help="presets, names or patterns (default: quick). Presets: quick (baselines, trained "
        "ratios up to 8, scales 0 1 2, truncation at those ratios), paper (every trained ratio, "
        "scales -2 ... 4 by 0.5, every peer at every ratio), peers. Names: no_context, "
        "full_context, fixed_ratio_4, semi_dynamic_scale_+1, truncation_4, llmlingua_4, "
        "longllmlingua_4; patterns: 'truncation_*', '*_8'",
    )
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        help="semi-dynamic scales of the presets (quick: 0 1 2; paper: -2 ... 4 by 0.5)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from . import data
    from .evaluation import CheckpointRef, Evaluator, select_settings

    samples = data.load_samples(args.data)
    if args.limit is not None:
        samples = data.sample(samples, args.limit, args.seed)
    model = CheckpointRef(args.compressor, device=args.device)  # loaded only if an answer is due
    try:
        settings = select_settings(model, args.settings, args.scales)
    except ValueError as exc:
        raise SystemExit(f"semidyn eval: {exc}") from None
    evaluator = Evaluator(
        model,
        samples,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    evaluator.run(settings)
    sys.stdout.write((Path(args.out) / "results.md").read_text())
    if not (Path(args.out) / "pareto.png").exists():
        sys.stdout.write("no Pareto plot: no compressed setting among the selected settings\n")
    return 0


# --- precompress and store -----------------------------------------------------------------------


@subcommand("precompress")
def _register_precompress(sub: Any) -> None:
    from .distributed import RayConfig
    from .precompress import PrecompressConfig

    parser = sub.add_parser(
        "precompress",
        help="compress a corpus into a latent store (resumable; --ray for a cluster)",
        description="Chunk a corpus (directories of .txt/.md, .jsonl, .parquet) with the "
        "compressor's tokenizer and store every chunk's latents. A rerun compresses only the "
        "chunks the store lacks; repeated texts are compressed once.",
    )
    _add_common(parser)
    parser.add_argument("corpus", nargs="+", help="directory, .txt/.md, .jsonl or .parquet")
    parser.add_argument("--store", required=True, help="latent store directory")
    parser.add_argument("--compressor", help="checkpoint directory or hub id (default: bundled)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (local run)")
    parser.add_argument(
        "--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"]
    )
    parser.add_argument(
        "--embed",
        metavar="MODULE:NAME",
        help="a function list[str] -> vectors to fill the store's vector index in the same run",
    )
    parser.add_argument("--chunks-out", help="write chunks with their keys as JSON lines here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--ray", action="store_true", help="compress on Ray actors")
    add_model_flags(parser, PrecompressConfig, "precompress", skip=("progress",))
    add_model_flags(parser, RayConfig, "ray")
    parser.set_defaults(func=run_precompress)


def _import_object(spec: str) -> Any:
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"--embed wants MODULE:NAME, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"--embed {spec}: {exc}") from exc
    if not callable(obj):
        raise SystemExit(f"--embed {spec} is not callable")
    return obj


def run_precompress(args: argparse.Namespace) -> int:
    from .distributed import RayConfig, precompress_ray
    from .modeling import SemiDynamicCompressor
    from .precompress import PrecompressConfig, load_chunks, precompress, save_chunks
    from .store import entry_key

    fields = {**model_fields_from(args, "precompress"), "progress": not args.no_progress}
    config = PrecompressConfig.model_validate(fields)
    embed = _import_object(args.embed) if args.embed else None
    device = "cpu" if args.ray else args.device
    model = SemiDynamicCompressor.from_pretrained(args.compressor, device=device).eval()
    chunks = load_chunks(args.corpus, config, model.tokenizer)
    if args.ray:
        ray_config = RayConfig.model_validate(model_fields_from(args, "ray"))
        report = precompress_ray(
            args.compressor,
            chunks,
            args.store,
            config,
            ray_config,
            model=model,
            embed=embed,
            store_dtype=args.store_dtype,
        )
    else:
        report = precompress(
            model, chunks, args.store, config, embed=embed, store_dtype=args.store_dtype
        )
    if args.chunks_out:
        keys = [entry_key(c.text, model.fingerprint, config.policy) for c in chunks]
        save_chunks(chunks, keys, args.chunks_out)
    if args.json:
        sys.stdout.write(json.dumps(report.summary(), indent=2) + "\n")
    else:
        sys.stdout.write(report.markdown() + "\n")
    return 0


@subcommand("store")
def _register_store(sub: Any) -> None:
    parser = sub.add_parser("store", help="inspect a latent store")
    actions = parser.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="entries, tokens, latents, bytes, policies, files")
    info.add_argument("path", help="latent store directory")
    info.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")
    info.set_defaults(func=run_store_info)
    check = actions.add_parser("check", help="SQLite integrity check and decode every entry")
    check.add_argument("path", help="latent store directory")
    check.set_defaults(func=run_store_check)


def run_store_info(args: argparse.Namespace) -> int:
    from .store import LatentStore

    with LatentStore(args.path, readonly=True) as store:
        info = store.info()
    if args.json:
        payload = {
            **info.model_dump(),
            "compression": info.compression,
            "bytes_per_token": info.bytes_per_token,
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write(info.markdown() + "\n")
    return 0


def run_store_check(args: argparse.Namespace) -> int:
    from .store import LatentStore, StoreCorruptError

    with LatentStore(args.path, readonly=True) as store:
        try:
            count = store.verify()
        except StoreCorruptError as exc:
            sys.stdout.write(f"corrupt: {exc}\n")
            return 1
    sys.stdout.write(f"ok: {count:,} entries\n")
    return 0


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semidyn", description="Semi-dynamic soft context compression for RAG."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: info (default), -vv: debug"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS.values():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
