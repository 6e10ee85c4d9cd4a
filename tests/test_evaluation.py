import json
import logging
import math

import pytest
import torch

from semidyn_rag.data import QASample
from semidyn_rag.evaluation import (
    CheckpointRef,
    EvalSetting,
    Evaluator,
    SettingResult,
    default_settings,
    pareto_points,
    parse_setting,
    plot_pareto,
    results_table,
    select_settings,
)
from semidyn_rag.metrics import EvalRecord, summarize

SAMPLES = [
    QASample(
        id=f"q{i}",
        question="Where is the fox?",
        contexts=["The quick brown fox jumps over the lazy dog near the river bank."] * (1 + i % 2),
        answers=["river bank"],
        source="test",
    )
    for i in range(5)
]


def test_settings_cover_baselines_ratios_and_sweep(compressor):
    names = [s.name for s in default_settings(compressor, scales=[-1, 0, 1])]
    assert names[:2] == ["no_context", "full_context"]
    assert "fixed_ratio_8" in names and "semi_dynamic_scale_+1" in names


def test_evaluation_writes_table_plot_and_resumes(compressor, tmp_path):
    settings = [
        EvalSetting(kind="no_context"),
        EvalSetting(kind="full_context"),
        EvalSetting(kind="fixed_ratio", ratio=4),
        EvalSetting(kind="semi_dynamic", scale=0.5),
    ]
    evaluator = Evaluator(compressor, SAMPLES, tmp_path, batch_size=2, max_new_tokens=4)
    results = evaluator.run(settings)
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "results.md", "pareto.png"}
    fixed = next(r for r in results if r.name == "fixed_ratio_4").summary
    tokens = sum(evaluator._token_counts.values())
    # every sample's latents are ceil(L/4) per context: the plain average is close to 4
    assert 3 <= fixed.avg_ratio <= 4 and fixed.n == 5
    assert json.loads((tmp_path / "results.json").read_text())[0]["name"] == "no_context"
    full = next(r for r in results if r.name == "full_context").summary
    assert full.avg_ratio == 1.0 and tokens > 0

    # an interrupted run: drop two records and cut the last line; a rerun only redoes those
    path = tmp_path / "records" / "fixed_ratio_4.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    calls = []
    original = compressor.complete
    compressor.complete = lambda prompts, **kw: (
        calls.append(len(prompts)) or original(prompts, **kw)
    )
    again = evaluator.run_setting(settings[2])
    del compressor.complete
    # latencies of the two redone samples are new measurements; everything else is the same
    assert sum(calls) == 2
    assert again.summary.model_dump(exclude={"latency_s"}) == fixed.model_dump(
        exclude={"latency_s"}
    )
    assert again.summary.latency_s is not None and again.summary.latency_s > 0


def test_resume_refuses_records_of_another_compressor(make_compressor, tmp_path):
    """Stale answers of an earlier model must not count for a retrained one in the same dir."""
    setting = EvalSetting(kind="fixed_ratio", ratio=4)
    first = Evaluator(make_compressor(), SAMPLES[:2], tmp_path, max_new_tokens=4)
    first.run_setting(setting)
    before = (tmp_path / "records" / "fixed_ratio_4.jsonl").read_text()
    other = make_compressor()
    with torch.no_grad():
        other.converter.down_proj.weight.mul_(2)  # "retrained": another fingerprint
    with pytest.raises(ValueError, match="holds answers written by compressor"):
        Evaluator(other, SAMPLES[:2], tmp_path, max_new_tokens=4).run_setting(setting)
    assert (tmp_path / "records" / "fixed_ratio_4.jsonl").read_text() == before
    # the text settings depend on the base decoder only: they resume across compressors
    text = EvalSetting(kind="no_context")
    first.run_setting(text)
    Evaluator(other, SAMPLES[:2], tmp_path, max_new_tokens=4).run_setting(text)


