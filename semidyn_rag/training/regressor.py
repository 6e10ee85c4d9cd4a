"""The two-stage variant: a standalone ratio predictor in front of a compressor.

The paper (Sec. 4.4, "1-Stage vs. 2-Stage") compares its single-stage joint model with a pipeline
where an isolated regression model predicts ``y`` and the compressor only compresses. `RatioRegressor`
is that isolated model: a (possibly smaller) base LLM with its own LoRA adapter, bidirectional
attention and a linear head on the appended ``<eos>``, trained on the density labels alone (MSE).
It trains with the same `Trainer` (``Trainer(regressor, ..., loss_fn=regressor_loss)``:
`regressor_loss` is a `loss.LossFn`, as the compressor's `loss.compressor_loss` is) and replaces
the joint head at inference through :meth:`RatioRegressor.compress_with`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from .. import selector
from ..checkpoint import attach_adapter
from ..config import LoraSettings
from ..encoder import Encoder, lora_config, predict_y
from ..loading import load_base, load_tokenizer
from ..modeling import SemiDynamicCompressor
from ..types import CompressedContext
from .loss import LossOutput, TrainExample

logger = logging.getLogger(__name__)

CONFIG_NAME = "regressor_config.json"
HEAD_NAME = "head.safetensors"
ADAPTER = "ratio"


class RatioRegressorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    base_model: str
    gguf_file: str | None = None
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(alpha=128))
    bidirectional: bool = True
    max_segment_tokens: int = Field(2048, ge=8)
    """Longer texts are truncated: the density of a long prefix stands for the whole."""
    trust_remote_code: bool = False


class RatioRegressor(nn.Module):
    """Predicts ``y = log2(ratio)`` from text, independently of any compressor."""

    def __init__(
        self, config: RatioRegressorConfig, encoder: PeftModel, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.context_encoder = Encoder(
            encoder, tokenizer.eos_token_id, bidirectional=config.bidirectional
        )
        base = encoder.get_base_model()
        self.head = nn.Linear(base.config.hidden_size, 1).to(device=base.device, dtype=base.dtype)

    @staticmethod
    def _base(config: RatioRegressorConfig, dtype: torch.dtype | None) -> tuple:
        trust = config.trust_remote_code
        base = load_base(config.base_model, config.gguf_file, dtype=dtype, trust_remote_code=trust)
        tok = load_tokenizer(config.base_model, config.gguf_file, trust_remote_code=trust)
        return base, tok

    @classmethod
    def from_config(
        cls, config: RatioRegressorConfig, *, dtype: torch.dtype | None = None
    ) -> RatioRegressor:
        base, tok = cls._base(config, dtype)
        return cls(
            config, get_peft_model(base, lora_config(config.lora), adapter_name=ADAPTER), tok
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> RatioRegressor:
        """Load a saved regressor; code shipped with its base runs only with
        ``trust_remote_code=True`` given here (the flag in the saved config is ignored).

        The adapter goes through `semidyn_rag.checkpoint.attach_adapter`, as the compressor's
        do: a missing or mismatched LoRA tensor is a `CheckpointError` naming the file."""
        directory = Path(directory)
        raw = json.loads((directory / CONFIG_NAME).read_text())
        raw["trust_remote_code"] = trust_remote_code
        config = RatioRegressorConfig.model_validate(raw)
        base, tok = cls._base(config, dtype)
        encoder = attach_adapter(base, directory / ADAPTER, ADAPTER)
        model = cls(config, encoder, tok)
        model.head.load_state_dict(load_file(directory / HEAD_NAME))
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        had_card = (out / "README.md").exists()
        self.encoder.save_pretrained(out, selected_adapters=[ADAPTER], save_embedding_layers=False)
        if not had_card:  # PEFT's boilerplate model card
            (out / "README.md").unlink(missing_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, out / HEAD_NAME)
        (out / CONFIG_NAME).write_text(self.config.model_dump_json(indent=2))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def decoder_tokenizer(self) -> PreTrainedTokenizerBase:
        """Only so that `to_examples` can tokenize answers; the regressor never reads them."""
        return self.tokenizer

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def predict_tokens(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[B]`` predictions ``y``: one pass of the shared `encoder.Encoder` over
        ``context + <eos>`` (contexts cut to ``max_segment_tokens``), the head on ``<eos>``."""
        contexts = [list(c)[: self.config.max_segment_tokens] for c in contexts]
        _, hidden = self.context_encoder.states(contexts)
        return predict_y(self.head, hidden, [len(c) for c in contexts])

    @torch.inference_mode()
    def predict(self, texts: Sequence[str], batch_size: int = 16) -> list[float]:
        tokens = self.tokenize(texts)
        out: list[float] = []
        for start in range(0, len(tokens), batch_size):
            out.extend(self.predict_tokens(tokens[start : start + batch_size]).tolist())
        return out

    @torch.inference_mode()
    def compress_with(
        self,
        compressor: SemiDynamicCompressor,
        texts: Sequence[str],
        scale: float = 0.0,
        *,
        batch_size: int = 16,
    ) -> list[CompressedContext]:
        """Two-stage semi-dynamic compression: this model's ``y`` + DRS choose each text's ratio,
        the compressor pools at that ratio (its own head is not consulted)."""
        cfg = compressor.config
        if cfg.backbone != "mean_pooling":
            raise ValueError("two-stage compression is implemented for mean pooling")
        ys = self.predict(texts, batch_size)
        ratios = [
            selector.select_ratio(y, scale, cfg.ratios, cfg.quantize, cfg.compare_space) for y in ys
        ]
        tokens = compressor.tokenize(texts)
        out: list[CompressedContext | None] = [None] * len(texts)
        for ratio in sorted(set(ratios)):
            idx = [i for i, r in enumerate(ratios) if r == ratio]
            done = compressor.compress_tokens(
                [tokens[i] for i in idx], ratio=ratio, batch_size=batch_size
            )
            for i, ctx in zip(idx, done, strict=True):
                out[i] = dataclasses.replace(ctx, segment_y=(ys[i],) * len(ctx.segment_y))
        return [c for c in out if c is not None]


