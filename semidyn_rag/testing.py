"""Helpers and pytest fixtures for tests of semidyn-rag and its integrations: real tiny models,
no mocks, no hub. Needs pytest (the ``dev`` extra).

The integrations' test suites live in separate directories (each with its own ``conftest.py``),
so what they share has to be importable: a tiny random-weight compressor that really runs, a
counter around the real encoder (to prove that a store hit skipped it), and a deterministic
bag-of-words embedding under which documents sharing words with a query really are nearer.

The fixtures at the end are shared by importing them into a ``conftest.py``
(``from semidyn_rag.testing import compressor_dir, store``): a conftest below the rootdir may
not declare ``pytest_plugins``, and importing keeps each suite explicit about what it uses.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from . import service as service_module
from .config import CompressorConfig
from .decoder import LatentDecoder
from .modeling import SemiDynamicCompressor
from .service import LatentService
from .store import LatentStore
from .tiny import build_qwen3, build_tokenizer
from .training.samples import TrainSample

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Question: what is the answer? Context: the answer is forty two.",
    "Soft context compression turns long passages into a few latent vectors.",
    "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister.",
] * 20
"""The core tests' tokenizer corpus (``tests/``)."""

PASSAGES = [
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Alice was born in 1990 in Lyon; Bob moved to Oslo in 2004 with his sister.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Soft context compression turns long passages into a few latent vectors.",
    "The Rhine flows from the Alps through Germany to the North Sea at Rotterdam.",
]
"""Five retrievable documents: the integrations' corpus (their tokenizer is trained on it)."""

