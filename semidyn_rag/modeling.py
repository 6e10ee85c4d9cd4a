"""`SemiDynamicCompressor`: encoder → ratio head + selector → backbone → converter → decoder.

One encoder pass gives both the ratio prediction (head on the appended ``<eos>``) and the hidden
states that are pooled, so choosing a ratio costs nothing extra. The decoder sees each context as a
slot in its prompt, expanded to that context's latent positions.

The class composes one unit per step of that path and owns their weights: `encoder.Encoder` (the
LoRA encoder pass), `backbones` (the mode's ratio or length choice and the features it keeps),
`converter.Converter`, `decoder.LatentDecoder` (prompts, embedding, generation). Files go through
`checkpoint`. The class knows nothing of training: the objective is the function
`training.loss.compressor_loss(model, examples, ...)`, and nothing here imports `training`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import backbones, checkpoint
from .config import CompressorConfig
from .converter import Converter
from .decoder import PLACEHOLDER, AdapterLock, LatentDecoder, LatentPrompt
from .encoder import Encoder, eos_states, lora_config, predict_y
from .loading import load_base, load_tokenizer
from .types import CompressedContext

__all__ = [
    "PLACEHOLDER",
    "ContextTooLongError",
    "LatentPrompt",
    "SemiDynamicCompressor",
]

logger = logging.getLogger(__name__)


class ContextTooLongError(ValueError):
    """A text's latents would exceed the decoder's positions even at the highest ratio."""


class SemiDynamicCompressor(nn.Module):
    """Compresses texts into decoder-space latents and answers questions from them.

    Build a fresh one for training with :meth:`from_config`, load a trained one with
    :meth:`from_pretrained`. ``encoder`` and ``decoder`` are the LoRA-wrapped bases (one model
    with two adapters on a shared base); ``ratio_head``, ``converter`` and ``memory`` (learned
    compression tokens, ``compression_tokens`` backbone only) are ours. Every model pass holds
    :attr:`lock`: which adapter is active, and the encoder's early exit, are state of the base.
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
        self.context_encoder = Encoder(
            encoder,
            tokenizer.eos_token_id,
            bidirectional=config.bidirectional,
            pool_layer=config.pool_layer,
            head_layer=config.head_layer,
        )
        self.backbone = backbones.get(config.backbone)
        d_enc = self.context_encoder.hidden_size
        d_dec = decoder.get_base_model().config.hidden_size
        self.ratio_head = nn.Linear(d_enc, 1)
        self.converter = Converter(
            d_enc,
            d_dec,
            config.converter_hidden,
            config.converter_gated,
            config.converter_gate_input,
        )
        appended = self.backbone.appended(config)
        self.memory = nn.Parameter(torch.randn(appended, d_enc) * 0.02) if appended else None
        self.adapter_lock = AdapterLock()
        self.latent_decoder = LatentDecoder(decoder, decoder_tokenizer, config, self.adapter_lock)
        self._fingerprint: str | None = None
        self._fingerprint_state: tuple | None = None
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
        encoder = get_peft_model(enc_base, lora_config(config.encoder_lora), adapter_name="encoder")
        if config.shared_base:
            encoder.add_adapter("decoder", lora_config(config.decoder_lora))
            decoder = encoder
        else:
            dec_base = load_base(
                config.decoder_model, config.decoder_gguf_file, config, device, dtype
            )
            decoder = get_peft_model(
                dec_base, lora_config(config.decoder_lora), adapter_name="decoder"
            )
        model = cls(config, encoder, decoder, *_tokenizers(config))
        embeddings = decoder.get_input_embeddings().weight.detach().float()
        model.converter.match_output_scale(float(embeddings.pow(2).mean().sqrt()))
        return model

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
        flag saved in a checkpoint's config is ignored. Raises `checkpoint.CheckpointError`
        naming the file for anything missing, damaged or not fitting the base.
        """
        loaded = checkpoint.load_checkpoint(
            name_or_path,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            **config_overrides,
        )
        return cls.from_checkpoint(loaded)

    @classmethod
    def from_checkpoint(cls, loaded: checkpoint.LoadedCheckpoint) -> SemiDynamicCompressor:
        """Assemble a compressor (in eval mode) from loaded checkpoint parts; their tensors are
        copied in checked (`checkpoint.copy_tensors`)."""
        model = cls(loaded.config, loaded.encoder, loaded.decoder, *_tokenizers(loaded.config))
        checkpoint.copy_tensors(model.own_tensors(), loaded.tensors, loaded.source)
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config JSON, the two LoRA adapters and our own tensors (safetensors only)."""
        checkpoint.save_checkpoint(
            directory, self.config, self.own_tensors(), self.encoder, self.decoder
        )

    def own_tensors(self) -> dict[str, torch.Tensor]:
        """Our live tensors (not the bases', not LoRA's) by checkpoint key: ``ratio_head.*``,
        ``converter.*`` and, for learned compression tokens, ``memory`` ``[m, d_enc]``."""
        state = {f"ratio_head.{k}": v for k, v in self.ratio_head.state_dict().items()}
        state.update({f"converter.{k}": v for k, v in self.converter.state_dict().items()})
        if self.memory is not None:
            state["memory"] = self.memory.data
        return state

    def train(self, mode: bool = True) -> SemiDynamicCompressor:
        self._fingerprint = None  # weights may change from here on
        return super().train(mode)

    @property
    def fingerprint(self) -> str:
        """Hash of the config and every weight that shapes the latents (`checkpoint.fingerprint`);
        caches and stores key latents by it.

        The hash is cached until a weight may have changed: the cache is keyed by each
        parameter's identity, storage, dtype and autograd version counter (bumped by every
        in-place write: ``load_state_dict``, optimizer steps, ``copy_`` under ``no_grad``) and by
        the config. Writes through ``param.data`` bypass the version counter: call
        :meth:`train` or reload instead.
        """
        state = (
            self.config.model_dump_json(),
            tuple(
                (id(p), p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                for p in self.parameters()
            ),
        )
        if self._fingerprint is None or self._fingerprint_state != state:
            self._fingerprint = checkpoint.fingerprint(
                self.config,
                self.tokenizer,
                self.own_tensors(),
                self.encoder,
                self.decoder,
                self.encoder_depth,
            )
            self._fingerprint_state = state
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return self.ratio_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.ratio_head.weight.dtype

    # ------------------------------------------------------------------ adapters
    @property
    def lock(self) -> threading.RLock:
        """The model lock, held by every encoder and decoder pass (re-entrant)."""
        return self.adapter_lock.lock

    def adapter(self, name: str) -> contextlib.AbstractContextManager[PeftModel]:
        """The ``encoder`` or ``decoder`` model with that adapter active, under :attr:`lock`
        (for a pass of your own, e.g. a benchmark or a test reference)."""
        model = self.encoder if name == "encoder" else self.decoder
        return self.adapter_lock.activate(model, name)

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

    @property
    def encoder_depth(self) -> int:
        """How many encoder layers a pass runs: only as deep as pooling and the head read."""
        return self.context_encoder.depth

    def encoder_states(
        self, contexts: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched encoder pass: the states to pool (``config.pool_layer``) and the states the
        ratio head reads (``config.head_layer``), each ``[B, T, d_enc]``.

        Each row is ``context + <eos>`` (+ memory tokens for that backbone), right-padded.
        """
        with self.adapter("encoder"):
            return self.context_encoder.states(contexts, self.memory)

    def encode(self, contexts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched encoder pass: hidden states ``[B, T, d]`` and ratio predictions ``[B]``.

        The head reads the ``<eos>`` state of ``config.head_layer`` (default: the last layer);
        with bidirectional attention it has seen the whole context. The hidden states are those
        of ``config.pool_layer`` (default: the last layer). Every compression goes through here.
        """
        hidden, head_states = self.encoder_states(contexts)
        return hidden, predict_y(self.ratio_head, head_states, [len(c) for c in contexts])

    def head_inputs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """What the ratio head reads: each context's ``<eos>`` state, ``[B, d_enc]`` (one pass)."""
        _, states = self.encoder_states(contexts)
        return eos_states(states, [len(c) for c in contexts])

    def structure(
        self, y: float, num_tokens: int, scale: float = 0.0, ratio: float | None = None
    ) -> int:
        """The structural parameter for one segment: pooling window, or latent count for tokens
        (`backbones.structure`; an explicit ``ratio`` must be a trained candidate)."""
        return backbones.structure(self.config, y, num_tokens, scale, ratio, dtype=self.dtype)

    def extract(
        self, hidden: torch.Tensor, num_tokens: int, param: int, ratio: float | None = None
    ) -> torch.Tensor:
        """Apply the backbone to one row of encoder states ``[T, d]`` (``param`` from
        :meth:`structure`, ``ratio`` the explicit one passed to it); returns ``[M, d]``."""
        return backbones.extract(self.config, hidden, num_tokens, param, ratio)

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
        budget = self.latent_decoder.max_positions
        if budget is None:
            return
        for i, ids in enumerate(token_lists):
            need = backbones.min_latents(self.config, len(ids), ratio)
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
                params[i] = (float(self.backbone.ratio(param, n)), ys[row])
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
        """The user message with one ``PLACEHOLDER`` per context (`LatentDecoder.format_prompt`)."""
        return self.latent_decoder.format_prompt(question, num_contexts)

    def latent_prompt(self, question: str, latents: Sequence[torch.Tensor | str]) -> LatentPrompt:
        """The prompt for ``question`` around ``latents``, one context per line: each a
        ``[n, decoder_hidden]`` latent span or plain text (`LatentDecoder.latent_prompt`)."""
        return self.latent_decoder.latent_prompt(question, latents)

    def prompt_positions(self, prompt: LatentPrompt) -> int:
        """Decoder input positions of ``prompt``: its rendered text tokens plus every latent."""
        return self.latent_decoder.prompt_positions(prompt)

    def embed_prompts(
        self, prompts: Sequence[LatentPrompt], answers: Sequence[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decoder ``inputs_embeds`` ``[B, T, d]``, mask ``[B, T]`` and (with ``answers``) labels
        (`LatentDecoder.embed_prompts`)."""
        return self.latent_decoder.embed_prompts(prompts, answers)

    def complete(
        self, prompts: Sequence[LatentPrompt], *, adapter: bool = True, **generate_kwargs: object
    ) -> list[str]:
        """Generate an answer for each prompt in one batched ``generate`` call.

        ``adapter=False`` runs the untouched base decoder: the honest baseline for plain-text
        prompts (no context, full uncompressed context) on the same base model.
        """
        return self.latent_decoder.complete(prompts, adapter=adapter, **generate_kwargs)

    def stream(
        self, prompt: LatentPrompt, *, adapter: bool = True, **generate_kwargs: object
    ) -> Iterator[str]:
        """Yield the answer's text as the decoder produces it (real token streaming); closing the
        iterator early stops the decoder. ``adapter=False`` as in :meth:`complete`."""
        return self.latent_decoder.stream(prompt, adapter=adapter, **generate_kwargs)

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


def _tokenizers(
    config: CompressorConfig,
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """The encoder's and the decoder's tokenizer (one object on a shared base)."""
    tok = load_tokenizer(config.encoder_model, config.encoder_gguf_file, config)
    if config.shared_base:
        return tok, tok
    return tok, load_tokenizer(config.decoder_model, config.decoder_gguf_file, config)
