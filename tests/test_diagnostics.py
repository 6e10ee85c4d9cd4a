import dataclasses

import pytest
import torch

from semidyn_rag.training import (
    TrainConfig,
    Trainer,
    TrainSample,
    latent_use,
    relative_spread,
    to_examples,
)
from semidyn_rag.training.diagnostics import effective_rank, swap_contexts

torch.set_num_threads(1)

FACTS = [
    ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
    ("Alice was born in 1990 in Lyon.", "Where was Alice born?", "Lyon"),
    ("Bob moved to Oslo in 2004.", "Where did Bob move?", "Oslo"),
    ("Berlin is the capital of Germany.", "What is the capital of Germany?", "Berlin"),
]


def samples() -> list[TrainSample]:
    return [TrainSample(contexts=[c], question=q, answer=a, y=[1.0]) for c, q, a in FACTS]


def test_swap_contexts_rotates_contexts_and_keeps_questions(compressor):
    examples = to_examples(compressor, samples())
    swapped = swap_contexts(examples)
    assert [e.question for e in swapped] == [e.question for e in examples]
    assert [e.contexts for e in swapped] == [e.contexts for e in examples[-1:] + examples[:-1]]
    with pytest.raises(ValueError, match="two examples"):
        swap_contexts(examples[:1])


def test_latent_use_sees_latents_that_matter_and_latents_that_do_not(compressor):
    examples = to_examples(compressor, samples())
    shortest = min(len(e.contexts[0]) for e in examples)  # equal lengths: only content differs
    examples = [dataclasses.replace(e, contexts=[e.contexts[0][:shortest]]) for e in examples]
    read = latent_use(compressor, examples, ratio=2)
    assert abs(read.gap) > 1e-5  # random adapters: the latents move the loss a little
    with torch.no_grad():  # a converter that writes the same vector everywhere: the collapse
        compressor.converter.down_proj.weight.zero_()
    ignored = latent_use(compressor, examples, ratio=2)
    assert ignored.gap == pytest.approx(0.0, abs=1e-6)
    assert ignored.own_loss == pytest.approx(ignored.other_loss, abs=1e-6)


def test_relative_spread():
    torch.manual_seed(0)
    assert relative_spread(torch.randn(64, 32)) == pytest.approx(1.0, abs=0.1)
    same = torch.randn(1, 32).repeat(64, 1)
    assert relative_spread(same) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="latents"):
        relative_spread(torch.randn(1, 32))


def test_trainer_logs_latent_use_during_training(make_compressor):
    model = make_compressor()
    config = TrainConfig(steps=4, batch_size=2, eval_every=2, progress=False)
    trainer = Trainer(model, samples(), config, eval_samples=samples())
    trainer.train()
    assert [step for step, _ in trainer.latent_use] == [2, 4]
    with pytest.raises(ValueError, match="eval_samples"):
        Trainer(model, samples(), config)


def test_effective_rank_counts_the_directions_that_carry_energy():
    torch.manual_seed(0)
    u, v = torch.randn(40, 1), torch.randn(1, 30)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    q, _ = torch.linalg.qr(torch.randn(40, 8))
    assert effective_rank(q @ torch.eye(8)) == pytest.approx(8.0, rel=1e-6)
    skewed = q @ torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1]))
    assert 1.0 < effective_rank(skewed) < 2.0
    assert effective_rank(torch.zeros(4, 4)) == 0.0


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 2, 2)])
def test_effective_rank_rejects_what_is_not_a_matrix(bad):
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(bad)
