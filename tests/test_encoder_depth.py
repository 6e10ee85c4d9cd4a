"""Early exit: the encoder runs only as deep as pooling and the ratio head read."""

from __future__ import annotations

import pytest
import torch

from semidyn_rag.config import CompressorConfig
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.testing import randomize_lora
from semidyn_rag.tiny import build_qwen3
from semidyn_rag.training.loss import TrainExample, compressor_loss

TEXTS = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, tokenizer):
    return build_qwen3(tmp_path_factory.mktemp("deep_qwen3"), tokenizer, num_layers=4)


def _make(deep_dir, **fields) -> SemiDynamicCompressor:
    torch.manual_seed(0)
    config = CompressorConfig(encoder_model=str(deep_dir), converter_hidden=48, **fields)
    return randomize_lora(SemiDynamicCompressor.from_config(config)).eval()


def _inner(model: SemiDynamicCompressor):
    return model.encoder.get_base_model().model


def _full_pass(model: SemiDynamicCompressor, ids: list[list[int]]) -> tuple:
    """Reference: every layer, all hidden states, no early exit."""
    eos = model.tokenizer.eos_token_id
    width = max(map(len, ids)) + 1
    batch = torch.full((len(ids), width), eos)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        batch[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x) + 1] = 1
    model.encoder.set_adapter("encoder")
    with torch.no_grad():
        out = _inner(model)(
            input_ids=batch, attention_mask=mask, is_causal=False, output_hidden_states=True
        )
    return out.hidden_states, out.last_hidden_state


def _calls(model: SemiDynamicCompressor) -> list[int]:
    calls: list[int] = []
    for i, layer in enumerate(_inner(model).layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    return calls


@pytest.mark.parametrize(("pool", "head"), [(1, 1), (1, 2), (2, 1), (0, 0)])
def test_early_exit_matches_a_full_pass(deep_dir, pool, head):
    model = _make(deep_dir, pool_layer=pool, head_layer=head)
    ids = model.tokenize(TEXTS)
    states, _ = _full_pass(model, ids)
    calls = _calls(model)
    with torch.no_grad():
        hidden, y = model.encode(ids)
    assert sorted(set(calls)) == list(range(max(pool, head)))  # deeper layers never ran
    width = hidden.shape[1]
    torch.testing.assert_close(hidden, states[pool][:, :width])
    eos_rows = states[head][torch.arange(len(ids)), torch.tensor([len(x) for x in ids])]
    torch.testing.assert_close(y, model.ratio_head(eos_rows).squeeze(-1).float())


def test_head_on_the_last_layer_runs_every_layer(deep_dir):
    model = _make(deep_dir, pool_layer=1)
    assert model.encoder_depth == 4
    ids = model.tokenize(TEXTS)
    _, last = _full_pass(model, ids)
    calls = _calls(model)
    with torch.no_grad():
        _, y = model.encode(ids)
    assert sorted(set(calls)) == [0, 1, 2, 3]
    eos_rows = last[torch.arange(len(ids)), torch.tensor([len(x) for x in ids])]
    torch.testing.assert_close(y, model.ratio_head(eos_rows).squeeze(-1).float())


def test_the_stack_is_whole_again_for_the_decoder(deep_dir):
    model = _make(deep_dir, pool_layer=1, head_layer=1)
    inner = _inner(model)
    layers, norm = inner.layers, inner.norm
    model.compress(TEXTS, ratio=2)
    assert inner.layers is layers and inner.norm is norm and len(inner.layers) == 4
    calls = _calls(model)
    model.generate("Where?", TEXTS, ratio=2, max_new_tokens=2)
    assert {2, 3} <= set(calls)  # the shared base decodes with all its layers


def test_the_stack_is_restored_when_the_pass_fails(deep_dir):
    model = _make(deep_dir, pool_layer=1, head_layer=1)
    inner = _inner(model)
    layers = inner.layers
    with pytest.raises(RuntimeError, match="boom"):

        def boom(*_):
            raise RuntimeError("boom")

        handle = layers[0].register_forward_hook(boom)
        try:
            model.encode(model.tokenize(TEXTS))
        finally:
            handle.remove()
    assert inner.layers is layers and len(inner.layers) == 4


def test_a_head_layer_beyond_the_encoder_is_refused(deep_dir):
    with pytest.raises(ValueError, match="head_layer 9 > the encoder's 4 layers"):
        _make(deep_dir, pool_layer=1, head_layer=9)


def test_the_head_still_learns_at_an_early_layer(deep_dir):
    model = _make(deep_dir, pool_layer=1, head_layer=1).train()
    ids = model.tokenize(TEXTS)
    examples = [
        TrainExample(contexts=[x], question="q", answer=[5, model.tokenizer.eos_token_id], y=[2.0])
        for x in ids
    ]
    out = compressor_loss(model, examples, ratio=2, encoder_grad=False)
    out.loss.backward()
    assert model.ratio_head.weight.grad is not None
    assert model.ratio_head.weight.grad.abs().sum() > 0
