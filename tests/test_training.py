import json
import math
from collections import Counter
from itertools import pairwise

import pytest
import torch
from safetensors.torch import load_file

from semidyn_rag import pooling
from semidyn_rag.data import QASample
from semidyn_rag.modeling import SemiDynamicCompressor
from semidyn_rag.training import (
    RatioRegressor,
    RatioRegressorConfig,
    TrainConfig,
    Trainer,
    TrainSample,
    density_label,
    evaluate_loss,
    from_qa_samples,
    list_checkpoints,
    read_jsonl,
    reconstruction_sample,
    reconstruction_samples,
    regressor_loss,
    to_examples,
    write_jsonl,
)
from semidyn_rag.training.align import align_converter, salient_tokens
from semidyn_rag.training.samples import RECONSTRUCTION_PROMPT
from semidyn_rag.training.trainer import lr_at

torch.set_num_threads(1)  # 2 shared cores: one thread avoids OpenMP spin contention

FACTS = [
    ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
    ("Alice was born in 1990 in Lyon.", "Where was Alice born?", "Lyon"),
    ("Bob moved to Oslo in 2004.", "Where did Bob move?", "Oslo"),
    ("The quick brown fox jumps over the dog.", "What jumps?", "the fox"),
    ("Berlin is the capital of Germany.", "What is the capital of Germany?", "Berlin"),
    ("The answer is forty two.", "What is the answer?", "forty two"),
]


def fixed_set() -> list[TrainSample]:
    return [
        TrainSample(contexts=[ctx], question=q, answer=a, y=[1.0 + i % 3])
        for i, (ctx, q, a) in enumerate(FACTS)
    ]


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- samples and labels ------------------------------------------------------------------------


def test_density_label_is_eq6():
    assert density_label(256, 32) == 3.0
    assert density_label(100, 100) == 0.0
    assert density_label(10, 20) == -1.0
    for bad in ((0, 5), (5, 0), (-3, 2)):
        with pytest.raises(ValueError, match="positive"):
            density_label(*bad)


def test_sample_validation_jsonl_and_qa_adapter(tmp_path):
    with pytest.raises(ValueError, match="labels for"):
        TrainSample(contexts=["a", "b"], question="q", answer="x", y=[1.0])
    with pytest.raises(ValueError, match="finite"):
        TrainSample(contexts=["a"], question="q", answer="x", y=[math.inf])
    samples = [
        *fixed_set(),
        TrainSample(contexts=["a b", "c"], question="q", answer="x", y=[None, 2]),
    ]
    path = tmp_path / "s.jsonl"
    assert write_jsonl(samples, path) == len(samples)
    assert read_jsonl(path) == samples
    path.write_text(path.read_text() + '{"contexts": []}\n')
    with pytest.raises(ValueError, match=r"line 8"):
        read_jsonl(path)
    qa = [
        QASample(
            id="1", question="q?", contexts=["c1", "c2"], answers=["a", "b"], source="hotpotqa"
        ),
        QASample(id="2", question="q?", contexts=["c"], answers=[], source="squad"),
    ]
    [converted] = from_qa_samples(qa)
    assert converted.answer == "a" and converted.contexts == ["c1", "c2"] and converted.y is None
    assert converted.source == "hotpotqa" and converted.id == "1"


