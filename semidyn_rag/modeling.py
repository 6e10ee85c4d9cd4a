"""`SemiDynamicCompressor`: encoder + ratio head + DRS + backbone + converter + decoder.

One encoder pass gives both the ratio prediction (head on the appended ``<eos>``) and the hidden
states that are pooled, so choosing a ratio costs nothing extra. The decoder sees each context as a
single placeholder in its prompt, expanded to that context's latent positions.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from . import pooling, selector
from .config import CompressorConfig, LoraSettings
from .converter import Converter
from .loading import load_base, load_tokenizer
from .types import CompressedContext

logger = logging.getLogger(__name__)

PLACEHOLDER = "\ue000"
"""A latent slot in the string form ``LatentPrompt(text, latents)``, for text you wrote yourself.

User text (questions, documents, chat) may contain this character too (PDF extraction leaves it
behind), so prompts built from user text use :meth:`LatentPrompt.from_parts` or
:meth:`SemiDynamicCompressor.latent_prompt`, where text is text whatever characters it holds."""


def _fresh_slot(texts: Iterable[str]) -> str:
    """A random delimiter that none of ``texts`` contains (user text cannot predict it)."""
    texts = list(texts)
    while True:
        slot = f"<<slot:{secrets.token_hex(16)}>>"
        if not any(slot in text for text in texts):
            return slot


@dataclass(init=False, eq=False)
class LatentPrompt:
    """A user message: text ``pieces`` with one context's latents between consecutive pieces.

    The decoder reads ``pieces[0]``, ``latents[0]``, ``pieces[1]``, ... (``len(pieces) ==
    len(latents) + 1``). Build one from user text with :meth:`from_parts`; ``LatentPrompt(text,
    latents)`` reads each ``PLACEHOLDER`` in ``text`` as a slot and raises ``ValueError`` when their
    count differs from ``len(latents)``.
    """

    pieces: tuple[str, ...]
    latents: tuple[torch.Tensor, ...]

    def __init__(self, text: str, latents: Sequence[torch.Tensor] = ()) -> None:
        pieces = text.split(PLACEHOLDER)
        if len(pieces) - 1 != len(latents):
            raise ValueError(
                f"prompt has {len(pieces) - 1} placeholders but {len(latents)} latents"
            )
        self.pieces, self.latents = tuple(pieces), tuple(latents)

    @classmethod
    def from_parts(cls, parts: Iterable[str | torch.Tensor]) -> LatentPrompt:
        """Texts and latent spans (``[n, decoder_hidden]`` tensors) in reading order.

        Adjacent texts are joined; no character of a text is ever read as a slot.
        """
        pieces: list[str] = []
        latents: list[torch.Tensor] = []
        current: list[str] = []
        for part in parts:
            if isinstance(part, torch.Tensor):
                pieces.append("".join(current))
                latents.append(part)
                current = []
            elif isinstance(part, str):
                current.append(part)
            else:
                raise TypeError(f"a prompt part is a str or a latent tensor, not {type(part)}")
        pieces.append("".join(current))
        prompt = cls.__new__(cls)
        prompt.pieces, prompt.latents = tuple(pieces), tuple(latents)
        return prompt

    @property
    def text(self) -> str:
        """The pieces joined by ``PLACEHOLDER`` (for display and the string form)."""
        return PLACEHOLDER.join(self.pieces)


class ContextTooLongError(ValueError):
    """A text's latents would exceed the decoder's positions even at the highest ratio."""


def _check_base_reads_text(prompts: Sequence[LatentPrompt], adapter: bool) -> None:
    """The base decoder (``adapter=False``) never learned to read latents: refuse, don't babble."""
    if not adapter and any(p.latents for p in prompts):
        raise ValueError(
            "adapter=False runs the base decoder, which cannot read latent markers or contexts; "
            "give it the contexts' plain text"
        )


