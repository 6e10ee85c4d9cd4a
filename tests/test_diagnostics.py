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
    # energies (squared singular values), not Roy & Vetterli's singular values: exp(H(.8, .2))
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(1.6493, abs=1e-4)


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 2, 2)])
def test_effective_rank_rejects_what_is_not_a_matrix(bad):
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(bad)


def _adapter(directory, r=4, alpha=8, zero=False, **config):
    """A PEFT LoRA adapter directory with one update, ``layers.0.self_attn.q_proj``."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, **config}
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    torch.manual_seed(0)
    a, b = torch.randn(r, 6), torch.zeros(5, r) if zero else torch.randn(5, r)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
        directory / "adapter_model.safetensors",
    )
    return a.double(), b.double()


@pytest.fixture
def adapter_rank(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import adapter_rank

    return adapter_rank


def test_adapter_rank_scales_as_peft_does(tmp_path, adapter_rank):
    """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilized LoRA (``use_rslora``)."""
    a, b = _adapter(tmp_path / "plain")
    plain = adapter_rank.adapter_updates(tmp_path / "plain")[("q_proj", 0)]
    assert torch.allclose(plain, 2.0 * b @ a)
    a, b = _adapter(tmp_path / "rslora", use_rslora=True)
    rslora = adapter_rank.adapter_updates(tmp_path / "rslora")[("q_proj", 0)]
    assert torch.allclose(rslora, 4.0 * b @ a)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
        ({"peft_type": "LOHA"}, "LOHA"),
    ],
)
def test_adapter_rank_refuses_what_is_not_one_scale_times_b_a(
    tmp_path, adapter_rank, config, match
):
    _adapter(tmp_path, **config)
    with pytest.raises(ValueError, match=match):
        adapter_rank.adapter_updates(tmp_path)


def test_adapter_rank_names_what_is_not_an_adapter(tmp_path, adapter_rank):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        adapter_rank.adapter_updates(tmp_path)
    _adapter(tmp_path / "decoder")  # a compressor checkpoint: its adapters lie one level down
    with pytest.raises(FileNotFoundError, match="decoder"):
        adapter_rank.adapter_updates(tmp_path)
    (tmp_path / "decoder" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        adapter_rank.adapter_updates(tmp_path / "decoder")


def test_adapter_rank_reports_an_all_zero_adapter_and_writes_out(
    tmp_path, adapter_rank, monkeypatch, capsys
):
    """LoRA starts with ``B = 0``: an adapter that never trained is said to be zero, not shown
    as a table of zeros; ``--out`` into a folder not yet made writes there."""
    _adapter(tmp_path / "held", zero=True)
    out = tmp_path / "new" / "rank"
    monkeypatch.setattr("sys.argv", ["adapter_rank.py", str(tmp_path / "held"), "--out", str(out)])
    adapter_rank.main()
    printed = capsys.readouterr().out
    assert "Every update is zero" in printed and "| q_proj" not in printed
    assert out.with_suffix(".md").read_text() == printed.rstrip("\n") + "\n"
    assert out.with_suffix(".json").is_file()


@pytest.fixture
def reconstruction_bench(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import reconstruction

    return reconstruction


@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_reconstruction_slices_read_every_latent_once_in_order(
    compressor, monkeypatch, reconstruction_bench, ratio
):
    texts = [" ".join(c for c, _, _ in FACTS * k) for k in (1, 3, 6)]
    seen: list[torch.Tensor] = []

    def complete(prompts, **kwargs):
        assert kwargs["max_new_tokens"] >= max(p.latents[0].shape[0] for p in prompts) * ratio
        for p in prompts:
            seen.append(p.latents[0])
        return [f"part{len(seen) - len(prompts) + i}" for i in range(len(prompts))]

    monkeypatch.setattr(compressor, "complete", complete)
    monkeypatch.setattr(reconstruction_bench, "BATCH", 3)  # slices of one text across batches
    out = reconstruction_bench.reconstruct(compressor, texts, ratio, piece_tokens=16)
    expected = compressor.compress(texts, ratio=ratio)
    assert len(out) == len(texts)
    assert torch.equal(torch.cat(seen), torch.cat([c.latents for c in expected]))
    per_slice = 16 / ratio
    counts = [len(o.split()) for o in out]
    assert counts == [max(1, round(c.num_latents / per_slice)) for c in expected]
    assert counts[-1] > counts[0] >= 1
    assert " ".join(out).split() == [f"part{i}" for i in range(sum(counts))]


@pytest.mark.parametrize("align", ["start", "end"])
def test_latent_token_recall_lines_windows_up_with_their_latents(
    make_compressor, monkeypatch, align
):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import latent_tokens

    compressor = make_compressor(pooling_alignment=align)
    texts = [c for c, _, _ in FACTS]
    ids = compressor.tokenize(texts)
    recall = latent_tokens.token_recall(compressor, ids, 2)
    # a window's exact mean embedding lies nearest its own tokens, wherever the windows start
    assert recall["mean_embedding"][16] > 0.9
    assert all(0.0 <= v <= 1.0 for v in recall["latents"].values())


def _embedding_latents(compressor, monkeypatch) -> None:
    """Make every latent the exact mean decoder embedding of what the model pooled: the encoder's
    states are the tokens' embeddings and the converter is the identity."""
    table = compressor.decoder.get_input_embeddings().weight.detach().float()

    def encode(contexts):
        width = max(len(c) for c in contexts) + 1  # + <eos>
        hidden = torch.zeros(len(contexts), width, table.shape[1])
        for row, ids in enumerate(contexts):
            hidden[row, : len(ids)] = table[torch.as_tensor(ids)]
        return hidden, torch.zeros(len(contexts))

    monkeypatch.setattr(compressor, "encode", encode)
    monkeypatch.setattr(compressor, "converter", torch.nn.Identity())