def test_to_examples_truncates_and_appends_eos(compressor):
    samples = [
        TrainSample(
            contexts=[" ".join(["word"] * 50), "short"], question="q", answer="Paris", y=[None, 1.5]
        ),
    ]
    [ex] = to_examples(compressor, samples, max_context_tokens=10)
    assert len(ex.contexts[0]) == 10 and ex.contexts[1] == compressor.tokenize(["short"])[0]
    tok = compressor.decoder_tokenizer
    assert ex.answer == [*tok("Paris", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert math.isnan(ex.y[0]) and ex.y[1] == 1.5


def test_lr_schedule():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in pairwise(lrs[2:])) and lrs[-1] > 0.1
    linear = TrainConfig(steps=10, lr=1.0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(linear, 5) == pytest.approx(0.5)


def test_reconstruction_sample_targets_the_whole_context(compressor):
    text = "Paris is the capital of France and its largest city."
    sample = reconstruction_sample(text, "r1", "squad")
    assert (sample.contexts, sample.question, sample.answer) == (
        [text],
        RECONSTRUCTION_PROMPT,
        text,
    )
    assert sample.provenance["kind"] == "reconstruction" and sample.y is None
    text9 = "a b c d e f g h i"
    pieces = reconstruction_samples([text9, text9, "x y"], words=4)
    assert [p.answer for p in pieces] == ["a b c d", "e f g h", "i", "x y"]  # duplicates once
    assert [p.answer for p in reconstruction_samples([text9], words=8)] == ["a b c d e f g h"]
    [ex] = to_examples(compressor, [sample])
    assert (
        ex.answer[:-1] == compressor.decoder_tokenizer(text, add_special_tokens=False)["input_ids"]
    )


# --- the trainer -----------------------------------------------------------------------------


def test_module_lr_scale_reaches_only_the_fresh_modules(make_compressor):
    """The converter and head learn at ``lr × module_lr_scale``; LoRA and base at the schedule's."""
    model = make_compressor()
    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, module_lr_scale=8, progress=False)
    trainer = Trainer(model, to_examples(model, fixed_set()), config)
    trainer.train()
    fresh = {id(p) for n, p in model.named_parameters() if n.startswith(("converter.", "ratio_"))}
    for group in trainer.optimizer.param_groups:
        is_fresh = {id(p) in fresh for p in group["params"]}
        assert len(is_fresh) == 1, "a group mixes fresh modules with adapters"
        expected = lr_at(config, 1) * (8 if is_fresh.pop() else 1)
        assert group["lr"] == pytest.approx(expected)
    covered = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert fresh <= covered


@pytest.mark.parametrize("train_base", [False, True])
def test_training_reduces_the_loss(make_compressor, train_base):
    """30 steps on a fixed set, measured on the same set in eval mode at one ratio.

    LoRA on a frozen random tiny base cannot move the LM loss far (frozen final norm and 0.02-scale
    tied embeddings bound the logits), so there the total loss carries the check; with the base
    trained too (the from-scratch setting) the LM loss itself must fall.
    """
    model = make_compressor()
    examples = to_examples(model, fixed_set())
    before = evaluate_loss(model, examples, ratio=4)
    config = TrainConfig(
        steps=30,
        batch_size=3,
        lr=3e-3,
        warmup_steps=3,
        ratio_sampling="multi",
        train_base=train_base,
        progress=False,
    )
    history = Trainer(model, examples, config).train()
    after = evaluate_loss(model, examples, ratio=4)
    assert len(history) == 30 and {h.ratio for h in history} <= set(model.config.ratios)
    assert float(after.loss) < 0.7 * float(before.loss)
    assert float(after.mse_loss) < 0.1 * float(before.mse_loss)
    assert float(after.lm_loss) < (0.7 if train_base else 0.95) * float(before.lm_loss)
    assert not model.training


def test_resume_gives_the_same_state(make_compressor, tmp_path):
    def run(steps: int, resume: bool, out) -> tuple[Trainer, dict]:
        model = make_compressor()
        config = TrainConfig(
            steps=steps,
            batch_size=2,
            grad_accum=2,
            lr=1e-3,
            warmup_steps=2,
            output_dir=str(out),
            save_every=3,
            resume_from="auto" if resume else None,
            progress=False,
            weight_decay=0.1,
        )
        trainer = Trainer(model, fixed_set(), config)
        trainer.train()
        return trainer, state_of(model)

    straight, params_a = run(6, False, tmp_path / "a")
    run(3, False, tmp_path / "b")
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-3"]
    resumed, params_b = run(6, True, tmp_path / "b")
    assert resumed.history == straight.history
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    opt_a = load_file(tmp_path / "a" / "trainer-state" / "checkpoint-6" / "optimizer.safetensors")
    opt_b = load_file(tmp_path / "b" / "trainer-state" / "checkpoint-6" / "optimizer.safetensors")
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    # the checkpoint is also a loadable compressor
    loaded = SemiDynamicCompressor.from_pretrained(tmp_path / "b" / "checkpoint-6")
    text = FACTS[0][0]
    assert torch.allclose(
        loaded.compress([text], ratio=2)[0].latents,
        resumed.model.compress([text], ratio=2)[0].latents,
    )


def test_train_base_checkpoint_carries_the_base(make_compressor, tmp_path):
    model = make_compressor()
    embed = model.encoder.get_input_embeddings().weight.detach().clone()
    config = TrainConfig(
        steps=2, batch_size=3, lr=1e-2, train_base=True, output_dir=str(tmp_path), progress=False
    )
    Trainer(model, fixed_set(), config).train()
    assert not torch.equal(embed, model.encoder.get_input_embeddings().weight)
    loaded = SemiDynamicCompressor.from_pretrained(tmp_path / "checkpoint-2")
    assert loaded.config.encoder_model.endswith("checkpoint-2/base")
    text = FACTS[1][0]
    torch.testing.assert_close(
        loaded.compress([text], ratio=4)[0].latents, model.compress([text], ratio=4)[0].latents
    )
    assert loaded.generate("Who?", [text], max_new_tokens=4) == model.generate(
        "Who?", [text], max_new_tokens=4
    )


def test_ratio_regressor_two_stage(tiny_dir, compressor, tmp_path):
    torch.manual_seed(0)
    reg = RatioRegressor.from_config(RatioRegressorConfig(base_model=str(tiny_dir)))
    samples = [
        TrainSample(contexts=[ctx], question="q", answer="a", y=[1.0 if len(ctx) < 31 else 4.0])
        for ctx, _, _ in FACTS
    ]
    examples = to_examples(reg, samples)
    before = float(evaluate_loss(reg, examples, loss_fn=regressor_loss).mse_loss)
    config = TrainConfig(steps=25, batch_size=6, lr=1e-2, ratio_sampling="mode", progress=False)
    Trainer(reg, examples, config, loss_fn=regressor_loss).train()
    after = float(evaluate_loss(reg, examples, loss_fn=regressor_loss).mse_loss)
    assert after < 0.5 * before
    with pytest.raises(ValueError, match="no decoder to distil into"):
        regressor_loss(reg, examples, kd_weight=0.5)
    reg.save_pretrained(tmp_path)
    loaded = RatioRegressor.from_pretrained(tmp_path)
    texts = [ctx for ctx, _, _ in FACTS]
    assert loaded.predict(texts) == pytest.approx(reg.predict(texts), abs=1e-5)
    outs = loaded.compress_with(compressor, texts, scale=1.0)
    for out, y in zip(outs, loaded.predict(texts)):
        assert out.predicted_y == pytest.approx(y, abs=1e-5)
        assert out.ratio == min(compressor.config.ratios, key=lambda r: abs(r - 2 ** (y + 1)))


def test_cli_train_and_train_regressor(tiny_dir, tmp_path, capsys):
    from semidyn_rag.cli import main

    data = tmp_path / "train.jsonl"
    write_jsonl(fixed_set(), data)
    out = tmp_path / "run"
    args = [
        "train",
        "--encoder-model",
        str(tiny_dir),
        "--converter-hidden",
        "32",
        "--ratios",
        "[2,4]",
        "--samples",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--output-dir",
        str(out),
        "--progress",
        "false",
        "--module-lr-scale",
        "3",
        "--reconstruction-words",
        "4",
    ]
    assert main(["-q", *args]) == 0
    assert '"steps": 2' in capsys.readouterr().out
    state = json.loads((out / "trainer-state" / "checkpoint-2" / "state.json").read_text())
    assert state["train_config"]["module_lr_scale"] == 3.0
    model = SemiDynamicCompressor.from_pretrained(out / "checkpoint-2")
    assert model.config.ratios == [2, 4]
    reg_out = tmp_path / "reg"
    reg = [
        "train-regressor",
        "--base-model",
        str(tiny_dir),
        "--samples",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "3",
        "--output-dir",
        str(reg_out),
        "--progress",
        "false",
    ]
    assert main(["-q", *reg]) == 0
    assert len(RatioRegressor.from_pretrained(reg_out / "checkpoint-2").predict(["x y"])) == 1


# --- converter alignment -----------------------------------------------------------------------


def test_align_converter_fits_pooled_embeddings(make_compressor):
    model = make_compressor()
    contexts = model.tokenize([ctx for ctx, _, _ in FACTS] * 3)
    before, after = align_converter(model, contexts, steps=150, lr=3e-3, progress=False)
    assert before > 1.0 and after < 0.5 * before
    # an explicit check of what was fitted: latents now point like the tokens they pool
    table = model.decoder.get_input_embeddings().weight
    [ctx] = model.compress([FACTS[0][0]], ratio=2)
    ids = torch.as_tensor(model.tokenize([FACTS[0][0]])[0][:2])
    target = table[ids].mean(0)
    assert torch.cosine_similarity(ctx.latents[0].float(), target.float(), dim=0) > 0.3
    with pytest.raises(ValueError, match="mean_pooling"):
        align_converter(make_compressor(backbone="last_tokens"), contexts, progress=False)


def test_salient_tokens_follow_the_pooling_windows():
    counts = {1: 9, 2: 1, 3: 5, 4: 2, 5: 7}
    ids = [1, 2, 3, 4, 5]
    # start: [1 2] [3 4] [5]; end: [1] [2 3] [4 5] (the front pad only shortens the first window)
    assert salient_tokens(ids, 2, "start", counts) == [2, 4, 5]
    assert salient_tokens(ids, 2, "end", counts) == [1, 2, 4]
    assert salient_tokens(ids, 8, "start", counts) == [2]
    assert salient_tokens([3, 3, 5], 2, "start", counts) == [3, 5]  # ties: the first one
    for align in ("start", "end"):
        assert len(salient_tokens(ids, 4, align, counts)) == pooling.num_windows(5, 4)


def test_align_converter_to_salient_tokens(make_compressor):
    model = make_compressor()
    contexts = model.tokenize([ctx for ctx, _, _ in FACTS] * 3)
    table = model.decoder.get_input_embeddings().weight
    ids = model.tokenize([FACTS[0][0]])[0]
    counts = Counter(t for c in contexts for t in c)
    picked = table[salient_tokens(ids, 2, model.config.pooling_alignment, counts)].float()

    def cosine_to_picked() -> float:
        [ctx] = model.compress([FACTS[0][0]], ratio=2)
        return float(torch.cosine_similarity(ctx.latents.float(), picked, dim=-1).mean())

    start = cosine_to_picked()
    before, after = align_converter(
        model, contexts, steps=150, lr=3e-3, target="salient", progress=False
    )
    assert after < 0.5 * before
    assert cosine_to_picked() > start + 0.15


def test_no_stale_gradient_reaches_the_first_step(make_compressor):
    contexts = [ctx for ctx, _, _ in FACTS]
    aligned = make_compressor()
    align_converter(aligned, aligned.tokenize(contexts), steps=5, progress=False)
    assert all(p.grad is None for p in aligned.converter.parameters())
    # a gradient left on a tensor by anything before training must not be applied by step 1
    config = TrainConfig(steps=1, batch_size=2, progress=False)
    clean, stale = make_compressor(), make_compressor()
    for param in stale.converter.parameters():
        param.grad = torch.full_like(param, 1e3)
    for model in (clean, stale):
        Trainer(model, to_examples(model, fixed_set()), config).train()
    assert torch.equal(clean.converter.down_proj.weight, stale.converter.down_proj.weight)


def test_trainer_aligns_once_before_step_zero(make_compressor, tmp_path):
    model = make_compressor()
    config = TrainConfig(
        steps=2, batch_size=2, align_steps=20, output_dir=str(tmp_path), progress=False
    )
    start = model.converter.down_proj.weight.detach().clone()
    trainer = Trainer(model, to_examples(model, fixed_set()), config)
    trainer.train()
    assert not torch.equal(start, model.converter.down_proj.weight)
    resumed = make_compressor()
    more = config.model_copy(update={"steps": 3, "resume_from": "auto"})
    calls = []
    again = Trainer(resumed, to_examples(resumed, fixed_set()), more)
    again._align = lambda: calls.append(1)
    again.train()
    assert calls == [] and again.step == 3


@pytest.mark.parametrize(
    ("warmup", "held", "fields"),
    [
        ("decoder_warmup_steps", {"lora_A.decoder"}, {}),
        ("encoder_warmup_steps", {"lora_A.encoder", "converter."}, {}),
        # the head reads the last layer while an earlier one is pooled: it still learns
        ("encoder_warmup_steps", {"lora_A.encoder", "converter."}, {"pool_layer": 1}),
    ],
)
def test_warmup_holds_one_side_then_releases_it(make_compressor, warmup, held, fields):
    model = make_compressor(**fields)
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, progress=False, **{warmup: 2})
    trainer = Trainer(model, to_examples(model, fixed_set()), config)
    names = {"lora_A.decoder", "lora_A.encoder", "converter.", "ratio_head."}
    snapshots = []
    for _ in range(3):
        snapshots.append(state_of(model))
        trainer._optimizer_step()
    snapshots.append(state_of(model))

    def moved(key: str, step: int) -> bool:
        a, b = snapshots[step], snapshots[step + 1]
        return any(not torch.equal(a[n], b[n]) for n in a if key in n)

    assert {k for k in names if moved(k, 0) or moved(k, 1)} == names - held
    assert all(moved(k, 2) for k in held)  # released after the warmup


