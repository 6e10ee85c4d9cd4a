import json

import pytest
import torch

from semidyn_rag.data import QASample
from semidyn_rag.evaluation import EvalSetting, Evaluator, default_settings

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
    assert sum(calls) == 2 and again.summary == fixed


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
    assert "semi_dynamic_scale_+1" in names and "fixed_ratio_32" in names
    assert all(r["summary"]["n"] == 3 for r in rows)
    assert "semi_dynamic_scale_+0" in capsys.readouterr().out