@dataclass
class TrainExample:
    """One pre-tokenized training sample: contexts, the prompt around them, and the answer."""

    contexts: list[list[int]]
    """Encoder token ids of each context (no ``<eos>``; at most ``max_segment_tokens``)."""
    question: str
    answer: list[int]
    """Decoder token ids of the answer, ending with the decoder's ``<eos>``."""
    y: list[float]
    """Density label ``log2(L_ctx / L_sum)`` per context; NaN where unknown (no MSE term)."""
    teacher_ids: list[list[int]] | None = None
    """Per answer token, the ids of the teacher's ``top_k`` next-token candidates ``[A, k]``
    (token-level distillation; ``None``: none)."""
    teacher_logprobs: list[list[float]] | None = None
    """Their log-probabilities under the teacher, same shape as ``teacher_ids``."""
    as_text: list[str | None] | None = None
    """Per context, the plain text the decoder reads in place of its latents (selective
    expansion, as ``expand_top_k`` sends the retriever's best chunks); ``None`` entries, or no
    list, are compressed. An expanded context is not encoded and adds no MSE term."""

    def __post_init__(self) -> None:
        if len(self.y) != len(self.contexts):
            raise ValueError(f"{len(self.y)} labels for {len(self.contexts)} contexts")
        if self.as_text is not None and len(self.as_text) != len(self.contexts):
            raise ValueError(
                f"{len(self.as_text)} as_text entries for {len(self.contexts)} contexts"
            )

    def compressed(self) -> list[int]:
        """Indices of the contexts that go to the decoder as latents."""
        if self.as_text is None:
            return list(range(len(self.contexts)))
        return [i for i, text in enumerate(self.as_text) if text is None]


@dataclass
class LossOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    mse_loss: torch.Tensor
    kd_loss: torch.Tensor | None = None
    """Token-level distillation term (before its weight); ``None`` when no example has targets."""


def distillation_loss(
    logits: torch.Tensor, targets: torch.Tensor, examples: Sequence[TrainExample]
) -> torch.Tensor | None:
    """Sparse token-level KD: ``-Σ_k p_teacher(k) · log p_student(k)`` over the teacher's top-k,
    averaged over every answer token of the examples that carry teacher targets.

    ``logits`` ``[B, T, V]`` and ``targets`` ``[B, T]`` (-100 outside answers) are those of the LM
    loss; answer token ``j`` of row ``i`` is predicted at the position before it. ``None`` when no
    example has targets. Raises ``ValueError`` when an example's targets do not cover its answer.
    """
    terms = []
    for i, ex in enumerate(examples):
        if ex.teacher_ids is None or ex.teacher_logprobs is None:
            continue
        positions = (targets[i] != -100).nonzero().squeeze(-1) - 1
        if len(ex.teacher_ids) != positions.numel():
            raise ValueError(
                f"teacher targets cover {len(ex.teacher_ids)} tokens, the answer has "
                f"{positions.numel()}"
            )
        student = logits[i, positions].float().log_softmax(-1)  # [A, V]
        ids = torch.as_tensor(ex.teacher_ids, device=logits.device)
        probs = torch.as_tensor(ex.teacher_logprobs, device=logits.device).exp()
        terms.append(-(probs * student.gather(-1, ids)).sum(-1))
    return torch.cat(terms).mean() if terms else None


def _lora(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )


def _inner(peft_model: PeftModel) -> nn.Module:
    """The transformer stack under the LM head: hidden states without paying for vocab logits."""
    return peft_model.get_base_model().base_model


@contextlib.contextmanager
def _early_exit(inner: nn.Module, depth: int) -> Iterator[None]:
    """Run only the first ``depth`` layers of a transformer stack for the duration of a call.

    The final norm is skipped too, so the last state returned is layer ``depth``'s raw output,
    exactly ``hidden_states[depth]`` of a full pass. Callers hold the model lock: the stack is
    shared with the decoder when both use one base.
    """
    layers = inner.layers
    if depth >= len(layers):
        yield
        return
    norm = inner.norm
    inner.layers, inner.norm = nn.ModuleList(layers[:depth]), nn.Identity()
    try:
        yield
    finally:
        inner.layers, inner.norm = layers, norm


