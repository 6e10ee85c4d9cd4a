"""The decoder side: prompts with latent slots, their input embeddings, generation and streaming.

A prompt is a `LatentPrompt`: text pieces with one context's latents ``[n, d_dec]`` between
consecutive pieces. `LatentDecoder` renders the pieces with the decoder's chat template, embeds
them with its input-embedding table, splices each latent span in at its slot, and runs
``generate`` on ``inputs_embeds``. `AdapterLock` serialises every pass over the LoRA-wrapped
bases: encoder and decoder adapters may share one base, and the adapter that is active (and the
encoder's early exit) is state of that shared base.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from transformers import (
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from .config import CompressorConfig

PLACEHOLDER = "\ue000"
"""A latent slot in the string form ``LatentPrompt(text, latents)``, for text you wrote yourself.

User text (questions, documents, chat) may contain this character too (PDF extraction leaves it
behind), so prompts built from user text use :meth:`LatentPrompt.from_parts` or
:meth:`LatentDecoder.latent_prompt`, where text is text whatever characters it holds."""


def fresh_slot(texts: Iterable[str]) -> str:
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

        Adjacent texts are joined; no character of a text is ever read as a slot. Raises
        ``TypeError`` for a part that is neither.
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


class AdapterLock:
    """Serialises passes over LoRA-wrapped bases and activates one adapter for each.

    ``lock`` is re-entrant, so a pass may nest another of the same thread (a generation that
    compresses first). Held for the whole of a pass, including a streaming generation, which
    releases it once its thread ends.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()

    @contextlib.contextmanager
    def activate(self, model: PeftModel, name: str) -> Iterator[PeftModel]:
        """``model`` with adapter ``name`` active, under the lock.

        peft's ``set_adapter`` freezes the inactive adapters; while ``model`` trains every
        adapter must keep learning, so their LoRA tensors get ``requires_grad`` back.
        """
        with self.lock:
            if model.active_adapter != name:
                model.set_adapter(name)
                if model.training:
                    for pname, param in model.named_parameters():
                        if "lora_" in pname:
                            param.requires_grad_(True)
            yield model


class _Cancelled(StoppingCriteria):
    """Stops ``generate`` once the streaming consumer has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def _check_base_reads_text(prompts: Sequence[LatentPrompt], adapter: bool) -> None:
    """The base decoder (``adapter=False``) never learned to read latents: refuse, don't babble."""
    if not adapter and any(p.latents for p in prompts):
        raise ValueError(
            "adapter=False runs the base decoder, which cannot read latent markers or contexts; "
            "give it the contexts' plain text"
        )


