import json

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