@pytest.mark.parametrize(
    "fields",
    [
        {"pooling_alignment": "start"},
        {"pooling_alignment": "end"},
        {"pooling_alignment": "start", "fixed_ratio_alignment": "end"},  # an explicit ratio's
        {"pooling_alignment": "end", "fixed_ratio_alignment": "start"},
        {"pooling_alignment": "start", "max_segment_tokens": 10},  # segments pooled in turn
        {"pooling_alignment": "end", "max_segment_tokens": 10},
    ],
)
def test_latent_token_recall_windows_are_the_ones_the_model_pooled(
    make_compressor, monkeypatch, fields
):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import latent_tokens

    compressor = make_compressor(**fields)
    _embedding_latents(compressor, monkeypatch)
    vocab = compressor.decoder.get_input_embeddings().weight.shape[0]
    # distinct tokens, lengths that no ratio or segment size divides
    ids = [[(7 * i + 3 * n) % vocab for i in range(n)] for n in (13, 23, 30, 37)]
    recall = latent_tokens.token_recall(compressor, ids, 4)
    # latents that are their windows' exact mean embeddings score what those embeddings score
    assert recall["latents"] == pytest.approx(recall["mean_embedding"])


def test_latent_token_recall_refuses_latents_that_cover_the_eos(make_compressor, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import latent_tokens

    compressor = make_compressor(pool_eos=True)
    with pytest.raises(ValueError, match="eos"):
        latent_tokens.token_recall(compressor, [list(range(5, 12))], 2)  # 8 states, 4 latents


@pytest.fixture
def memorization(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import memorization

    return memorization


def test_memorization_swap_gives_every_question_another_paragraph(memorization):
    from semidyn_rag.data import QASample

    # questions 0-2 share a paragraph, as a sample of one article's questions often does
    paragraphs = ["p0", "p0", "p0", "p1", "p2", "p2"]
    questions = [
        QASample(id=f"q{i}", question=f"Q{i}?", contexts=[c], answers=["a"], source="squad")
        for i, c in enumerate(paragraphs)
    ]
    swapped = memorization.swap_paragraphs(questions)
    # an id of its own: a resumed evaluation must not take an answer given with other contexts
    assert [s.id for s in swapped] == ["q0@q3", "q1@q3", "q2@q3", "q3@q4", "q4@q0", "q5@q0"]
    assert [s.question for s in swapped] == [q.question for q in questions]
    assert all(s.contexts != q.contexts for s, q in zip(swapped, questions, strict=True))
    # the next question's paragraph that differs from its own, cyclically
    assert [s.contexts[0] for s in swapped] == ["p1", "p1", "p1", "p2", "p0", "p0"]
    assert memorization.swap_paragraphs(questions) == swapped
    with pytest.raises(ValueError, match="two different paragraphs"):
        memorization.swap_paragraphs(questions[:3])
    with pytest.raises(ValueError, match="two different paragraphs"):
        memorization.swap_paragraphs([])


@pytest.fixture
def fit_capacity(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fit_capacity

    return fit_capacity


def _taught(i, answer, contexts=None, teacher="taught", gold="Paris", question=None):
    from semidyn_rag.training.samples import TeacherTargets, TrainSample

    if teacher == "taught":
        teacher = TeacherTargets(answer_ids=[5], top_ids=[[5]], top_logprobs=[[0.0]])
    return TrainSample(
        id=f"s{i}",
        contexts=contexts or [f"paragraph {i % 3}"],
        question=question or f"Q{i}?",
        answer=answer,
        provenance={"kind": "distilled", "gold": gold},
        teacher=teacher,
    )


def test_fit_capacity_takes_only_right_single_paragraph_teacher_answers(fit_capacity, tmp_path):
    from semidyn_rag.training.samples import write_jsonl

    rows = [
        _taught(0, "It is Paris."),
        _taught(1, "It is Lyon."),  # the teacher's answer misses the gold span
        _taught(2, "paris, of course"),  # normalised match
        _taught(3, "Paris", contexts=["a", "b"]),  # two paragraphs
        _taught(4, "Paris", teacher=None),  # no teacher targets
        _taught(5, "Paris", gold=""),  # no gold
        _taught(6, "In Paris"),
    ]
    path = tmp_path / "teacher.jsonl"
    write_jsonl(rows, path)
    picked = fit_capacity.right_answers(path)
    assert [s.id for s in picked] == ["s0", "s2", "s6"]
    questions = fit_capacity.as_questions(picked)
    assert [q.answers for q in questions] == [["Paris"]] * 3
    assert [q.contexts for q in questions] == [s.contexts for s in picked]
    assert [s.id for s in fit_capacity.right_answers(path, 3)] == ["s0", "s2"]  # first 3 lines
    with pytest.raises(FileNotFoundError, match="teach"):
        fit_capacity.right_answers(tmp_path / "missing.jsonl")


def test_fit_capacity_holds_aside_one_right_answer_per_trained_paragraph(fit_capacity):
    rows = [
        _taught(0, "Paris", contexts=["p0"]),
        _taught(1, "Paris", contexts=["p1"]),  # p1's only answer: neither trained nor aside
        _taught(2, "Paris", contexts=["p0"]),
        _taught(3, "Paris", contexts=["p2"]),
        _taught(4, "Paris", contexts=["p0"]),
        _taught(5, "Paris", contexts=["p2"]),
        _taught(6, "Paris", contexts=["p3"]),
        _taught(7, "Paris", contexts=["p3"]),
    ]
    trained, aside = fit_capacity.split_aside(rows, 3)
    assert [s.id for s in trained] == ["s0", "s2", "s3"]
    assert [s.id for s in aside] == ["s4", "s5"]  # p3 is not reached
    trained, aside = fit_capacity.split_aside(rows, 4)
    assert [s.id for s in trained] == ["s0", "s2", "s3", "s6"]
    assert [s.id for s in aside] == ["s4", "s5", "s7"]
    # a held-aside question that training also asks (on another paragraph) is dropped
    repeated = [*rows[:5], _taught(5, "Paris", contexts=["p2"], question="Q0?")]
    assert [s.id for s in fit_capacity.split_aside(repeated, 3)[1]] == ["s4"]
    with pytest.raises(ValueError, match=r"3 right answers .* asked 5: teach more"):
        fit_capacity.split_aside(rows[:6], 5)
    every_one_asked = [
        _taught(0, "Paris", contexts=["p0"]),
        _taught(1, "Paris", contexts=["p0"], question="Q0?"),
        _taught(2, "Paris", contexts=["p1"]),
        _taught(3, "Paris", contexts=["p1"], question="Q2?"),
    ]
    with pytest.raises(ValueError, match="also asked in training"):
        fit_capacity.split_aside(every_one_asked, 2)
    with pytest.raises(ValueError, match="share one paragraph"):
        fit_capacity.split_aside(rows[:5:2], 2)


def test_fit_capacity_runs_of_other_configurations_never_share_a_checkpoint(fit_capacity):
    from semidyn_rag.training.trainer import TrainConfig

    config = TrainConfig(steps=400, batch_size=4, train_ratios=[4.0], output_dir="runs/fit")
    rows = [_taught(i, "Paris") for i in range(4)]
    key = fit_capacity.run_key("model-a", rows, config)
    assert key == fit_capacity.run_key("model-a", list(rows), config.model_copy())
    # where the run is written is not what it trains
    moved = config.model_copy(update={"output_dir": "elsewhere"})
    assert fit_capacity.run_key("model-a", rows, moved) == key
    others = [
        fit_capacity.run_key("model-b", rows, config),  # a newly shipped default
        fit_capacity.run_key("model-a", rows[:3], config),
        fit_capacity.run_key("model-a", [*rows[:3], _taught(3, "Lyon")], config),
        *(
            fit_capacity.run_key("model-a", rows, config.model_copy(update=change))
            for change in (
                {"steps": 200},
                {"train_ratios": [8.0]},
                {"mixed_precision": "bf16"},
                {"lr": 3e-4},
                {"kd_weight": 0.5},
            )
        ),
    ]
    assert len({key, *others}) == 9