class LatentDecoder:
    """Prompts → decoder ``inputs_embeds`` → text, for the ``decoder`` adapter of ``model``.

    ``config`` supplies the prompt template and whether the tokenizer's chat template is applied.
    Every model pass holds ``lock`` with the ``decoder`` adapter active.
    """

    adapter_name = "decoder"

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        config: CompressorConfig,
        lock: AdapterLock,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.lock = lock
        self._rendered: weakref.WeakKeyDictionary[LatentPrompt, tuple[tuple[str, ...], Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._rendered_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def max_positions(self) -> int | None:
        """The decoder's position budget (``max_position_embeddings``), if its config has one."""
        value = getattr(self.model.get_base_model().config, "max_position_embeddings", None)
        return int(value) if value else None

    def activate(self) -> contextlib.AbstractContextManager[PeftModel]:
        """The decoder under the lock with its adapter active (for a pass of your own)."""
        return self.lock.activate(self.model, self.adapter_name)

    # ------------------------------------------------------------------ prompts
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

    def latent_prompt(self, question: str, contexts: Sequence[torch.Tensor | str]) -> LatentPrompt:
        """The prompt template around ``question`` and ``contexts``, one context per line.

        Each context is a ``[n, decoder_hidden]`` latent span or plain text (read as text, as
        selective expansion sends it). No text is parsed for slots: the question and text
        contexts reach the decoder exactly as given, whatever characters they hold. Raises
        ``RuntimeError`` when the template drops or repeats the context slot.
        """
        if not contexts:
            return LatentPrompt.from_parts([question])
        template = self.config.prompt_template
        texts = [c for c in contexts if isinstance(c, str)]
        slot = fresh_slot([question, template, *texts])
        text = template.format(context="\n".join([slot] * len(contexts)), question=question)
        first, *rest = text.split(slot)
        if len(rest) != len(contexts):
            raise RuntimeError("the prompt template dropped or repeated a context slot")
        parts: list[str | torch.Tensor] = [first]
        for context, piece in zip(contexts, rest, strict=True):
            parts += [context, piece]
        return LatentPrompt.from_parts(parts)

    def render(self, text: str) -> str:
        """``text`` as the decoder's user turn (its chat template, when used), ready to answer."""
        tok = self.tokenizer
        if not (self.config.use_chat_template and tok.chat_template):
            return text
        return tok.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )

    def render_pieces(self, pieces: Sequence[str]) -> list[str]:
        """The chat template around a prompt's pieces, split again at the latent slots.

        The pieces are joined by a fresh random delimiter that no piece contains, so no text can
        add or remove a slot. Raises ``RuntimeError`` when the template drops or repeats one.
        """
        if len(pieces) == 1:
            return [self.render(pieces[0])]
        slot = fresh_slot(pieces)
        rendered = self.render(slot.join(pieces)).split(slot)
        if len(rendered) != len(pieces):
            raise RuntimeError("the decoder's chat template dropped or repeated a latent slot")
        return rendered

    def prompt_positions(self, prompt: LatentPrompt) -> int:
        """Decoder input positions of ``prompt``: its rendered text tokens plus every latent."""
        ids = self._piece_ids([prompt])[0]
        return sum(len(i) for i in ids) + sum(int(lat.shape[0]) for lat in prompt.latents)

    def _piece_ids(self, prompts: Sequence[LatentPrompt]) -> list[list[list[int]]]:
        """Token ids of each prompt's rendered pieces; the prompts not seen yet in one batch.

        Remembered per prompt object (weakly) and its pieces: a framework call counts a prompt's
        positions (window check, usage) and then embeds it, and renders it once for both.
        """
        with self._rendered_lock:
            seen = [self._rendered.get(p) for p in prompts]
        out = [s[1] if s is not None and s[0] is p.pieces else None for s, p in zip(seen, prompts)]
        todo = [i for i, ids in enumerate(out) if ids is None]
        pieces = [self.render_pieces(prompts[i].pieces) for i in todo]
        flat = [piece for ps in pieces for piece in ps]
        flat_ids = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        for i, ps in zip(todo, pieces, strict=True):
            out[i] = [next(flat_ids) for _ in ps]
            with self._rendered_lock:
                self._rendered[prompts[i]] = (prompts[i].pieces, out[i])
        return out  # type: ignore[return-value]

    def embed_prompts(
        self, prompts: Sequence[LatentPrompt], answers: Sequence[list[int]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decoder ``inputs_embeds`` ``[B, T, d]``, attention mask ``[B, T]`` and labels.

        Each slot is expanded to its latent positions. Without ``answers`` the batch is
        left-padded for generation and the labels are ``None``; with answers (decoder token ids)
        it is right-padded and the labels ``[B, T]`` mark only the answer tokens (-100 elsewhere:
        the LM loss ignores prompt and latents).
        """
        device = self.device
        table = self.model.get_input_embeddings()
        rows, labels = [], []
        for i, (prompt, ids) in enumerate(zip(prompts, self._piece_ids(prompts), strict=True)):
            parts, part_labels = [], []
            for j, piece_ids in enumerate(ids):
                parts.append(table(torch.as_tensor(piece_ids, dtype=torch.long, device=device)))
                part_labels.append(torch.full((len(piece_ids),), -100, dtype=torch.long))
                if j < len(prompt.latents):
                    lat = prompt.latents[j].to(device=device, dtype=parts[-1].dtype)
                    parts.append(lat)
                    part_labels.append(torch.full((lat.shape[0],), -100, dtype=torch.long))
            if answers is not None:
                ans = torch.as_tensor(answers[i], dtype=torch.long)
                parts.append(table(ans.to(device)))
                part_labels.append(ans)
            rows.append(torch.cat(parts))
            labels.append(torch.cat(part_labels))
        width = max(r.shape[0] for r in rows)
        dim = rows[0].shape[1]
        embeds = rows[0].new_zeros((len(rows), width, dim))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        label_tensor = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
            n = row.shape[0]
            span = slice(width - n, width) if answers is None else slice(0, n)
            embeds[i, span] = row
            mask[i, span] = 1
            label_tensor[i, span] = lab
        return embeds, mask, (label_tensor.to(device) if answers is not None else None)

    # ------------------------------------------------------------------ generation
    def generation_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``generate`` arguments: the caller's, HF names and meanings, with our defaults.

        64 new tokens unless ``max_new_tokens`` or ``max_length`` (prompt positions included, as
        in HF) is given; a ``temperature`` above 0 samples unless ``do_sample`` says otherwise.
        """
        tok = self.tokenizer
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
        prompts (no context, full uncompressed context) on the same base model; it raises
        ``ValueError`` for a prompt with latents.
        """
        if not prompts:
            return []
        _check_base_reads_text(prompts, adapter)
        embeds, mask, _ = self.embed_prompts(prompts)
        with self.activate() as model:
            plain = model.disable_adapter() if not adapter else contextlib.nullcontext()
            with plain:
                out = model.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    **self.generation_kwargs(generate_kwargs),
                )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def stream(
        self, prompt: LatentPrompt, *, adapter: bool = True, **generate_kwargs: object
    ) -> Iterator[str]:
        """Yield the answer's text as the decoder produces it (real token streaming).

        ``generate`` runs in a thread holding the lock; closing the iterator early stops it and
        returns once the thread has ended. An error in the thread is raised here.
        ``adapter=False`` streams from the untouched base decoder, as in :meth:`complete`.
        """
        _check_base_reads_text([prompt], adapter)
        with torch.inference_mode():
            embeds, mask, _ = self.embed_prompts([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_special_tokens=True)
        kwargs = self.generation_kwargs(generate_kwargs)
        cancelled = threading.Event()
        kwargs["stopping_criteria"] = StoppingCriteriaList(
            [*kwargs.get("stopping_criteria", []), _Cancelled(cancelled)]
        )
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), self.activate() as model:
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