def test_resume_names_an_optimizer_layout_mismatch(make_compressor, tmp_path):
    model = make_compressor()
    config = TrainConfig(steps=1, batch_size=2, output_dir=str(tmp_path), progress=False)
    Trainer(model, to_examples(model, fixed_set()), config).train()
    state_file = tmp_path / "trainer-state" / "checkpoint-1" / "state.json"
    state = json.loads(state_file.read_text())
    state["param_groups"] = state["param_groups"][:2]  # as written before module_lr_scale
    state_file.write_text(json.dumps(state))
    again = make_compressor()
    more = config.model_copy(update={"steps": 2, "resume_from": "auto"})
    with pytest.raises(ValueError, match="optimizer groups"):
        Trainer(again, to_examples(again, fixed_set()), more).train()


@pytest.mark.parametrize(
    ("update", "data", "named"),
    [
        ({"batch_size": 4}, 6, "examples_per_step 2 -> 4"),
        ({"grad_accum": 2}, 6, "examples_per_step 2 -> 4"),
        ({"seed": 1}, 6, "seed 0 -> 1"),
        ({"train_ratios": [2.0]}, 6, "ratios"),
        ({}, 4, "examples 6 -> 4"),
    ],
)
def test_resume_refuses_to_finish_a_run_with_other_draws(
    make_compressor, tmp_path, update, data, named
):
    samples = fixed_set()
    assert len(samples) == 6
    config = TrainConfig(steps=3, batch_size=2, output_dir=str(tmp_path), progress=False)
    interrupted = config.model_copy(update={"steps": 1})
    Trainer(make_compressor(), samples, interrupted).train()
    state = tmp_path / "trainer-state" / "checkpoint-1" / "state.json"
    written = json.loads(state.read_text())
    written["train_config"]["steps"] = 3  # as if killed after step 1 of 3
    state.write_text(json.dumps(written))
    again = config.model_copy(update={"resume_from": "auto", **update})
    with pytest.raises(ValueError, match=named):
        Trainer(make_compressor(), samples[:data], again).train()
    # the checkpoint is untouched: the same draw finishes the run, however the batch is split
    split = config.model_copy(update={"resume_from": "auto", "batch_size": 1, "grad_accum": 2})
    resumed = Trainer(make_compressor(), samples, split)
    resumed.train()
    assert resumed.step == 3 and len(resumed.history) == 3


