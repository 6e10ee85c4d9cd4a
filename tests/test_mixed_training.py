"""Training on prompts that mix plain-text and latent contexts (selective expansion)."""

from __future__ import annotations

import math

import pytest
import torch

from semidyn_rag.training.loss import TrainExample, compressor_loss
from semidyn_rag.training.samples import TrainSample, read_jsonl, to_examples, write_jsonl

CONTEXTS = [
    "Alice was born in 1990 in Lyon and studied music.",
    "Bob moved to Oslo in 2004 to work on ships.",
    "Carol keeps bees on a roof in Lisbon.",
]


def _sample(expanded):
    return TrainSample(
        contexts=CONTEXTS,
        question="Where was Alice born?",
        answer="Lyon",
        y=[1.0, 2.0, 3.0],
        expanded=expanded,
    )


class _Spy:
    """Records what the encoder and the decoder's prompt builder receive."""

    def __init__(self, model, monkeypatch):
        self.encoded: list[list[int]] = []
        self.prompts = []
        encoder_states, embed_prompts = model.encoder_states, model.embed_prompts

        def spy_encoder(contexts):
            self.encoded += [list(c) for c in contexts]
            return encoder_states(contexts)

        def spy_embed(prompts, answers=None):
            self.prompts += list(prompts)
            return embed_prompts(prompts, answers)

        monkeypatch.setattr(model, "encoder_states", spy_encoder)
        monkeypatch.setattr(model, "embed_prompts", spy_embed)


def test_to_examples_carries_the_text_of_expanded_contexts_only(compressor):
    [ex] = to_examples(compressor, [_sample([False, True, False])])
    assert ex.as_text == [None, CONTEXTS[1], None]
    assert ex.compressed() == [0, 2]
    [plain] = to_examples(compressor, [_sample(None)])
    assert plain.as_text is None and plain.compressed() == [0, 1, 2]


def test_expanded_flags_round_trip_and_are_validated(tmp_path):
    write_jsonl([_sample([True, False, False])], tmp_path / "s.jsonl")
    assert read_jsonl(tmp_path / "s.jsonl")[0].expanded == [True, False, False]
    with pytest.raises(ValueError, match="2 expanded flags for 3 contexts"):
        _sample([True, False])
    with pytest.raises(ValueError, match="1 as_text entries for 2 contexts"):
        TrainExample(contexts=[[1], [2]], question="q", answer=[1], y=[0.0, 0.0], as_text=["a"])


def test_the_decoder_reads_expanded_contexts_as_text_in_retrieval_order(compressor, monkeypatch):
    spy = _Spy(compressor, monkeypatch)
    [ex] = to_examples(compressor, [_sample([False, True, False])])
    compressor_loss(compressor, [ex], ratio=2)
    assert spy.encoded == [ex.contexts[0], ex.contexts[2]]  # the expanded one is not encoded
    [prompt] = spy.prompts
    assert len(prompt.latents) == 2
    text = "".join(prompt.pieces)
    assert CONTEXTS[1] in text and CONTEXTS[0] not in text and CONTEXTS[2] not in text
    # context order is kept: latent, text, latent
    assert CONTEXTS[1] in prompt.pieces[1] and CONTEXTS[1] not in prompt.pieces[0]


def test_mixed_loss_equals_the_loss_on_the_prompt_inference_builds(compressor):
    """Training sees what `expand_top_k` sends at inference: the same latents, the same text."""
    [ex] = to_examples(compressor, [_sample([True, False, False])])
    got = compressor_loss(compressor, [ex], ratio=2, mse_weight=0.0).lm_loss
    done = compressor.compress(CONTEXTS[1:], ratio=2)
    prompt = compressor.latent_prompt(ex.question, [CONTEXTS[0], *(c.latents for c in done)])
    embeds, mask, targets = compressor.embed_prompts([prompt], [ex.answer])
    with torch.no_grad(), compressor.adapter("decoder") as decoder:
        logits = decoder(inputs_embeds=embeds, attention_mask=mask).logits
    want = torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets[0, 1:])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mse_counts_only_compressed_contexts(compressor):
    [ex] = to_examples(compressor, [_sample([False, True, True])])
    out = compressor_loss(compressor, [ex], ratio=2)
    [only] = to_examples(compressor, [_sample(None)])
    only.contexts, only.y = only.contexts[:1], only.y[:1]  # the compressed context alone
    alone = compressor_loss(compressor, [only], ratio=2)
    torch.testing.assert_close(out.mse_loss, alone.mse_loss)


def test_a_fully_expanded_batch_trains_the_decoder_without_encoding(compressor, monkeypatch):
    spy = _Spy(compressor, monkeypatch)
    [ex] = to_examples(compressor, [_sample([True, True, True])])
    compressor.train()
    out = compressor_loss(compressor, [ex], ratio=2)
    assert spy.encoded == [] and spy.prompts[0].latents == ()
    assert math.isfinite(out.loss.item()) and float(out.mse_loss) == 0.0
    out.loss.backward()
    grads = [p.grad for n, p in compressor.decoder.named_parameters() if "lora" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_mixed_and_compressed_examples_share_a_batch(compressor):
    examples = to_examples(compressor, [_sample([False, True, False]), _sample(None)])
    compressor.train()
    out = compressor_loss(compressor, examples, ratio=4)
    out.loss.backward()
    enc = [p.grad for n, p in compressor.encoder.named_parameters() if "lora" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in enc)  # latents still train the encoder
