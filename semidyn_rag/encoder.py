"""The encoder: a LoRA-adapted causal LM read over ``context + <eos>``, and the ratio head on it.

One pass gives the hidden states a backbone pools and the ``<eos>`` state the ratio head reads
(with bidirectional attention that state has seen the whole context), so predicting a ratio costs
nothing beyond the pass itself. The pass runs only as deep as the layers it is asked for
(`early_exit`). `Encoder` is shared by `SemiDynamicCompressor` and the two-stage
`training.regressor.RatioRegressor`, which differ only in what they do with the states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from .config import LoraSettings


def lora_config(settings: LoraSettings) -> LoraConfig:
    """The PEFT config of one adapter (over the causal LM, whichever role it plays)."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )


def transformer_stack(model: PeftModel) -> nn.Module:
    """The transformer stack under the LM head: hidden states without paying for vocab logits."""
    return model.get_base_model().base_model


@contextlib.contextmanager
def early_exit(stack: nn.Module, depth: int) -> Iterator[None]:
    """Run only the first ``depth`` layers of ``stack`` for the duration of a call.

    The final norm is skipped too, so the last state returned is layer ``depth``'s raw output,
    exactly ``hidden_states[depth]`` of a full pass. The stack is restored on exit, also when the
    pass raises. Callers serialise passes (the stack is shared with the decoder on one base).
    """
    layers = stack.layers
    if depth >= len(layers):
        yield
        return
    norm = stack.norm
    stack.layers, stack.norm = nn.ModuleList(layers[:depth]), nn.Identity()
    try:
        yield
    finally:
        stack.layers, stack.norm = layers, norm


def eos_states(hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Each row's ``<eos>`` state ``[B, d]`` from states ``[B, T, d]`` (``<eos>`` at ``length``)."""
    rows = torch.arange(len(lengths), device=hidden.device)
    return hidden[rows, torch.as_tensor(lengths, device=hidden.device)]


def predict_y(head: nn.Module, hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """The ratio head on each row's ``<eos>`` state: ``y = log2(ratio)`` per row, ``[B]`` float32."""
    return head(eos_states(hidden, lengths)).squeeze(-1).float()


class Encoder:
    """One batched pass of ``model`` over ``context + <eos>`` rows, right-padded.

    ``pool_layer`` / ``head_layer`` choose the layers whose states :meth:`states` returns (0: the
    input embeddings; ``None``: the last layer, after the final norm); with both set the pass
    stops at the deeper of the two. Raises ``ValueError`` for a layer beyond the model's.

    The pass runs on whichever adapter of ``model`` is active: on a shared base the caller
    activates the encoder's under its model lock.
    """

    def __init__(
        self,
        model: PeftModel,
        eos_token_id: int,
        *,
        bidirectional: bool = True,
        pool_layer: int | None = None,
        head_layer: int | None = None,
    ) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.bidirectional = bidirectional
        self.pool_layer = pool_layer
        self.head_layer = head_layer
        for name, value in (("pool_layer", pool_layer), ("head_layer", head_layer)):
            if value is not None and value > self.num_layers:
                raise ValueError(f"{name} {value} > the encoder's {self.num_layers} layers")

    @property
    def num_layers(self) -> int:
        return self.model.get_base_model().config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.get_base_model().config.hidden_size

    @property
    def depth(self) -> int:
        """How many layers a pass runs: only as deep as the states it returns are read."""
        wanted = (self.pool_layer, self.head_layer)
        return self.num_layers if None in wanted else max(wanted)  # type: ignore[type-var]

    def pad(
        self, contexts: Sequence[Sequence[int]], appended: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask ``[B, max_len + 1 + appended]`` (CPU, long).

        Row ``i`` is ``contexts[i] + <eos>`` followed by ``appended`` attended positions (their
        ids are ``<eos>``; callers overwrite their embeddings), then padding.
        """
        lengths = [len(c) for c in contexts]
        width = max(lengths) + 1 + appended
        ids = torch.full((len(contexts), width), self.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for row, ctx in enumerate(contexts):
            ids[row, : len(ctx)] = torch.as_tensor(ctx, dtype=torch.long)
            mask[row, : len(ctx) + 1 + appended] = 1
        return ids, mask

    def states(
        self, contexts: Sequence[Sequence[int]], appended: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states ``[B, T, d]`` of ``pool_layer`` and of ``head_layer``, one pass.

        ``appended`` ``[m, d]``: embeddings written after every row's ``<eos>`` (learned
        compression tokens); they are attended like context positions.
        """
        extra = 0 if appended is None else appended.shape[0]
        ids, mask = self.pad(contexts, extra)
        device = self.model.get_input_embeddings().weight.device
        ids, mask = ids.to(device), mask.to(device)
        pool, head, depth = self.pool_layer, self.head_layer, self.depth
        embeds = self.model.get_input_embeddings()(ids)
        if appended is not None:
            embeds = embeds.clone()
            for row, ctx in enumerate(contexts):
                n = len(ctx)
                embeds[row, n + 1 : n + 1 + extra] = appended
        stack = transformer_stack(self.model)
        with early_exit(stack, depth):
            out = stack(
                inputs_embeds=embeds,
                attention_mask=mask,
                is_causal=not self.bidirectional,
                output_hidden_states=any(x not in (None, depth) for x in (pool, head)),
            )
        last = out.last_hidden_state  # layer `depth`: raw after an early exit, normed at the top

        def layer(index: int | None) -> torch.Tensor:
            return last if index is None or index == depth else out.hidden_states[index]

        return layer(pool), layer(head)