def test_a_finished_run_continues_as_a_next_phase_with_other_draws(make_compressor, tmp_path):
    """`recipes/default.py train` runs three phases in one output_dir, each continuing the last
    with other ratios and more examples; rerunning an earlier phase later trains nothing."""
    samples = fixed_set()
    first = TrainConfig(steps=1, batch_size=2, output_dir=str(tmp_path), progress=False)
    Trainer(make_compressor(), samples[:4], first).train()
    second = first.model_copy(update={"steps": 2, "resume_from": "auto", "train_ratios": [4.0]})
    Trainer(make_compressor(), samples, second).train()
    again = first.model_copy(update={"resume_from": "auto"})
    rerun = Trainer(make_compressor(), samples[:4], again)
    assert rerun.train() and rerun.step == 2


def test_micro_batches_of_a_step_are_the_examples_of_one_larger_batch(make_compressor):
    model, samples = make_compressor(), fixed_set()
    whole = Trainer(model, samples, TrainConfig(steps=3, batch_size=4, progress=False))
    split = Trainer(
        model, samples, TrainConfig(steps=3, batch_size=2, grad_accum=2, progress=False)
    )
    for step in range(3):
        assert split.batch(step, 0) + split.batch(step, 1) == whole.batch(step, 0)
        assert split.ratio_for(step) == whole.ratio_for(step)