def test_cli_eval_on_a_saved_checkpoint(compressor, tmp_path, capsys):
    from semidyn_rag.cli import main
    from semidyn_rag.data import save_jsonl_samples

    compressor.save_pretrained(tmp_path / "ckpt")
    save_jsonl_samples(SAMPLES, tmp_path / "qa.jsonl")
    out = tmp_path / "eval"
    argv = ["eval", str(tmp_path / "qa.jsonl"), "--compressor", str(tmp_path / "ckpt")]
    argv += ["--out", str(out), "--limit", "3", "--scales", "0", "1", "--max-new-tokens", "3"]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in rows]
    assert names[:2] == ["no_context", "full_context"]
    # the quick default: trained ratios up to 8, the given scales, truncation at the same ratios
    assert names[2:] == [
        "fixed_ratio_2",
        "fixed_ratio_4",
        "fixed_ratio_8",
        "semi_dynamic_scale_+0",
        "semi_dynamic_scale_+1",
        "truncation_2",
        "truncation_4",
        "truncation_8",
    ]
    assert all(r["summary"]["n"] == 3 for r in rows)
    printed = capsys.readouterr().out
    assert "semi_dynamic_scale_+0" in printed and "hard (peer)" in printed

    # --settings picks settings by name or pattern, into the same directory (cached ones reused)
    argv[-2:] = ["--max-new-tokens", "3", "--settings", "fixed_ratio_32", "truncation_*"]
    argv[argv.index("--scales") : argv.index("--scales") + 3] = []
    assert main(argv) == 0
    names = [r["name"] for r in json.loads((out / "results.json").read_text())]
    assert names == ["fixed_ratio_32", *(f"truncation_{r:g}" for r in (2, 4, 8, 16, 32))]
    with pytest.raises(SystemExit, match="unknown setting 'fixed_ratio'"):
        main([*argv[:-2], "fixed_ratio"])


# --- hard-compression peers ------------------------------------------------------------------


def _spy_complete(model, calls):
    original = model.complete

    def spy(prompts, **kw):
        calls.append((list(prompts), kw.get("adapter", True)))
        return original(prompts, **kw)

    model.complete = spy


def test_truncation_keeps_the_first_ceil_n_over_r_tokens_for_the_base_decoder(compressor, tmp_path):
    tok = compressor.decoder_tokenizer
    calls = []
    _spy_complete(compressor, calls)
    evaluator = Evaluator(compressor, SAMPLES, tmp_path, batch_size=2, max_new_tokens=4)
    result = evaluator.run_setting(EvalSetting(kind="truncation", ratio=4))
    del compressor.complete
    assert calls and all(adapter is False for _, adapter in calls)  # the untouched base decoder
    prompts = [p.text for batch, _ in calls for p in batch]
    records = [json.loads(line) for line in (tmp_path / "records/truncation_4.jsonl").open()]
    expected_prompts = []
    for sample, record in zip(SAMPLES, records, strict=True):
        ids = [tok(c, add_special_tokens=False)["input_ids"] for c in sample.contexts]
        budgets = [math.ceil(len(i) / 4) for i in ids]
        assert record["num_tokens"] == sum(map(len, ids))
        assert record["num_latents"] == sum(budgets)
        kept = "\n".join(tok.decode(i[:b]) for i, b in zip(ids, budgets, strict=True))
        for text, b in zip(kept.split("\n"), budgets, strict=True):
            assert len(tok(text, add_special_tokens=False)["input_ids"]) == b
        expected_prompts.append(
            compressor.config.prompt_template.format(context=kept, question=sample.question)
        )
        assert record["latency_s"] is not None
    assert prompts == expected_prompts
    assert 3 <= result.summary.avg_ratio <= 4


