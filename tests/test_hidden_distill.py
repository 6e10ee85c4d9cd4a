"""Hidden-state distillation: the decoder reading latents against the base decoder reading text."""

from __future__ import annotations

import pytest
import torch

from semidyn_rag.testing import QA_SAMPLES as SAMPLES
from semidyn_rag.testing import randomize_lora
from semidyn_rag.training.loss import (
    TrainExample,
    common_suffix,
    compressor_loss,
    hidden_state_loss,
)
from semidyn_rag.training.samples import to_examples


def test_common_suffix_counts_equal_rows_from_the_end() -> None:
    a = torch.tensor([[9.0], [1.0], [2.0], [3.0]])
    assert common_suffix(a, torch.tensor([[7.0], [8.0], [2.0], [3.0]])) == 2
    assert common_suffix(a, torch.tensor([[2.0], [3.0]])) == 2  # all of the shorter one
    assert common_suffix(a, torch.tensor([[1.0], [4.0]])) == 0
    assert common_suffix(a, a) == 4


def _batch(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T, 1]`` inputs and their mask from rows of scalars."""
    width = max(map(len, rows))
    inputs, mask = torch.zeros(len(rows), width, 1), torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        inputs[i, : len(row), 0] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return inputs, mask


def test_hidden_state_loss_compares_only_the_shared_positions() -> None:
    # student: [latent, q, a]; teacher: [text, text, q, a] -> two shared positions each
    s_in, s_mask = _batch([[0.5, 1.0, 2.0], [0.7, 0.8, 3.0, 4.0]])
    t_in, t_mask = _batch([[5.0, 6.0, 1.0, 2.0], [9.0, 3.0, 4.0]])
    teacher = [torch.randn(2, 4, 3), torch.randn(2, 4, 3) * 100]
    student = [torch.randn(2, 4, 3), torch.randn(2, 4, 3)]
    for layer_s, layer_t in zip(student, teacher, strict=True):  # copy teacher where shared
        layer_s[0, 1:3] = layer_t[0, 2:4]
        layer_s[1, 2:4] = layer_t[1, 1:3]
    assert hidden_state_loss(student, teacher, s_in, t_in, s_mask, t_mask) == 0
    student[1][1, 3] += 10.0  # one shared position of one layer off by 10 in each of 3 dims
    got = hidden_state_loss(student, teacher, s_in, t_in, s_mask, t_mask)
    shared_t = torch.cat([teacher[1][0, 2:4], teacher[1][1, 1:3]])
    want = (3 * 100.0 / shared_t.numel()) / shared_t.pow(2).mean() / 2  # mean over 2 layers
    torch.testing.assert_close(got, want)
    student[0][0, 0] += 1e6  # a position the teacher does not share changes nothing
    torch.testing.assert_close(hidden_state_loss(student, teacher, s_in, t_in, s_mask, t_mask), got)


def test_hidden_state_loss_refuses_what_cannot_be_compared() -> None:
    s_in, s_mask = _batch([[1.0, 2.0]])
    t_in, t_mask = _batch([[3.0, 4.0]])
    layer = torch.zeros(1, 2, 1)
    with pytest.raises(ValueError, match="share no position"):
        hidden_state_loss([layer], [layer], s_in, t_in, s_mask, t_mask)
    left = torch.tensor([[0.0, 1.0]])
    with pytest.raises(ValueError, match="not right-padded"):
        hidden_state_loss([layer], [layer], s_in, t_in, left, t_mask)
    with pytest.raises(ValueError, match="1 student layers against 2"):
        hidden_state_loss([layer], [layer, layer], s_in, s_in, s_mask, s_mask)


def test_to_examples_keeps_the_texts_unless_a_context_was_cut(compressor) -> None:
    whole, cut = to_examples(compressor, SAMPLES), to_examples(compressor, SAMPLES, 3)
    assert [ex.texts for ex in whole] == [s.contexts for s in SAMPLES]
    assert all(ex.texts is None for ex in cut)
    with pytest.raises(ValueError, match="1 texts for 2 contexts"):
        TrainExample(contexts=[[1], [2]], question="q", answer=[3], y=[1.0, 1.0], texts=["a"])


def test_the_term_vanishes_where_the_student_reads_what_the_teacher_reads(compressor) -> None:
    # Every context expanded to its text and a no-op LoRA: the student is the teacher.
    with torch.no_grad():
        for name, param in compressor.decoder.named_parameters():
            if "lora_B.decoder" in name:
                param.zero_()
    examples = to_examples(compressor, SAMPLES)
    for ex in examples:
        ex.as_text = list(ex.texts)
    out = compressor_loss(compressor, examples, ratio=2, hidden_weight=1.0)
    assert out.hidden_loss is not None and float(out.hidden_loss) == 0.0
    randomize_lora(compressor.decoder)
    assert float(compressor_loss(compressor, examples, ratio=2, hidden_weight=1.0).hidden_loss) > 0


def test_compressor_loss_adds_the_weighted_term_and_trains_the_decoder(compressor) -> None:
    examples = to_examples(compressor, SAMPLES)
    examples[1].texts = None  # only the first example is distilled
    plain = compressor_loss(compressor, examples, ratio=2)
    out = compressor_loss(compressor, examples, ratio=2, hidden_weight=0.5)
    assert plain.hidden_loss is None and out.hidden_loss is not None and out.hidden_loss > 0
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.hidden_loss)
    compressor.train()
    compressor.zero_grad()
    term = compressor_loss(compressor, examples, ratio=2, hidden_weight=1.0)
    (term.loss - plain.loss.detach()).backward()
    grads = [p.grad for n, p in compressor.decoder.named_parameters() if "lora_A.decoder" in n]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    for ex in examples:
        ex.texts = None
    assert compressor_loss(compressor, examples, ratio=2, hidden_weight=1.0).hidden_loss is None


def test_the_trainer_passes_its_hidden_weight_to_the_loss(compressor, monkeypatch) -> None:
    from semidyn_rag.training import TrainConfig, Trainer, loss

    calls = []
    real = loss.hidden_state_loss
    monkeypatch.setattr(loss, "hidden_state_loss", lambda *a: calls.append(1) or real(*a))
    config = TrainConfig(steps=2, batch_size=2, ratio_sampling="mode", progress=False)
    plain = Trainer(compressor, SAMPLES, config).train()
    assert calls == []
    assert [log.hidden_loss for log in plain] == [None, None]
    taught = Trainer(compressor, SAMPLES, config.model_copy(update={"hidden_weight": 0.5})).train()
    assert len(calls) == 2
    assert all(log.hidden_loss is not None and log.hidden_loss > 0 for log in taught)
    assert all(log.kd_loss is None for log in taught)  # no teacher targets in these samples


def test_the_teacher_pass_leaves_the_encoder_adapter_learning_on_a_shared_base(compressor) -> None:
    # peft's disable_adapter re-enables by set_adapter("decoder"), which freezes the encoder's
    # LoRA tensors after its graph was built: their gradient would vanish at backward.
    from semidyn_rag.training.trainer import mark_trainable

    assert compressor.encoder is compressor.decoder  # the shared base this is about
    mark_trainable(compressor)
    compressor.train()
    flags = {n: p.requires_grad for n, p in compressor.decoder.named_parameters()}
    out = compressor_loss(compressor, to_examples(compressor, SAMPLES), ratio=2, hidden_weight=1.0)
    assert out.hidden_loss is not None
    assert {n: p.requires_grad for n, p in compressor.decoder.named_parameters()} == flags
    out.loss.backward()
    grads = [p.grad for n, p in compressor.encoder.named_parameters() if "lora_A.encoder" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_trainer_refuses_a_hidden_weight_no_example_can_use(compressor) -> None:
    from semidyn_rag.training import TrainConfig, Trainer

    config = TrainConfig(steps=1, batch_size=2, hidden_weight=0.5, progress=False)
    with pytest.raises(ValueError, match="no training example carries"):
        Trainer(compressor, SAMPLES, config.model_copy(update={"max_context_tokens": 3}))