def test_train_ratios_restrict_multi_ratio_sampling(make_compressor):
    model = make_compressor()
    config = TrainConfig(steps=1, batch_size=2, progress=False, train_ratios=[2, 4])
    trainer = Trainer(model, to_examples(model, fixed_set()), config)
    assert {trainer.ratio_for(step) for step in range(50)} == {2.0, 4.0}
    with pytest.raises(ValueError, match=r"train_ratios \[3.0\] are not in the model's"):
        Trainer(model, fixed_set(), TrainConfig(steps=1, progress=False, train_ratios=[2, 3]))


# --- what a run tells and what it writes ---------------------------------------------------------


def test_training_without_density_labels_says_so(make_compressor, caplog):
    samples = [s.model_copy(update={"y": None}) for s in fixed_set()]
    config = TrainConfig(steps=2, batch_size=2, log_every=1, progress=False)
    with caplog.at_level("INFO", logger="semidyn_rag.training.trainer"):
        trainer = Trainer(make_compressor(), samples, config)
        trainer.train()
    assert trainer.labelled == 0
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "density label" in warnings[0].getMessage()
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(steps) == 2 and all("mse n/a: no density labels" in m for m in steps)


def test_labelled_or_headless_training_does_not_warn(make_compressor, caplog):
    unlabelled = [s.model_copy(update={"y": None}) for s in fixed_set()]
    config = TrainConfig(steps=1, batch_size=2, progress=False)
    with caplog.at_level("WARNING", logger="semidyn_rag.training.trainer"):
        Trainer(make_compressor(), fixed_set(), config)  # labelled
        Trainer(make_compressor(mode="fixed_ratio", fixed_ratio=2), unlabelled, config)
        Trainer(make_compressor(), unlabelled, config.model_copy(update={"mse_weight": 0.0}))
    assert not caplog.records


