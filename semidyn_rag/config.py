"""`CompressorConfig`: every structural choice of a compressor, saved beside its weights."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .pooling import Alignment
from .selector import DEFAULT_LENGTHS, DEFAULT_RATIOS, CompareSpace, QuantizeMode

Backbone = Literal["mean_pooling", "last_tokens", "compression_tokens"]
Mode = Literal["fixed_ratio", "fixed_length", "multi_ratio", "semi_dynamic", "fully_dynamic"]

DEFAULT_PROMPT = "Context: {context}\nQuestion: {question}"


class LoraSettings(BaseModel):
    """LoRA on all linear modules of a base model (paper: r=16, alpha 128 encoder / 64 decoder)."""

    model_config = ConfigDict(extra="forbid")

    r: int = 16
    alpha: int = 128
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


class CompressorConfig(BaseModel):
    """What a `SemiDynamicCompressor` is made of and how it chooses its compression.

    Base models are anything ``AutoModelForCausalLM.from_pretrained`` accepts (a hub id or a local
    directory) with an optional GGUF file name inside it. When ``decoder_model`` is ``None`` the encoder
    and decoder share one copy of the base weights, each with its own LoRA adapter.
    """

    # defaults are validated too, so a fresh config and its JSON round trip are equal (ratios 2.0)
    model_config = ConfigDict(extra="forbid", validate_default=True)

    encoder_model: str
    encoder_gguf_file: str | None = None
    decoder_model: str | None = None
    decoder_gguf_file: str | None = None

    backbone: Backbone = "mean_pooling"
    mode: Mode = "semi_dynamic"
    ratios: list[float] = Field(default_factory=lambda: list(DEFAULT_RATIOS))
    lengths: list[int] = Field(default_factory=lambda: list(DEFAULT_LENGTHS))
    fixed_ratio: float = 4
    fixed_length: int = 32
    quantize: QuantizeMode = "round"
    compare_space: CompareSpace = "linear"
    pooling_alignment: Alignment = "start"
    bidirectional: bool = True
    pool_layer: int | None = Field(None, ge=0)
    """Encoder layer whose hidden states the backbone pools (0: the input embeddings; ``None``: the
    last layer, as in the paper). The ratio head reads ``head_layer``. A pretrained
    decoder can learn to read pooled token embeddings in a few hundred LoRA steps, while the last
    layer keeps little of them (SmolLM2: a converter fits mean embeddings with relative error 0.64
    from layer 30, 0.25 from layer 2), so an early layer is what a short training budget can use."""
    head_layer: int | None = Field(None, ge=0)
    """Encoder layer whose ``<eos>`` state the ratio head reads (``None``: the last layer, as in the
    paper). With ``pool_layer`` and ``head_layer`` both set, the encoder runs only
    ``max(pool_layer, head_layer)`` of its layers: an early exit that makes encoding cost a
    fraction of a full forward pass."""
    num_memory_tokens: int | None = None
    """Learnable compression tokens appended to the context; default ``max(lengths)``."""

    converter_hidden: int = 4096
    converter_gated: bool = False
    encoder_lora: LoraSettings = Field(default_factory=lambda: LoraSettings(alpha=128))
    decoder_lora: LoraSettings = Field(default_factory=lambda: LoraSettings(alpha=64))

    max_segment_tokens: int = 2048
    """Texts longer than this (in encoder tokens) are split into segments compressed in turn."""
    prompt_template: str = DEFAULT_PROMPT
    use_chat_template: bool = True
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self) -> CompressorConfig:
        if not self.ratios or any(r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be a non-empty set of values >= 1, got {self.ratios}")
        if not self.lengths or any(m < 1 for m in self.lengths):
            raise ValueError(
                f"lengths must be a non-empty set of positive ints, got {self.lengths}"
            )
        if self.mode in ("fixed_ratio", "multi_ratio") and self.fixed_ratio not in self.ratios:
            raise ValueError(f"fixed_ratio {self.fixed_ratio} is not in ratios {self.ratios}")
        if self.backbone == "compression_tokens" and self.bidirectional:
            raise ValueError(
                "the compression_tokens backbone needs bidirectional=False: with causal attention "
                "the ratio prediction and the memory tokens come out of one encoder pass"
            )
        if self.max_segment_tokens < 8:
            raise ValueError("max_segment_tokens must be at least 8")
        for key in ("{context}", "{question}"):
            if key not in self.prompt_template:
                raise ValueError(f"prompt_template must contain {key}")
        return self

    @property
    def memory_tokens(self) -> int:
        return self.num_memory_tokens or max(self.lengths)

    @property
    def shared_base(self) -> bool:
        return self.decoder_model is None or (
            self.decoder_model == self.encoder_model
            and self.decoder_gguf_file == self.encoder_gguf_file
        )