class _Cancelled(StoppingCriteria):
    """Stops ``generate`` once the streaming consumer has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class SemiDynamicCompressor(nn.Module):
    """Compresses texts into decoder-space latents and answers questions from them.

    Build a fresh one for training with :meth:`from_config`, load a trained one with
    :meth:`from_pretrained`. Model passes are serialised by a lock because the bidirectional flag is
    written into the shared base config for the duration of an encoder call.
    """

    def __init__(
        self,
        config: CompressorConfig,
        encoder: PeftModel,
        decoder: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        decoder_tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.decoder_tokenizer = decoder_tokenizer
        d_enc = encoder.get_base_model().config.hidden_size
        layers = encoder.get_base_model().config.num_hidden_layers
        for name in ("pool_layer", "head_layer"):
            value = getattr(config, name)
            if value is not None and value > layers:
                raise ValueError(f"{name} {value} > the encoder's {layers} layers")
        d_dec = decoder.get_base_model().config.hidden_size
        self.ratio_head = nn.Linear(d_enc, 1)
        self.converter = Converter(
            d_enc,
            d_dec,
            config.converter_hidden,
            config.converter_gated,
            config.converter_gate_input,
        )
        self.memory = (
            nn.Parameter(torch.randn(config.memory_tokens, d_enc) * 0.02)
            if config.backbone == "compression_tokens"
            else None
        )
        self._lock = threading.RLock()
        self._fingerprint: str | None = None
        dtype = encoder.get_base_model().dtype
        self.to(device=encoder.get_base_model().device, dtype=dtype)
        if config.lora_float32:  # PEFT computes a float32 LoRA on a bf16 base in float32
            for name, param in self.named_parameters():
                if "lora_" in name:
                    param.data = param.data.float()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: CompressorConfig,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> SemiDynamicCompressor:
        """A new, untrained compressor: base model(s) loaded, fresh LoRA adapters, head, converter."""
        enc_base = load_base(config.encoder_model, config.encoder_gguf_file, config, device, dtype)
        encoder = get_peft_model(enc_base, _lora(config.encoder_lora), adapter_name="encoder")
        if config.shared_base:
            encoder.add_adapter("decoder", _lora(config.decoder_lora))
            decoder = encoder
        else:
            dec_base = load_base(
                config.decoder_model, config.decoder_gguf_file, config, device, dtype
            )
            decoder = get_peft_model(dec_base, _lora(config.decoder_lora), adapter_name="decoder")
        model = cls(config, encoder, decoder, *cls._tokenizers(config))
        embeddings = decoder.get_input_embeddings().weight.detach().float()
        model.converter.match_output_scale(float(embeddings.pow(2).mean().sqrt()))
        return model

    @staticmethod
    def _tokenizers(
        config: CompressorConfig,
    ) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
        tok = load_tokenizer(config.encoder_model, config.encoder_gguf_file, config)
        if config.shared_base:
            return tok, tok
        return tok, load_tokenizer(config.decoder_model, config.decoder_gguf_file, config)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        **config_overrides: object,
    ) -> SemiDynamicCompressor:
        """Load a saved compressor: a local directory, a hub id, or ``None`` for the bundled default.

        Our own layout and the paper's released layout (``projector.pth``) are both recognised.
        Code shipped with a base model runs only with ``trust_remote_code=True`` given here; the
        flag saved in a checkpoint's config is ignored.
        """
        from .checkpoint import load_compressor

        return load_compressor(
            name_or_path,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            **config_overrides,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config JSON, the two LoRA adapters and our own tensors (safetensors only)."""
        from .checkpoint import save_compressor

        save_compressor(self, directory)

    def train(self, mode: bool = True) -> SemiDynamicCompressor:
        self._fingerprint = None  # weights may change from here on
        return super().train(mode)

    @property
    def fingerprint(self) -> str:
        """Hash of the config and every weight that shapes the latents; caches key by it.

        Hashing the weights is cached until one may have changed: the cache is keyed by each
        parameter's identity, storage, dtype and autograd version counter (bumped by every
        in-place write: ``load_state_dict``, optimizer steps, ``copy_`` under ``no_grad``) and by
        the config. Writes through ``param.data`` bypass the version counter: call
        :meth:`train` or reload instead.
        """
        from .checkpoint import fingerprint

        state = (
            self.config.model_dump_json(),
            tuple(
                (id(p), p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                for p in self.parameters()
            ),
        )
        if self._fingerprint is None or getattr(self, "_fingerprint_state", None) != state:
            self._fingerprint = fingerprint(self)
            self._fingerprint_state = state
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return self.ratio_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.ratio_head.weight.dtype

    # ------------------------------------------------------------------ adapters
    @contextlib.contextmanager
    def _adapter(self, name: str) -> Iterator[PeftModel]:
        """Activate one LoRA adapter under the model lock.

        peft's ``set_adapter`` freezes the inactive adapter; while training both adapters must keep
        learning, so their ``requires_grad`` is restored afterwards.
        """
        model = self.encoder if name == "encoder" else self.decoder
        with self._lock:
            if model.active_adapter != name:
                model.set_adapter(name)
                if self.training:
                    for pname, param in model.named_parameters():
                        if "lora_" in pname:
                            param.requires_grad_(True)
            yield model

    # ------------------------------------------------------------------ encoder
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Encoder token ids per text, never ending in ``<eos>`` (the encoder appends it).

        Without special tokens unless ``config.keep_special_tokens``: then the tokenizer's own
        (a bos, an embedding tokenizer's ``<|endoftext|>``) stay, and a trailing ``<eos>`` is
        dropped so that the encoder's appended one is not doubled. Raises ``ValueError`` for an
        empty text.
        """
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise ValueError(f"text {i} is empty; there is nothing to compress")
        keep = self.config.keep_special_tokens
        ids = self.tokenizer(list(texts), add_special_tokens=keep)["input_ids"]
        if keep:
            eos = self.tokenizer.eos_token_id
            ids = [row[:-1] if row and row[-1] == eos else row for row in ids]
        return ids

    def encode(self, contexts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched encoder pass: hidden states ``[B, T, d]`` and ratio predictions ``[B]``.

        Each row is ``context + <eos>`` (+ memory tokens for that backbone), right-padded. The head
        reads the ``<eos>`` state of ``config.head_layer`` (default: the last layer); with
        bidirectional attention it has seen the whole context. The hidden states are those of
        ``config.pool_layer`` (default: the last layer).
        """
        hidden, head_states = self._encoder_states(contexts)
        return hidden, self._predict_y(head_states, [len(c) for c in contexts])

    @property
    def encoder_depth(self) -> int:
        """How many encoder layers a pass runs: only as deep as pooling and the head read."""
        layers = self.encoder.get_base_model().config.num_hidden_layers
        wanted = (self.config.pool_layer, self.config.head_layer)
        return layers if None in wanted else max(wanted)  # type: ignore[type-var]

    def _encoder_states(
        self, contexts: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder pass of :meth:`encode`: states to pool and states for the ratio head."""
        eos = self.tokenizer.eos_token_id
        n_mem = self.config.memory_tokens if self.memory is not None else 0
        lengths = [len(c) for c in contexts]
        width = max(lengths) + 1 + n_mem
        ids = torch.full((len(contexts), width), eos, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for row, ctx in enumerate(contexts):
            ids[row, : len(ctx)] = torch.as_tensor(ctx, dtype=torch.long)
            mask[row, : len(ctx) + 1 + n_mem] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pool, head, depth = self.config.pool_layer, self.config.head_layer, self.encoder_depth
        with self._adapter("encoder") as model:
            embeds = model.get_input_embeddings()(ids)
            if self.memory is not None:
                embeds = embeds.clone()
                for row, n in enumerate(lengths):
                    embeds[row, n + 1 : n + 1 + n_mem] = self.memory
            inner = _inner(model)
            with _early_exit(inner, depth):
                out = inner(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    is_causal=not self.config.bidirectional,
                    output_hidden_states=any(x not in (None, depth) for x in (pool, head)),
                )
        last = out.last_hidden_state  # layer `depth`: raw after an early exit, normed at the top

        def states(layer: int | None) -> torch.Tensor:
            return last if layer is None or layer == depth else out.hidden_states[layer]

        return states(pool), states(head)

    def head_inputs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """What the ratio head reads: each context's ``<eos>`` state, ``[B, d_enc]`` (one pass)."""
        _, states = self._encoder_states(contexts)
        return self._eos_states(states, [len(c) for c in contexts])

    def _eos_states(self, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        eos_pos = torch.as_tensor(lengths, device=self.device)
        return hidden[torch.arange(len(lengths), device=self.device), eos_pos]

    def _predict_y(self, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """The regression head on each row's ``<eos>`` state (position ``length``)."""
        return self.ratio_head(self._eos_states(hidden, lengths)).squeeze(-1).float()

    def structure(
        self, y: float, num_tokens: int, scale: float = 0.0, ratio: float | None = None
    ) -> int:
        """The structural parameter for one segment: pooling window, or latent count for tokens.

        An explicit ``ratio`` (multi-ratio use) overrides the mode and must be a trained candidate.
        With ``config.pool_eos`` the appended ``<eos>`` counts as a position (``num_tokens + 1``);
        ``config.selector_semantics`` picks our discretisation or the paper code's.
        """
        cfg = self.config
        if ratio is not None:
            selector.check_ratio(ratio, cfg.ratios)
        mean = cfg.backbone == "mean_pooling"
        length = num_tokens + 1 if cfg.pool_eos else num_tokens
        official = cfg.selector_semantics == "official"
        if ratio is None and cfg.mode in ("fixed_ratio", "multi_ratio"):
            ratio = cfg.fixed_ratio
        if ratio is None and cfg.mode == "semi_dynamic" and mean:
            if official:
                ratio = selector.official_select_ratio(
                    y, scale, cfg.ratios, cfg.quantize, cfg.compare_space, self.dtype
                )
            else:
                ratio = selector.select_ratio(y, scale, cfg.ratios, cfg.quantize, cfg.compare_space)
        if ratio is None and cfg.mode == "fully_dynamic":
            if not math.isfinite(y):  # max(1.0, nan) would be 1.0: every token kept, silently
                raise ValueError(
                    f"the ratio head gave {y!r}: this checkpoint has no trained ratio head; "
                    "pass ratio= or use a fixed mode"
                )
            ratio = max(1.0, selector.continuous_ratio(y, scale))
        if ratio is not None:
            window = max(1, round(ratio))
            count = math.ceil(length / window)
        elif cfg.mode == "fixed_length":
            count = cfg.fixed_length
            window = pooling.window_for_length(length, count)
        elif official:  # semi-dynamic on a token backbone, as the paper's code chooses lengths
            count = selector.official_select_length(y, length, scale, cfg.lengths, self.dtype)
            window = 0
        else:  # semi-dynamic on a token backbone: length-based DRS (Eq. 4-5)
            count = selector.select_length(
                y, length, scale, cfg.lengths, cfg.quantize, cfg.compare_space
            )
            window = 0
        if mean:
            return window
        limit = length if cfg.backbone == "last_tokens" else cfg.memory_tokens
        if official:
            limit = min(limit, length)
        return max(1, min(count, limit))

    def extract(
        self, hidden: torch.Tensor, num_tokens: int, param: int, ratio: float | None = None
    ) -> torch.Tensor:
        """Apply the backbone to one row of encoder states ``[T, d]`` (``param`` from
        :meth:`structure`, ``ratio`` the explicit one passed to it); returns ``[M, d]``.

        The row is ``context + <eos>`` (+ memory tokens); with ``config.pool_eos`` the ``<eos>`` at
        position ``num_tokens`` is pooled with the context. A ratio that the head did not choose
        (fixed modes, explicit ``ratio``) uses ``config.fixed_ratio_alignment`` when it is set.
        """
        cfg = self.config
        length = num_tokens + 1 if cfg.pool_eos else num_tokens
        if cfg.backbone == "mean_pooling":
            fixed = ratio is not None or cfg.mode in ("fixed_ratio", "multi_ratio")
            align = cfg.pooling_alignment
            if fixed and cfg.fixed_ratio_alignment is not None:
                align = cfg.fixed_ratio_alignment
            return pooling.mean_pool(hidden[:length], param, align)
        if cfg.backbone == "last_tokens":
            return pooling.last_tokens(hidden[:length], param)
        start = num_tokens + 1
        return hidden[start : start + param]

    def _segments(self, token_lists: list[list[int]]) -> tuple[list[list[int]], list[int]]:
        """Split over-long token lists into encoder-sized segments; return segments and owners."""
        size = self.config.max_segment_tokens
        segments, owners = [], []
        for owner, ids in enumerate(token_lists):
            for start in range(0, len(ids), size):
                segments.append(ids[start : start + size])
                owners.append(owner)
        return segments, owners

    def _check_fits_decoder(
        self, token_lists: Sequence[Sequence[int]], ratio: float | None
    ) -> None:
        from .precompress import decoder_positions, min_latents

        budget = decoder_positions(self)
        if budget is None:
            return
        for i, ids in enumerate(token_lists):
            need = min_latents(self, len(ids), ratio)
            if need > budget:
                raise ContextTooLongError(
                    f"text {i} has {len(ids):,} tokens, which give at least {need:,} latents: "
                    f"more than the decoder's {budget:,} positions (max_position_embeddings); "
                    "split it into smaller chunks"
                )

    @torch.inference_mode()
    def compress(
        self,
        texts: Sequence[str],
        scale: float = 0.0,
        ratio: float | None = None,
        *,
        batch_size: int = 16,
    ) -> list[CompressedContext]:
        """Compress each text; one encoder pass per batch of length-sorted segments.

        Texts longer than ``max_segment_tokens`` are split into consecutive segments, each with its
        own ratio choice, whose latents are concatenated: nothing is truncated. No texts: ``[]``.
        """
        if not texts:
            return []
        return self.compress_tokens(self.tokenize(texts), scale, ratio, batch_size=batch_size)

    @torch.inference_mode()
    def compress_tokens(
        self,
        token_lists: list[list[int]],
        scale: float = 0.0,
        ratio: float | None = None,
        *,
        batch_size: int = 16,
    ) -> list[CompressedContext]:
        """:meth:`compress` for already tokenized texts (callers that tokenized to batch by length).

        Raises `ContextTooLongError` (before the encoder runs) for a text whose latents could not
        fit the decoder's positions even at the highest ratio: no prompt could hold it.
        """
        if not token_lists:
            return []
        self._check_fits_decoder(token_lists, ratio)
        segments, owners = self._segments(token_lists)
        order = sorted(range(len(segments)), key=lambda i: len(segments[i]))
        latents: list[torch.Tensor | None] = [None] * len(segments)
        params: list[tuple[float, float]] = [(0.0, 0.0)] * len(segments)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            hidden, y = self.encode([segments[i] for i in batch])
            ys = y.tolist()  # one device sync per batch, not two per row
            pooled = []
            for row, i in enumerate(batch):
                n = len(segments[i])
                param = self.structure(ys[row], n, scale, ratio)
                pooled.append(self.extract(hidden[row], n, param, ratio))
                chosen = param if self.config.backbone == "mean_pooling" else n / param
                params[i] = (float(chosen), ys[row])
            # One converter call per encoder batch: the token backbones' features are views of
            # `hidden`, which must not stay alive for every batch until the end of a large call.
            converted = self.converter(torch.cat(pooled)).split([p.shape[0] for p in pooled])
            for i, lat in zip(batch, converted, strict=True):
                latents[i] = lat
            del hidden, pooled
        segments_of: list[list[int]] = [[] for _ in token_lists]
        for i, owner in enumerate(owners):  # linear, not texts x segments
            segments_of[owner].append(i)
        results = []
        for ids, mine in zip(token_lists, segments_of, strict=True):
            results.append(
                CompressedContext(
                    latents=torch.cat([latents[i] for i in mine]),
                    num_tokens=len(ids),
                    segment_ratios=tuple(params[i][0] for i in mine),
                    segment_y=tuple(params[i][1] for i in mine),
                )
            )
        return results

    # ------------------------------------------------------------------ decoder
    def format_prompt(self, question: str, num_contexts: int) -> str:
        """The user message for ``question`` with one placeholder per context (none: the question).

        The string form for ``LatentPrompt(text, latents)``: a ``PLACEHOLDER`` inside ``question``
        would be a slot, so it becomes U+FFFD here; :meth:`latent_prompt` keeps the question exact.
        """
        question = question.replace(PLACEHOLDER, "\ufffd")
        if num_contexts == 0:
            return question
        slots = "\n".join([PLACEHOLDER] * num_contexts)
        return self.config.prompt_template.format(context=slots, question=question)

    def latent_prompt(self, question: str, latents: Sequence[torch.Tensor | str]) -> LatentPrompt:
        """The training prompt for ``question`` around ``latents``, one context per line.

        Each context is a ``[n, decoder_hidden]`` latent span or plain text (read as text, as
        selective expansion sends it). No text is parsed for slots: the question and text
        contexts reach the decoder exactly as given, whatever characters they hold.
        """
        if not latents:
            return LatentPrompt.from_parts([question])
        texts = [c for c in latents if isinstance(c, str)]
        slot = _fresh_slot([question, self.config.prompt_template, *texts])
        text = self.config.prompt_template.format(
            context="\n".join([slot] * len(latents)), question=question
        )
        first, *rest = text.split(slot)
        if len(rest) != len(latents):
            raise RuntimeError("the prompt template dropped or repeated a context slot")
        parts: list[str | torch.Tensor] = [first]
        for latent, piece in zip(latents, rest, strict=True):
            parts += [latent, piece]
        return LatentPrompt.from_parts(parts)

    def _render(self, text: str, answer: bool = False) -> str:
        tok = self.decoder_tokenizer
        if not (self.config.use_chat_template and tok.chat_template):
            return text
        return tok.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )

    def _render_pieces(self, pieces: Sequence[str]) -> list[str]:
        """The chat template around a prompt's pieces, split again at the latent slots.

        The pieces are joined by a fresh random delimiter that no piece contains, so no text can
        add or remove a slot.
        """
        if len(pieces) == 1:
            return [self._render(pieces[0])]
        slot = _fresh_slot(pieces)
        rendered = self._render(slot.join(pieces)).split(slot)
        if len(rendered) != len(pieces):
            raise RuntimeError("the decoder's chat template dropped or repeated a latent slot")
        return rendered

    def prompt_positions(self, prompt: LatentPrompt) -> int:
        """Decoder input positions of ``prompt``: its rendered text tokens plus every latent."""
        tok = self.decoder_tokenizer
        ids = tok(self._render_pieces(prompt.pieces), add_special_tokens=False)["input_ids"]
        return sum(len(i) for i in ids) + sum(int(lat.shape[0]) for lat in prompt.latents)

    def embed_prompts(
        self, prompts: Sequence[LatentPrompt], answers: Sequence[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decoder ``inputs_embeds`` ``[B, T, d]`` with each slot expanded to its latent positions.

        Without ``answers`` the batch is left-padded for generation; with answers it is right-padded
        and labels mark only the answer tokens (the LM loss ignores prompt and latents).
        """
        tok = self.decoder_tokenizer
        pieces = [self._render_pieces(p.pieces) for p in prompts]
        flat = [piece for ps in pieces for piece in ps]
        flat_ids = iter(tok(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
        table = self.decoder.get_input_embeddings()
        rows, labels = [], []
        for i, (prompt, ps) in enumerate(zip(prompts, pieces, strict=True)):
            ids = [next(flat_ids) for _ in ps]
            parts, part_labels = [], []
            for j, piece_ids in enumerate(ids):
                parts.append(
                    table(torch.as_tensor(piece_ids, dtype=torch.long, device=self.device))
                )
                part_labels.append(torch.full((len(piece_ids),), -100, dtype=torch.long))
                if j < len(prompt.latents):
                    lat = prompt.latents[j].to(device=self.device, dtype=parts[-1].dtype)
                    parts.append(lat)
                    part_labels.append(torch.full((lat.shape[0],), -100, dtype=torch.long))
            if answers is not None:
                ans = torch.as_tensor(answers[i], dtype=torch.long)
                parts.append(table(ans.to(self.device)))
                part_labels.append(ans)
            rows.append(torch.cat(parts))
            labels.append(torch.cat(part_labels))
        width = max(r.shape[0] for r in rows)
        dim = rows[0].shape[1]
        embeds = rows[0].new_zeros((len(rows), width, dim))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        label_tensor = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
            n = row.shape[0]
            span = slice(width - n, width) if answers is None else slice(0, n)
            embeds[i, span] = row
            mask[i, span] = 1
            label_tensor[i, span] = lab
        return embeds, mask, (label_tensor.to(self.device) if answers is not None else None)

    def _generation_kwargs(self, kwargs: dict) -> dict:
        """``generate`` arguments: the caller's, HF names and meanings, with our defaults.

        64 new tokens unless ``max_new_tokens`` or ``max_length`` (prompt positions included, as
        in HF) is given; a ``temperature`` above 0 samples unless ``do_sample`` says otherwise.
        """
        tok = self.decoder_tokenizer
        out = dict(kwargs)
        if out.get("max_new_tokens") is None and out.get("max_length") is None:
            out["max_new_tokens"] = 64
        if out.get("do_sample") is None:
            out["do_sample"] = (out.get("temperature") or 0.0) > 0
        out.setdefault("pad_token_id", tok.pad_token_id or tok.eos_token_id)
        out.setdefault("eos_token_id", tok.eos_token_id)
        if not out["do_sample"]:  # greedy: sampling knobs mean nothing (and make HF warn)
            for key in ("temperature", "top_p", "top_k"):
                out[key] = None
        return out

    @torch.inference_mode()
    def complete(
        self, prompts: Sequence[LatentPrompt], *, adapter: bool = True, **generate_kwargs: object
    ) -> list[str]:
        """Generate an answer for each prompt in one batched ``generate`` call.

        ``adapter=False`` runs the untouched base decoder: the honest baseline for plain-text
        prompts (no context, full uncompressed context) on the same base model.
        """
        if not prompts:
            return []
        _check_base_reads_text(prompts, adapter)
        embeds, mask, _ = self.embed_prompts(prompts)
        with self._adapter("decoder") as model:
            plain = model.disable_adapter() if not adapter else contextlib.nullcontext()
            with plain:
                out = model.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    **self._generation_kwargs(generate_kwargs),
                )
        return self.decoder_tokenizer.batch_decode(out, skip_special_tokens=True)

    def stream(
        self, prompt: LatentPrompt, *, adapter: bool = True, **generate_kwargs: object
    ) -> Iterator[str]:
        """Yield the answer's text as the decoder produces it (real token streaming).

        ``adapter=False`` streams from the untouched base decoder, as in :meth:`complete`.
        """
        _check_base_reads_text([prompt], adapter)
        with torch.inference_mode():
            embeds, mask, _ = self.embed_prompts([prompt])
        streamer = TextIteratorStreamer(self.decoder_tokenizer, skip_special_tokens=True)
        kwargs = self._generation_kwargs(generate_kwargs)
        cancelled = threading.Event()
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [*kwargs.get("stopping_criteria", []), _Cancelled(cancelled)]
        )
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), self._adapter("decoder") as model:
                    plain = model.disable_adapter() if not adapter else contextlib.nullcontext()
                    with plain:
                        model.generate(
                            inputs_embeds=embeds, attention_mask=mask, streamer=streamer, **kwargs
                        )
            except BaseException as exc:  # surfaced in the consumer's thread below
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:  # a consumer that stops reading early also stops the decoder (and its lock)
            cancelled.set()
            thread.join()
        if errors:
            raise errors[0]

    def prompts_for(
        self,
        questions: Sequence[str],
        contexts: Sequence[Sequence[str | CompressedContext]],
        scale: float = 0.0,
        ratio: float | None = None,
    ) -> list[LatentPrompt]:
        """Build prompts, compressing all raw-text contexts of all questions in one call."""
        texts = sorted({c for group in contexts for c in group if isinstance(c, str)})
        done = dict(zip(texts, self.compress(texts, scale, ratio) if texts else [], strict=True))
        prompts = []
        for question, group in zip(questions, contexts, strict=True):
            latents = [(done[c] if isinstance(c, str) else c).latents for c in group]
            prompts.append(self.latent_prompt(question, latents))
        return prompts

    def generate(
        self,
        question: str,
        contexts: Sequence[str | CompressedContext] = (),
        *,
        scale: float = 0.0,
        ratio: float | None = None,
        **generate_kwargs: object,
    ) -> str:
        """Answer ``question`` from compressed ``contexts`` (texts or results of :meth:`compress`)."""
        return self.generate_batch(
            [question], [contexts], scale=scale, ratio=ratio, **generate_kwargs
        )[0]

    def generate_batch(
        self,
        questions: Sequence[str],
        contexts: Sequence[Sequence[str | CompressedContext]],
        *,
        scale: float = 0.0,
        ratio: float | None = None,
        **generate_kwargs: object,
    ) -> list[str]:
        """:meth:`generate` for many questions: one encoder batch, one ``generate`` call."""
        return self.complete(self.prompts_for(questions, contexts, scale, ratio), **generate_kwargs)

    # ------------------------------------------------------------------ training
    def training_loss(
        self,
        examples: Sequence[TrainExample],
        ratio: float | None = None,
        mse_weight: float = 1.0,
        encoder_grad: bool = True,
        kd_weight: float = 0.0,
    ) -> LossOutput:
        """Eq. 7: ``LM + λ·MSE(ŷ, y)`` for one batch (the LM loss counts answer tokens only),
        plus ``kd_weight ×`` `distillation_loss` where examples carry teacher targets.

        ``ratio`` fixes the structure for the whole batch (multi-ratio training draws one per batch);
        ``None`` lets the mode decide, with the label ``y`` standing in for the prediction so that
        the fully dynamic baseline trains on the ratios its labels imply. ``encoder_grad=False``
        builds the latents without a graph (encoder and converter held fixed): the backward pass
        then costs the decoder and the ratio head only. Contexts an example marks ``as_text`` are
        read as plain text in the same prompt (selective expansion), without latents or MSE term.
        """
        picked = [(ex, i) for ex in examples for i in ex.compressed()]
        contexts = [ex.contexts[i] for ex, i in picked]
        labels = torch.tensor([ex.y[i] for ex, i in picked], device=self.device)
        y_hat = labels.new_zeros(0)
        spans: Iterator[torch.Tensor] = iter(())
        if contexts:  # a batch of fully expanded prompts has nothing to encode
            held = contextlib.nullcontext() if encoder_grad else torch.no_grad()
            with held:
                hidden, head_states = self._encoder_states(contexts)
            y_hat = self._predict_y(head_states, [len(c) for c in contexts])  # learns either way
            with held:
                pooled = []
                for row, (ctx, label) in enumerate(zip(contexts, labels.tolist(), strict=True)):
                    guide = label if math.isfinite(label) else float(y_hat[row].detach())
                    structure = self.structure(guide, len(ctx), 0.0, ratio)
                    pooled.append(self.extract(hidden[row], len(ctx), structure, ratio))
                spans = iter(self.converter(torch.cat(pooled)).split([p.shape[0] for p in pooled]))
        prompts = []
        for ex in examples:
            texts = ex.as_text or [None] * len(ex.contexts)
            parts = [next(spans) if text is None else text for text in texts]
            prompts.append(self.latent_prompt(ex.question, parts))
        embeds, mask, targets = self.embed_prompts(prompts, [ex.answer for ex in examples])
        with self._adapter("decoder") as model:
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        lm = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100
        )
        known = torch.isfinite(labels)
        mse = (
            nn.functional.mse_loss(y_hat[known], labels[known])
            if known.any()
            else y_hat.sum() * 0.0
        )
        loss = lm + mse_weight * mse
        kd = distillation_loss(logits, targets, examples) if kd_weight else None
        if kd is not None:
            loss = loss + kd_weight * kd
        return LossOutput(
            loss=loss,
            lm_loss=lm.detach(),
            mse_loss=mse.detach(),
            kd_loss=None if kd is None else kd.detach(),
        )