def test_a_checkpoint_holds_only_what_ships(make_compressor, tmp_path):
    config = TrainConfig(steps=2, batch_size=2, output_dir=str(tmp_path), progress=False)
    Trainer(make_compressor(), fixed_set(), config).train()
    shipped = tmp_path / "checkpoint-2"
    files = sorted(p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file())
    assert files == [
        "decoder/adapter_config.json",
        "decoder/adapter_model.safetensors",
        "encoder/adapter_config.json",
        "encoder/adapter_model.safetensors",
        "modules.safetensors",
        "semidyn_config.json",
    ]
    for adapter in ("encoder", "decoder"):
        base = json.loads((shipped / adapter / "adapter_config.json").read_text())
        assert not base["base_model_name_or_path"].startswith("/")
    state = tmp_path / "trainer-state" / "checkpoint-2"
    assert (state / "state.json").is_file() and (state / "optimizer.safetensors").is_file()
    assert list_checkpoints(tmp_path) == [shipped]
    # a copy of the shipped directory loads, and says what is missing when resumed
    copy = tmp_path / "copy" / "checkpoint-2"
    import shutil

    shutil.copytree(shipped, copy)
    SemiDynamicCompressor.from_pretrained(copy)
    trainer = Trainer(make_compressor(), fixed_set(), config)
    with pytest.raises(FileNotFoundError, match="no trainer state"):
        trainer.load_state(copy)


def test_checkpoints_of_the_old_layout_still_resume(make_compressor, tmp_path):
    config = TrainConfig(steps=2, batch_size=2, output_dir=str(tmp_path), progress=False)
    Trainer(make_compressor(), fixed_set(), config).train()
    (tmp_path / "trainer-state" / "checkpoint-2").rename(tmp_path / "checkpoint-2" / "trainer")
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    resumed = Trainer(make_compressor(), fixed_set(), config.model_copy(update={"steps": 3}))
    resumed.load_state(tmp_path / "checkpoint-2")
    assert resumed.step == 2