def test_llmlingua_peers_score_with_the_base_decoder_offline(compressor, tmp_path, monkeypatch):
    pytest.importorskip("llmlingua")
    import tiktoken

    from semidyn_rag.lingua import LinguaPeer

    def no_download(*args, **kwargs):
        raise AssertionError("tiktoken must not be asked for an encoding (it downloads one)")

    monkeypatch.setattr(tiktoken, "encoding_for_model", no_download)
    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    peer = LinguaPeer(compressor, question_aware=False)
    scorer = peer._compressor.model
    ids = compressor.decoder_tokenizer(" ".join(SAMPLES[0].contexts * 3), return_tensors="pt")
    mask = ids["attention_mask"]
    with torch.no_grad():
        got = scorer(ids["input_ids"], attention_mask=mask).logits
        with compressor.decoder.disable_adapter():
            base = compressor.decoder(input_ids=ids["input_ids"], attention_mask=mask).logits
        tuned = compressor.decoder(input_ids=ids["input_ids"], attention_mask=mask).logits
    torch.testing.assert_close(got, base)
    assert not torch.allclose(got, tuned, atol=1e-3)  # the LoRA adapter was really off
    # llmlingua's list-of-(k, v) caches round-trip: the second half scored on the first's cache
    half = ids["input_ids"].shape[1] // 2
    first = scorer(ids["input_ids"][:, :half], attention_mask=mask[:, :half])
    second = scorer(
        ids["input_ids"][:, half:], attention_mask=mask, past_key_values=first.past_key_values
    )
    torch.testing.assert_close(second.logits, base[:, half:], atol=1e-4, rtol=1e-4)

    calls = []
    _spy_complete(compressor, calls)
    evaluator = Evaluator(compressor, SAMPLES[:3], tmp_path, max_new_tokens=3)
    for kind in ("llmlingua", "longllmlingua"):
        result = evaluator.run_setting(EvalSetting(kind=kind, ratio=2))
        records = [json.loads(x) for x in (tmp_path / f"records/{kind}_2.jsonl").open()]
        tok = compressor.decoder_tokenizer
        for sample, record in zip(SAMPLES[:3], records, strict=True):
            n = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in sample.contexts)
            assert record["num_tokens"] == n  # counted in decoder tokens, not tiktoken's
            assert 1 <= record["num_latents"] < n
        assert result.summary.avg_ratio > 1.2
    del compressor.complete
    assert calls and all(adapter is False for _, adapter in calls)
    owner = (tmp_path / "records/longllmlingua_2.owner").read_text()
    assert "via llmlingua" in owner and "longllmlingua" in owner


# --- reporting -------------------------------------------------------------------------------


def _result(name: str, correct: list[bool], tokens: int = 40, latents: int = 10) -> SettingResult:
    setting = parse_setting(name)
    records = [
        EvalRecord(
            id=f"q{i}",
            prediction="yes" if ok else "no",
            answers=["yes"],
            num_tokens=tokens,
            num_latents=latents if setting.family != "baseline" else max(tokens, 1),
            latency_s=0.01 if setting.family != "baseline" else None,
        )
        for i, ok in enumerate(correct)
    ]
    return SettingResult(setting=setting, name=name, summary=summarize(records))