def regressor_loss(
    model: RatioRegressor,
    examples: Sequence[TrainExample],
    *,
    ratio: float | None = None,
    mse_weight: float = 1.0,
    encoder_grad: bool = True,
    kd_weight: float = 0.0,
    hidden_weight: float = 0.0,
    gain_cap: float | None = None,
) -> LossOutput:
    """The regressor's `loss.LossFn`: MSE of its prediction against the known labels ``y``.

    The regressor's only objective is the label, so ``ratio`` (no structure to choose),
    ``mse_weight`` (nothing to weigh it against) and ``encoder_grad`` are accepted and unused;
    ``lm_loss`` is 0. A batch without labels gives a zero loss that still carries a graph.

    Raises:
        ValueError: ``kd_weight`` or ``hidden_weight`` is not 0, or a ``gain_cap`` is given (the
            regressor has no decoder to distil into or answer tokens to weigh).
    """
    for name, weight in (
        ("kd_weight", kd_weight),
        ("hidden_weight", hidden_weight),
        ("gain_cap", gain_cap),
    ):
        if weight:
            raise ValueError(f"{name}={weight}: the ratio regressor has no decoder to distil into")
    pairs = [(ctx, y) for ex in examples for ctx, y in zip(ex.contexts, ex.y) if math.isfinite(y)]
    if not pairs:
        zero = model.head.weight.sum() * 0.0
        return LossOutput(loss=zero, lm_loss=zero.detach(), mse_loss=zero.detach())
    y_hat = model.predict_tokens([c for c, _ in pairs])
    labels = torch.tensor([y for _, y in pairs], device=model.device)
    mse = nn.functional.mse_loss(y_hat, labels)
    return LossOutput(loss=mse, lm_loss=torch.zeros(()), mse_loss=mse.detach())