QA_SAMPLES = [
    TrainSample(contexts=["Paris is the capital of France."], question="Capital?", answer="Paris"),
    TrainSample(
        contexts=["Alice was born in 1990 in Lyon.", "Bob moved to Oslo in 2004."],
        question="Where was Alice born?",
        answer="Lyon",
    ),
]
"""Two training samples, one and two contexts: the distillation tests' data."""


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """LoRA B starts at zero (adapters are no-ops); give them weights so they matter in tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def talkative(model: SemiDynamicCompressor) -> SemiDynamicCompressor:
    """``model`` with a random decoder that never picks a token without text (special tokens,
    whitespace), so that its greedy answers are not empty; returns ``model``."""
    tok = model.decoder_tokenizer
    blank = [i for i in range(len(tok)) if not tok.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():
        model.decoder.get_output_embeddings().weight[blank] = 0.0
    return model


def tiny_compressor(
    directory: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 400,
    seed: int = 0,
    **config_fields: object,
) -> SemiDynamicCompressor:
    """A random-weight tiny Qwen3 compressor whose tokenizer was trained on ``texts``.

    The base model is written to ``directory / "base"`` (the compressor refers to it by path).
    Its LoRA adapters are randomized so that encoder and decoder really differ from the base.
    """
    base = build_qwen3(
        Path(directory) / "base", build_tokenizer(texts, vocab_size=vocab_size), seed=seed
    )
    torch.manual_seed(seed)
    fields: dict[str, object] = {"converter_hidden": 48, **config_fields}
    config = CompressorConfig(encoder_model=str(base), **fields)  # type: ignore[arg-type]
    model = SemiDynamicCompressor.from_config(config)
    randomize_lora(model, seed)
    return model.eval()


def save_tiny_compressor(directory: str | Path, texts: Iterable[str], **kwargs: object) -> Path:
    """:func:`tiny_compressor` saved as a checkpoint in ``directory / "compressor"``."""
    out = Path(directory) / "compressor"
    tiny_compressor(directory, texts, **kwargs).save_pretrained(out)  # type: ignore[arg-type]
    return out


def save_paper_layout(
    directory: str | Path,
    base_dir: str | Path,
    *,
    gated: bool = False,
    base_path_in_config: str | None = None,
) -> Path:
    """Write a random checkpoint in the paper's release layout around the base in ``base_dir``.

    ``config.json`` + ``projector.pth`` (``{"projector", "compress_ratio_head"}``) + ``encoder/``
    and ``decoder/`` LoRA adapters on one shared base, five ratios 2-32. ``base_path_in_config``
    is what ``config.json`` names as both bases (default ``base_dir``); naming a path that does not
    exist mimics a downloaded release whose base paths point at the authors' machine. ``gated``
    adds the converter's optional gate projection.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(directory)
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = {"r": 4, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    peft = get_peft_model(base, LoraConfig(lora_alpha=16, **lora), adapter_name="encoder")
    peft.add_adapter("decoder", LoraConfig(lora_alpha=8, **lora))
    randomize_lora(peft)
    peft.save_pretrained(out, selected_adapters=["encoder", "decoder"])
    d, hidden = base.config.hidden_size, 40
    projector = {
        "rms_norm.weight": torch.rand(d) + 0.5,
        "up_proj.weight": torch.randn(hidden, d) * 0.1,
        "down_proj.weight": torch.randn(d, hidden) * 0.1,
    }
    if gated:
        projector["gate_proj.weight"] = torch.randn(hidden, d) * 0.1
    head = {"weight": torch.randn(1, d) * 0.1, "bias": torch.tensor([2.5])}
    torch.save({"projector": projector, "compress_ratio_head": head}, out / "projector.pth")
    named = base_path_in_config or str(base_dir)
    config = {
        "comp_ratio_or_len": [0.5, 0.25, 0.125, 0.0625, 0.03125],
        "placeholder_token_id": 3,
        "mlp_converter_hidden_dim": hidden,
        "feature_extract_method": "mean_pooling",
        "base_encoder_model_path": named,
        "base_decoder_model_path": named,
        "discretize_ratio_mode": "round",
        "discretize_compare_in_log": False,
        "encoder_training": "lora",
        "decoder_training": "lora",
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


class EncodeCounter:
    """Wraps a compressor's real ``encode``: counts batched encoder passes and rows encoded.

    ``EncodeCounter(model)`` installs itself on ``model``; every compression path goes through
    ``encode``, so ``calls == 0`` proves that latents came from a cache or the store.
    """

    def __init__(self, compressor: SemiDynamicCompressor) -> None:
        self.calls = 0
        self.rows = 0
        self._compressor = compressor
        self._encode = compressor.encode
        compressor.encode = self  # type: ignore[method-assign]

    def uninstall(self) -> None:
        """Give the compressor its own ``encode`` back (for a compressor shared across tests)."""
        if self._compressor.__dict__.get("encode") is self:
            del self._compressor.encode

    def __call__(self, contexts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        self.rows += len(contexts)
        return self._encode(contexts)


class PassCounter:
    """Counts the passes framework calls make over their prompts, for every compressor and service.

    Installed with a ``pytest.MonkeyPatch`` (undone with it); `reset` starts a new count.

    * ``marker_scans``: the texts the marker pattern read, in order (every marker parse and check
      goes through ``semidyn_rag.service.MARKER_PATTERN``);
    * ``renders``: prompts rendered and tokenized for the decoder (`LatentDecoder.render_pieces`);
    * ``embeds``: `LatentDecoder.embed_prompts` calls (each builds one batch's ``inputs_embeds``);
    * ``lookups``: latent reads from memory and store (`LatentService.lookup`);
    * ``encodes``: encoder passes (`SemiDynamicCompressor.encode`).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reset()
        pattern = service_module.MARKER_PATTERN
        counter = self

        class CountedPattern:
            def __getattr__(self, name: str) -> object:
                attr = getattr(pattern, name)
                if not callable(attr):
                    return attr

                def scan(text: str, *args: object, **kwargs: object) -> object:
                    counter.marker_scans.append(text)
                    return attr(text, *args, **kwargs)

                return scan

        monkeypatch.setattr(service_module, "MARKER_PATTERN", CountedPattern())
        self._count(monkeypatch, LatentDecoder, "render_pieces", "renders")
        self._count(monkeypatch, LatentDecoder, "embed_prompts", "embeds")
        self._count(monkeypatch, LatentService, "lookup", "lookups")
        self._count(monkeypatch, SemiDynamicCompressor, "encode", "encodes")

    def reset(self) -> None:
        self.marker_scans: list[str] = []
        self.renders = 0
        self.embeds = 0
        self.lookups = 0
        self.encodes = 0

    def _count(self, monkeypatch: pytest.MonkeyPatch, owner: type, name: str, field: str) -> None:
        real = getattr(owner, name)

        def counted(*args: object, **kwargs: object) -> object:
            setattr(self, field, getattr(self, field) + 1)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def hashing_embedding(text: str, dim: int = 256) -> list[float]:
    """Signed feature hashing of lower-cased words, L2-normalised (deterministic across runs).

    A real, if crude, embedding: texts sharing words get a higher inner product, so a vector
    index built on it retrieves the chunk a question is about.
    """
    vec = [0.0] * dim
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        slot = int.from_bytes(digest[:4], "big") % dim
        vec[slot] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


# --- pytest fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from intra-op threads, and on a shared CPU the threads' waits
    cost more than the work they split (the LlamaIndex suite: ~100 s with 2 threads under load,
    ~30 s with 1). Restored after each test, so other directories of one run keep their setting.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def compressor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One saved tiny compressor (tokenizer trained on :data:`PASSAGES`); its base is the sibling
    ``base/``. Every test that loads it gets the same weights, like a new process would."""
    return save_tiny_compressor(tmp_path_factory.mktemp("tiny"), PASSAGES * 20)


@pytest.fixture
def load_compressor(compressor_dir: Path) -> Callable[[], SemiDynamicCompressor]:
    """``load_compressor()``: a fresh load of :func:`compressor_dir`, as a new process does."""
    return lambda: SemiDynamicCompressor.from_pretrained(compressor_dir).eval()


@pytest.fixture
def encode_counter(compressor: SemiDynamicCompressor) -> Iterator[EncodeCounter]:
    """Counts the ``compressor`` fixture's encoder passes (uninstalled after the test)."""
    counter = EncodeCounter(compressor)
    yield counter
    counter.uninstall()


@pytest.fixture
def count_encodes() -> type[EncodeCounter]:
    """``count_encodes(compressor)`` wraps another compressor's ``encode`` (e.g. a new session's)."""
    return EncodeCounter


@pytest.fixture
def count_passes(monkeypatch: pytest.MonkeyPatch) -> PassCounter:
    """A `PassCounter` installed for the test (marker scans, renders, embeddings, lookups)."""
    return PassCounter(monkeypatch)


@pytest.fixture(autouse=True)
def no_pending_query() -> None:
    """Each test is its own query: no chunks a previous test retrieved are still expected
    (`semidyn_rag.service.expect_delivery`). Autouse in the suites that import it (LlamaIndex's,
    whose LLM checks that a query's prompt holds what its retrieval compressed)."""
    service_module.expect_delivery([], "")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "latents"


@pytest.fixture
def store(store_path: Path, compressor: SemiDynamicCompressor) -> Iterator[LatentStore]:
    """A writable latent store for the ``compressor`` fixture, closed after the test."""
    with LatentStore(store_path, compressor.fingerprint) as latent_store:
        yield latent_store


@pytest.fixture
def service(compressor: SemiDynamicCompressor, store: LatentStore) -> LatentService:
    return LatentService(compressor, store)
