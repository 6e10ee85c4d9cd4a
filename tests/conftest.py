"""Tiny random-weight Qwen3 models and a locally trained tokenizer: real models, no hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from semidyn_rag.config import CompressorConfig
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.testing import (
    CORPUS,
    compressor_dir,
    count_encodes,
    load_compressor,
    one_torch_thread,
    randomize_lora,
)
from semidyn_rag.tiny import build_qwen3, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# shared fixtures (semidyn_rag.testing); one_torch_thread is autouse
__all__ = ["compressor_dir", "count_encodes", "load_compressor", "one_torch_thread"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    return build_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), tokenizer)


@pytest.fixture(scope="session")
def tiny_dir_wide(tmp_path_factory, tokenizer) -> Path:
    """A second base of another width, for encoder/decoder pairs on different models."""
    return build_qwen3(
        tmp_path_factory.mktemp("tiny_qwen3_wide"), tokenizer, hidden_size=96, seed=1
    )


@pytest.fixture
def make_compressor(tiny_dir):
    def make(**fields) -> SemiDynamicCompressor:
        torch.manual_seed(0)
        config = CompressorConfig(encoder_model=str(tiny_dir), converter_hidden=48, **fields)
        return randomize_lora(SemiDynamicCompressor.from_config(config)).eval()

    return make


@pytest.fixture
def compressor(make_compressor) -> SemiDynamicCompressor:
    return make_compressor()