def test_pareto_plot_draws_every_setting_including_zero_accuracy(tmp_path):
    results = [
        _result("full_context", [True, True]),
        _result("fixed_ratio_4", [True, False]),
        _result("fixed_ratio_8", [False, False], latents=5),  # no correct answer
        _result("truncation_4", [False, False]),
        _result("llmlingua_8", [True, False], latents=20),  # reached 2x of 8x
    ]
    points = pareto_points(results)
    assert points["fixed_ratio"] == [(4.0, 0.5, True), (8.0, 0.0, False)]
    assert points["truncation"] == [(4.0, 0.0, False)]
    assert plot_pareto(results, tmp_path / "p.png") == tmp_path / "p.png"
    assert (tmp_path / "p.png").stat().st_size > 0
    table = results_table(results)
    row = next(line for line in table.splitlines() if line.startswith("| fixed_ratio_4 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["soft (ours)", "4×", "2", "0.500", "50%"]
    assert cells[-1] == "0.010"
    assert "llmlingua_8 reached 2.00× over all answers, not the 8× requested" in table
    assert "truncation_4 reached" not in table


def test_pareto_plot_says_when_there_is_nothing_to_draw(tmp_path, caplog):
    stale = tmp_path / "pareto.png"
    stale.write_bytes(b"an earlier run's chart")
    baselines = [_result("no_context", [False]), _result("full_context", [True])]
    with caplog.at_level(logging.WARNING, logger="semidyn_rag.evaluation"):
        assert plot_pareto(baselines, stale) is None
    assert not stale.exists()
    assert "nothing to draw" in caplog.text and "no_context, full_context" in caplog.text
    assert "removed the stale" in caplog.text


# --- choosing settings -----------------------------------------------------------------------


def test_settings_are_selected_by_preset_name_and_pattern(compressor):
    paper = select_settings(compressor, ["paper"])
    assert all(parse_setting(s.name) == s for s in paper)  # every name parses back
    assert {s.kind for s in paper} >= {"truncation", "llmlingua", "longllmlingua"}
    chosen = select_settings(compressor, ["fixed_ratio_4", "truncation_*", "fixed_ratio_4"])
    assert [s.name for s in chosen] == [
        "fixed_ratio_4",
        *(f"truncation_{r:g}" for r in compressor.config.ratios),
    ]
    quick = [s.name for s in select_settings(compressor, ["quick"], scales=[1.5])]
    assert "semi_dynamic_scale_+1.5" in quick and "fixed_ratio_16" not in quick
    assert "truncation_8" in quick and not any("lingua" in n for n in quick)
    assert [s.name for s in select_settings(compressor, ["llmlingua_3"])] == ["llmlingua_3"]
    with pytest.raises(ValueError, match="unknown setting 'fixed_ratio'"):
        select_settings(compressor, ["fixed_ratio"])
    with pytest.raises(ValueError, match="matches no setting"):
        select_settings(compressor, ["bogus_*"])
    with pytest.raises(ValueError, match="needs a ratio"):
        EvalSetting(kind="truncation")
    peers = default_settings(compressor, [0], peers=["truncation"])
    assert peers[-1].name == f"truncation_{compressor.config.ratios[-1]:g}"


# --- resuming --------------------------------------------------------------------------------


def test_resume_with_every_answer_recorded_loads_no_model(compressor, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    compressor.save_pretrained(ckpt)
    settings = [
        EvalSetting(kind="no_context"),
        EvalSetting(kind="fixed_ratio", ratio=4),
        EvalSetting(kind="truncation", ratio=4),
    ]
    first = Evaluator(CheckpointRef(ckpt), SAMPLES[:3], tmp_path / "out", max_new_tokens=3)
    assert not first.loaded
    before = first.run(settings)
    assert first.loaded

    def refuse(self):
        raise AssertionError("a fully recorded evaluation must not load the model")

    monkeypatch.setattr(CheckpointRef, "load", refuse)
    again = Evaluator(CheckpointRef(ckpt), SAMPLES[:3], tmp_path / "out", max_new_tokens=3)
    assert again.run(settings) == before and not again.loaded
    # a sample without a record needs the model
    with pytest.raises(AssertionError, match="must not load"):
        Evaluator(CheckpointRef(ckpt), SAMPLES[:4], tmp_path / "out", max_new_tokens=3).run(
            settings
        )
    monkeypatch.undo()
    # other weights under the same path: the cached fingerprint no longer applies; the loaded
    # model's own fingerprint then refuses the old answers
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "modules.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, ckpt / "modules.safetensors")
    changed = Evaluator(CheckpointRef(ckpt), SAMPLES[:3], tmp_path / "out", max_new_tokens=3)
    with pytest.raises(ValueError, match="holds answers written by compressor"):
        changed.run(settings)
    assert changed.loaded


@pytest.mark.parametrize("setting", ["full_context", "no_context", "truncation_2"])
def test_a_private_use_character_in_the_data_is_text(compressor, tmp_path, setting):
    odd = [
        QASample(
            id="odd",
            question="Where \ue000 is the fox?",
            contexts=["The quick \ue000 brown fox jumps over the lazy dog near the river bank."],
            answers=["river bank"],
            source="test",
        )
    ]
    result = Evaluator(compressor, odd, tmp_path, max_new_tokens=2).run_setting(
        parse_setting(setting)
    )
    assert result.summary.n == 1
