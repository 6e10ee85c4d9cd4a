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
    pool_eos: bool = False
    """Backbones read the appended ``<eos>`` as a context position: mean pooling covers ``n + 1``
    states (``ceil((n + 1) / r)`` latents), ``last_tokens`` ends at the ``<eos>``, length choices
    count ``n + 1``. The paper's code does this; our own checkpoints pool the ``n`` context states."""
    fixed_ratio_alignment: Alignment | None = None
    """Window alignment when the ratio is fixed instead of chosen by the head (``fixed_ratio`` and
    ``multi_ratio`` modes, an explicit ``ratio=``); ``None``: ``pooling_alignment``. The paper's
    code pools a fixed ratio end-aligned (zero-padded in front) and a head-chosen one start-aligned."""
    keep_special_tokens: bool = False
    """Encoder tokenization keeps the tokenizer's special tokens (a bos, or the ``<|endoftext|>``
    an embedding tokenizer appends); a trailing ``<eos>`` is not doubled by the encoder's own."""
    selector_semantics: Literal["ours", "official"] = "ours"
    """How the ratio/length selector discretises. ``ours``: in float64; ``ceil``/``floor`` accept
    an exact candidate and clamp to the set's ends; ``round`` ties go to the smaller candidate.
    ``official`` (the paper's code): in the ratio head's dtype (bf16 when loaded in bf16);
    ``ceil``/``floor`` take the nearest candidate strictly above/below and, outside the set, the
    smallest/largest ratio; ``round`` ties go to the first candidate in ``ratios`` order; the
    length selector truncates ``L / r`` to an int and takes the nearest length whatever
    ``quantize`` says."""
    lora_float32: bool = False
    """Keep LoRA weights in float32 when the base runs in lower precision (PEFT's default, and the
    paper's evaluation); ``False`` casts them with the base."""

    converter_hidden: int = 4096
    converter_gated: bool = False
    converter_gate_input: Literal["normed", "raw"] = "normed"
    """What the gate projection of a gated converter reads: the RMS-normed features (ours) or the
    raw pooled features (the paper's code; its up-projection reads the normed ones)."""
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
