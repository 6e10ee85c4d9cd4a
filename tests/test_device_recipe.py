"""The GPU recipe's packing and its run, on a CPU (recipes/device_pack.py, device_run.py,
device_fetch.py): the split base model comes back whole or not at all, calls over the tool's
limits are refused, and the time-boxed run exports a checkpoint that loads."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

import device_pack  # noqa: E402

WORDS = [
    "river",
    "city",
    "king",
    "army",
    "bridge",
    "music",
    "river",
    "court",
    "paper",
    "garden",
    "tower",
    "school",
    "winter",
    "harbor",
    "market",
    "forest",
    "castle",
    "island",
    "valley",
    "temple",
]


def _text(seed: int, n: int = 60) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n)) + "."


def test_split_join_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(bytes(range(256)) * 40)
    sizes = device_pack.part_sizes(source.stat().st_size, room=4000, first_extra=500)
    assert len(sizes) == 3 and sum(sizes) == source.stat().st_size
    parts = device_pack.split_file(source, tmp_path / "parts", sizes)
    assert [p.name for p in parts] == ["part-00", "part-01", "part-02"]
    joined = device_pack.join_parts(tmp_path / "parts", tmp_path / "out")
    assert joined.read_bytes() == source.read_bytes()

    damaged = bytearray(parts[1].read_bytes())
    damaged[10] ^= 1
    parts[1].write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="sha256"):
        device_pack.join_parts(tmp_path / "parts", tmp_path / "out2")
    assert not (tmp_path / "out2" / "model.gguf").exists()
    parts[1].unlink()
    with pytest.raises(FileNotFoundError, match="without gaps"):
        device_pack.join_parts(tmp_path / "parts", tmp_path / "out3")


def test_part_sizes_refuses_what_cannot_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        device_pack.part_sizes(10_000, room=1000, max_calls=3)


def test_calls_are_checked_against_the_limits(tmp_path: Path) -> None:
    parts = [tmp_path / "p0", tmp_path / "p1"]
    for part in parts:
        part.write_bytes(b"x" * 1000)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (tmp_path / "SHA256").write_text("abc  f  2000\n")
    calls = device_pack.plan_calls(100, parts, wheels, [], root=tmp_path, limit=2000)
    assert [c.payload for c in calls] == [1100, 1100 + 13]
    assert calls[-1].carry == ["p1", "SHA256"] and "device_run.py" in calls[-1].command
    assert f"test -e {device_pack.STASH}/p0" in calls[-1].command  # the machine went back
    assert f"--parts {device_pack.STASH}" in calls[-1].command
    assert all(f"cp {c.carry[0]} " in c.command for c in calls)  # each stashes its part
    parts.append(tmp_path / "p2")
    parts[-1].write_bytes(b"x" * 10)
    calls = device_pack.plan_calls(100, parts, wheels, [], root=tmp_path, limit=2000)
    stash = device_pack.STASH
    assert f"test -e {stash}/p0" in calls[1].command  # a middle call too: none carried in vain
    assert f"test -e {stash}/p1" not in calls[1].command
    assert f"test -e {stash}/p1" in calls[2].command
    with pytest.raises(ValueError, match="MiB"):
        device_pack.plan_calls(1500, parts, wheels, [], root=tmp_path, limit=2000)
    long = device_pack.DeviceCall(carry=[], command="x" * (device_pack.COMMAND_LIMIT + 1))
    with pytest.raises(ValueError, match="characters"):
        device_pack.check_call(long)
    device_pack.check_call(device_pack.DeviceCall(carry=[], command="x" * 2000))


def test_steps_that_fit() -> None:
    import device_run

    assert device_run.steps_that_fit(12, 0.5, 100.0) == 12 + 180
    assert device_run.steps_that_fit(12, 0.5, -3.0) == 12
    with pytest.raises(ValueError):
        device_run.steps_that_fit(1, 0.0, 10.0)


def _fixture_data(root: Path) -> tuple[Path, Path]:
    """A SQuAD file of six articles (two answerable questions and one unanswerable per
    paragraph), 20 HotpotQA training rows, 2 dev rows, the two teacher files every phase reads and
    the mixed teacher's questions `device_pack` writes (ten, the first eight answered), in the
    formats the recipe reads."""
    from semidyn_rag.training.samples import TrainSample, write_jsonl

    data, teacher = root / "data", root / "teacher"
    (data / "squad").mkdir(parents=True)
    (data / "hotpotqa").mkdir(parents=True)
    articles = [
        {
            "title": f"Article {a}",
            "paragraphs": [
                {
                    "context": _text(a * 3 + p),
                    "qas": [
                        {
                            "id": f"q{a}-{p}-{q}",
                            "question": f"Which word comes {q} in part {p}?",
                            "answers": [{"text": WORDS[(a + p + q) % 20], "answer_start": 0}],
                            "is_impossible": False,
                        }
                        for q in range(2)
                    ]
                    + [
                        {
                            "id": f"q{a}-{p}-none",
                            "question": f"Which word never comes in part {p}?",
                            "answers": [],
                            "is_impossible": True,
                        }
                    ],
                }
                for p in range(2)
            ],
        }
        for a in range(6)
    ]
    (data / "squad" / "dev-v2.0-part.json").write_text(
        json.dumps({"version": "v2.0", "data": articles})
    )
    rows = [
        {
            "id": f"h{i}",
            "question": f"Where is the {WORDS[i % 20]}?",
            "answer": WORDS[(i + 1) % 20],
            "type": "bridge",
            "level": "easy",
            "supporting_facts": {"title": [f"A{i}", f"B{i}"], "sent_id": [0, 0]},
            "context": {
                "title": [f"A{i}", f"B{i}", f"C{i}"],
                "sentences": [[_text(i, 20)], [_text(i + 1, 20)], [_text(i + 2, 20)]],
            },
        }
        for i in range(22)
    ]
    (data / "hotpotqa" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:20]))
    (data / "hotpotqa" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows[20:]))
    teacher.mkdir()
    single = [
        TrainSample(id=f"t{i}", contexts=[_text(i)], question="What?", answer="x", source="squad")
        for i in range(8)
    ]
    mixed = [
        TrainSample(
            id=f"m{i}",
            contexts=[_text(i, 20), _text(i + 5, 20)],
            question="Where?",
            answer="y",
            expanded=[True, False],
        )
        for i in range(10)
    ]
    write_jsonl(single, teacher / "teacher.jsonl")
    write_jsonl(mixed[:8], teacher / "teacher_mixed.jsonl")
    write_jsonl(mixed, teacher / device_pack.MIXED_QUESTIONS)
    return data, teacher


def _point_recipe(
    recipe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    unanswerable: str = "teacher_unanswerable.jsonl",
) -> tuple[Path, Path]:
    """`_fixture_data` in ``tmp_path``, with the recipe's data and teacher-file constants pointed
    at it (the unanswerable file named ``unanswerable``; the fixture writes none), and its run
    folder at an empty one (``runs/default/synth.jsonl`` may be being written)."""
    data, teacher = _fixture_data(tmp_path)
    monkeypatch.setattr(recipe, "DATA", data)
    monkeypatch.setattr(recipe, "RUN", tmp_path / "run")
    monkeypatch.setattr(recipe, "TEACHER", teacher / "teacher.jsonl")
    monkeypatch.setattr(recipe, "MIXED_TEACHER", teacher / "teacher_mixed.jsonl")
    monkeypatch.setattr(recipe, "UNANSWERABLE_TEACHER", teacher / unanswerable)
    return data, teacher


def test_device_run_tiny_smoke_exports_a_loadable_checkpoint(tmp_path: Path) -> None:
    import device_fetch
    import device_run
    import torch

    from semidyn_rag import SemiDynamicCompressor
    from semidyn_rag.training.trainer import list_checkpoints

    torch.set_num_threads(1)
    data, teacher = _fixture_data(tmp_path)
    out = tmp_path / "out"
    device = os.environ.get("SEMIDYN_TEST_DEVICE", "cpu")  # cuda: the first device call's check
    torch.zeros(1, device=device)  # the CUDA context (seconds) starts before the run's clock
    args = device_run.parse_args(
        [
            # 20 s: room for the evaluation (it runs only if the export leaves time) on a
            # loaded machine, where a 10 s budget left none
            *("--device", device, "--tiny", "--budget-s", "20", "--out", str(out)),
            *("--data", str(data), "--teacher-dir", str(teacher), "--work", str(tmp_path / "w")),
            *("--batch-size", "2", "--probe-steps", "2", "--tiny-samples", "6"),
            *("--eval-limit", "2", "--eval-s", "2", "--export-s", "1", "--teach-s", "1"),
            *("--max-epochs", "1000"),  # the clock, not the data, ends this run
        ]
    )
    results = device_run.run(args)
    assert results["steps"] > 4  # more than warm-up and probe: the budget set the count
    assert results["seconds"]["total"] < 20 + 4  # and training stopped in time
    assert len(results["history"]) == results["steps"]
    assert set(results["eval"]) == {"fixed_ratio_4", "fixed_ratio_8"}
    for counts in results["teacher_files"].values():  # the teacher's share, said per file
        assert counts["written"] >= 0 and counts["left"] >= 0
    mixed = results["teacher_files"]["teacher_mixed.jsonl"]  # m6..m9: the tiny file keeps six
    assert mixed["written"] + mixed["empty"] + mixed["left"] == 4
    assert results["teacher_left"] == sum(c["left"] for c in results["teacher_files"].values())
    assert results["latent_use"]["own_loss"] > 0
    returned = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "device_results.json" in returned and len(returned) <= 8
    assert all(len(Path(p).parts) <= 3 for p in returned)  # at most two folders down
    model = SemiDynamicCompressor.from_pretrained(out / "checkpoint", dtype=torch.float32)
    assert model.config.head_layer == 2
    trained = next(p for n, p in model.named_parameters() if "lora_B" in n and ".decoder." in n)
    assert trained.abs().sum() > 0  # the decoder adapter moved off its zero start

    assert results["files"] == device_run.manifest(out / "checkpoint")
    assert sorted(results["files"]) == sorted(device_run.SHIPPED_FILES)
    installed = device_fetch.install(out, tmp_path / "device")
    assert list_checkpoints(tmp_path / "device") == [installed]
    with pytest.raises(FileExistsError):
        device_fetch.install(out, tmp_path / "device")


def test_pack_copies_whole_teacher_lines_only(tmp_path: Path) -> None:
    """``teach`` may be appending to the teacher file while it is packed: a cut last line would
    make the device run fail on reading it, after the whole sequence of calls."""
    data = tmp_path / "data"
    for name in ("squad", "hotpotqa"):
        (data / name).mkdir(parents=True)
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "quest')
    _, copied = device_pack.copy_inputs(data, [teacher], tmp_path / "out")
    assert (copied / "teacher.jsonl").read_text() == '{"id": "a"}\n{"id": "b"}\n'
    teacher.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        device_pack.copy_inputs(data, [teacher], tmp_path / "out")


def test_pack_refuses_a_budget_the_last_call_cannot_keep(tmp_path: Path) -> None:
    """The last call's run must end inside its ``timeout_s`` with room for the install, the
    imports and an evaluation that overruns, and leave training time past device_run's reserves."""
    part = tmp_path / "p0"
    part.write_bytes(b"x")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "SHA256").write_text("abc  f  1\n")
    args = (100, [part], tmp_path / "wheels", [])
    device_pack.plan_calls(*args, root=tmp_path, budget_s=300)
    for budget in (device_pack.RUN_TIMEOUT_S - 30, 60):
        with pytest.raises(ValueError, match="budget"):
            device_pack.plan_calls(*args, root=tmp_path, budget_s=budget)


def test_device_run_refuses_a_budget_below_its_reserves(tmp_path: Path) -> None:
    """A budget the export and evaluation reserves use up would train the warm-up and probe steps
    whatever the clock says and skip the evaluation: refused before anything loads."""
    import device_run

    args = device_run.parse_args(
        ["--device", "cpu", "--tiny", "--budget-s", "20", "--out", str(tmp_path / "o")]
    )
    with pytest.raises(ValueError, match="budget"):
        device_run.run(args)
    assert not (tmp_path / "o").exists()


def _returned(root: Path) -> Path:
    """What a device run returns, with placeholder tensors: the six checkpoint files and the
    results naming them with their sha256."""
    import device_run

    out = root / "returned"
    checkpoint = out / device_run.CHECKPOINT_OUT
    for name in device_run.SHIPPED_FILES:
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / name).write_text(f"contents of {name}")
    results = {
        "steps": 7,
        "train_config": {},
        "history": [],
        "device": "cuda",
        "device_name": "NVIDIA H200",
        "seconds": {},
        "phase": "scale",
        "files": device_run.manifest(checkpoint),
    }
    (out / device_run.RESULTS_NAME).write_text(json.dumps(results))
    return out


def test_fetch_refuses_what_would_ship_the_wrong_weights(tmp_path: Path) -> None:
    """A file the tool left out or damaged, a results file naming no files, a second returned
    run, or a run folder already holding a checkpoint (``ship`` takes the one with most steps):
    each stops the install, which otherwise copies nothing."""
    import device_fetch

    out = _returned(tmp_path)
    run_dir = tmp_path / "device"
    (out / "checkpoint" / "modules.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"modules\.safetensors"):
        device_fetch.install(out, run_dir)
    out = _returned(tmp_path)
    (out / "checkpoint" / "encoder" / "adapter_model.safetensors").write_text("damaged")
    with pytest.raises(ValueError, match="sha256"):
        device_fetch.install(out, run_dir)
    out = _returned(tmp_path)
    results = json.loads((out / "device_results.json").read_text())
    (out / "device_results.json").write_text(json.dumps({**results, "files": {}}))
    with pytest.raises(ValueError, match="files"):
        device_fetch.install(out, run_dir)
    assert not run_dir.exists()

    out = _returned(tmp_path)
    (out / "nested").mkdir()
    (out / "nested" / "device_results.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"device_results\.json"):
        device_fetch.install(out, run_dir)
    (out / "nested" / "device_results.json").unlink()

    (run_dir / "checkpoint-40").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="checkpoint-40"):
        device_fetch.install(out, run_dir)
    (run_dir / "checkpoint-40").rmdir()
    for path in out.rglob("*"):  # the tool's files_at folder is read-only
        path.chmod(0o555 if path.is_dir() else 0o444)
    installed = device_fetch.install(out, run_dir)
    assert installed.name == "checkpoint-7"
    # writable copies: moving the run away later (the docs ask it) must not fail for a user
    assert all(p.stat().st_mode & 0o200 for p in [installed, *installed.rglob("*")])
    for path in out.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def test_device_run_writes_its_results_before_evaluating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluation is the one stage the clock does not stop: killed at the call's timeout, the
    run must still have returned a checkpoint with the results that name it."""
    import device_run
    import torch

    torch.set_num_threads(1)
    data, teacher = _fixture_data(tmp_path)

    def killed(*_: object, **__: object) -> dict:
        raise KeyboardInterrupt("the call's timeout")

    monkeypatch.setattr(device_run, "evaluate", killed)
    out = tmp_path / "out"
    args = device_run.parse_args(
        [
            *("--device", "cpu", "--tiny", "--budget-s", "30", "--out", str(out)),
            *("--data", str(data), "--teacher-dir", str(teacher), "--work", str(tmp_path / "w")),
            *("--batch-size", "2", "--probe-steps", "1", "--tiny-samples", "4", "--max-steps", "4"),
            *("--eval-limit", "2", "--eval-s", "20", "--export-s", "1", "--teach-s", "0"),
        ]
    )
    with pytest.raises(KeyboardInterrupt):
        device_run.run(args)
    results = json.loads((out / device_run.RESULTS_NAME).read_text())
    assert results["steps"] == 4 and results["eval"] is None
    assert results["files"] == device_run.manifest(out / device_run.CHECKPOINT_OUT)


def test_cpu_phases_draw_from_the_recipes_teacher_answers_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``teach --teach-limit 0`` (for ``scale`` and the GPU run) appends every training question's
    answer to the recipe's teacher file; the CPU phases that made the default (``distill``,
    ``mix``) must still draw from its first ``TEACH_LIMIT``, or ``make train-default`` no longer
    reproduces the default."""
    import default as recipe

    _point_recipe(recipe, tmp_path, monkeypatch)
    monkeypatch.setattr(recipe, "TEACH_LIMIT", 4)

    def count(text: str) -> int:
        return len(text.split())

    assert [s.id for s in recipe.taught_samples(count)] == ["t0", "t1", "t2", "t3"]
    cpu = recipe.mixed_training_set(count, single=4, reconstructions=0)
    assert {s.id for s in cpu if s.id.startswith("t")} == {"t0", "t1", "t2", "t3"}
    every = recipe.mixed_training_set(count, single=8, reconstructions=0, every_answer=True)
    assert {s.id for s in every if s.id.startswith("t")} == {f"t{i}" for i in range(8)}


@pytest.mark.parametrize(
    ("phase", "every"),
    [("scale", True), ("anneal", True), ("mix", False), ("release", False), ("nudge", False)],
)
def test_phase_training_set_reads_every_answer_only_where_its_draw_says(
    phase: str, every: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The phases on all the data (``scale``, ``anneal``) read every teacher answer; the others
    the first ``TEACH_LIMIT``, as the runs that measured them did."""
    import default as recipe

    _point_recipe(recipe, tmp_path, monkeypatch)
    monkeypatch.setattr(recipe, "TEACH_LIMIT", 4)
    drawn = {}

    def fake_set(count, single, reconstructions, every_answer=False):
        drawn.update(single=single, every_answer=every_answer)
        return []

    monkeypatch.setattr(recipe, "mixed_training_set", fake_set)
    recipe.phase_training_set(phase, lambda text: len(text.split()))
    assert drawn["every_answer"] is every
    assert drawn["single"] <= (8 if every else 4)


def test_pack_checks_the_kept_wheels_against_the_pins(tmp_path: Path) -> None:
    """``--no-download`` keeps ``.device/wheels`` as it is: a wheel missing, of another version
    than this ``.venv`` holds, or there twice would fail the install on the device, minutes in."""
    pins = {"pydantic": "2.1.0", "typing-extensions": "4.16.0"}
    for name in ("pydantic-2.1.0-py3-none-any.whl", "typing_extensions-4.16.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    device_pack.check_wheels(tmp_path, pins)
    with pytest.raises(ValueError, match="typing-extensions"):
        device_pack.check_wheels(tmp_path, {**pins, "typing-extensions": "4.17.0"})
    with pytest.raises(ValueError, match="gguf"):
        device_pack.check_wheels(tmp_path, {**pins, "gguf": "0.19.0"})
    (tmp_path / "pydantic-2.2.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(ValueError, match="pydantic"):
        device_pack.check_wheels(tmp_path, pins)


def test_tree_bytes_counts_an_ignored_shared_folder(tmp_path: Path) -> None:
    """A ``shared/`` folder in the checkout travels with every call, ignored or not."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("shared/\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "big").write_bytes(b"x" * 1000)
    assert device_pack.tree_bytes(tmp_path) == len("shared/\n") + 1000


def test_export_refuses_files_the_tool_would_drop(tmp_path: Path) -> None:
    """Only 8 files come back and which one the tool leaves out is not said: a checkpoint with a
    file beyond the six shipped ones could cost the results file. Trainer state stays behind."""
    import device_run
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint-3"
    for name in device_run.SHIPPED_FILES:
        path = checkpoint / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            save_file({"w": torch.ones(2)}, path)
        else:
            path.write_text("{}")
    (checkpoint / "trainer").mkdir()
    (checkpoint / "trainer" / "state.json").write_text("{}")
    written = device_run.export_checkpoint(checkpoint, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == sorted(
        device_run.SHIPPED_FILES
    )
    (checkpoint / "extra.json").write_text("{}")
    with pytest.raises(ValueError, match=r"extra\.json"):
        device_run.export_checkpoint(checkpoint, tmp_path / "out2")


def test_scale_holds_the_encoder_side_as_the_fifth_phase_does() -> None:
    """``scale`` is the fifth phase's settings on more data: the encoder adapter and converter stay
    where alignment put them for all its steps, on the CPU and for however many steps the device
    takes (releasing them is the sixth phase, measured worse)."""
    import default as recipe
    import device_run

    assert recipe.MIX.encoder_warmup_steps >= recipe.MIX.steps
    assert recipe.SCALE.encoder_warmup_steps >= recipe.SCALE.steps
    for phase in ("mix", "scale"):
        assert device_run.phase_config(phase, 16, "bf16").encoder_warmup_steps >= 10**9


def test_device_run_refuses_a_decaying_schedule() -> None:
    """``train_within`` grows ``steps`` stage by stage; a linear decay would reach 0 at the end of
    the probe stage, so the phases that decay are refused, not trained at the wrong rate."""
    import default as recipe
    import device_run

    assert recipe.ANNEAL.schedule == "linear"
    assert "anneal" not in device_run.DEVICE_PHASES and "scale" in device_run.DEVICE_PHASES
    with pytest.raises(ValueError, match="linear schedule"):
        device_run.phase_config("anneal", 16, "bf16")


def test_device_run_refuses_a_decaying_schedule_before_anything_loads(tmp_path: Path) -> None:
    """``run`` called with ``anneal`` (argparse's choices bypassed) stops before the base model
    loads and the teacher spends device time, as a budget it cannot keep does."""
    import device_run

    args = device_run.parse_args(
        ["--device", "cpu", "--tiny", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]
    )
    args.phase = "anneal"
    with pytest.raises(ValueError, match="linear schedule"):
        device_run.run(args)
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_anneal_warms_up_then_decays_linearly_to_zero() -> None:
    """What ``ANNEAL``'s docstring says: ten warm-up steps (a fresh optimizer) to 2e-4, then a
    linear decay that reaches 0 where the phase ends; the rate is a function of the step alone,
    so a resumed anneal continues the same schedule."""
    import itertools

    import default as recipe

    from semidyn_rag.training.trainer import lr_at

    config = recipe.ANNEAL
    rates = [lr_at(config, step) for step in range(config.steps)]
    assert config.warmup_steps == 10 and rates[0] == pytest.approx(2e-5)
    assert rates[9] == rates[10] == pytest.approx(2e-4)
    assert all(a > b for a, b in itertools.pairwise(rates[10:]))
    assert rates[-1] == pytest.approx(2e-4 / 230) and lr_at(config, config.steps) == 0.0


def _trained(root: Path, steps: int) -> Path:
    """``root/checkpoint-<steps>`` with its trainer state, as `list_checkpoints` counts one."""
    (root / f"checkpoint-{steps}").mkdir(parents=True)
    (root / "trainer-state" / f"checkpoint-{steps}").mkdir(parents=True)
    (root / "trainer-state" / f"checkpoint-{steps}" / "state.json").write_text("{}")
    return root / f"checkpoint-{steps}"


def test_ship_refuses_an_anneal_that_has_not_decayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partly trained anneal ends mid-decay, at a rate every earlier phase also had: shipping it
    would replace the default with what the phase exists to improve on. A finished one ships."""
    import default as recipe

    shipped = tmp_path / "default"
    (shipped / "decoder").mkdir(parents=True)
    monkeypatch.setattr(recipe, "DEFAULT_CHECKPOINT", shipped)
    monkeypatch.setattr(recipe, "HEAD_FILE", tmp_path / "head.safetensors")
    recipe.HEAD_FILE.write_text("")
    runs = tmp_path / "anneal"
    phases = {**recipe.PHASES, "anneal": recipe.ANNEAL.model_copy(update={"output_dir": str(runs)})}
    monkeypatch.setattr(recipe, "PHASES", phases)
    _trained(runs, 100)
    with pytest.raises(SystemExit, match=r"checkpoint-100 .* 240"):
        recipe.ship("anneal")
    assert (shipped / "decoder").is_dir()  # the default is left as it was
    _trained(runs, 240)
    recipe.ship("anneal")
    assert not (shipped / "decoder").exists()


def test_recipe_refuses_a_package_from_another_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from a second worktree without its ``PYTHONPATH``, ``ship`` replaced the main
    checkout's bundled default; the recipe now refuses before any step."""
    import default as recipe

    recipe.check_checkout()  # the suite imports this checkout's package
    monkeypatch.setattr(recipe, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=f"PYTHONPATH={tmp_path}"):
        recipe.check_checkout()
    monkeypatch.setattr(sys, "argv", ["default.py", "ship", "--phase", "ask"])
    with pytest.raises(SystemExit, match="imports the bundled default from"):
        recipe.main()
    recipe.check_checkout(tmp_path / "semidyn_rag" / "default")


def test_copy_inputs_refuses_a_teacher_file_it_was_told_to_carry(tmp_path: Path) -> None:
    """`pack` names only the teacher files that exist; one named and gone is an error."""
    data = tmp_path / "data"
    for name in ("squad", "hotpotqa"):
        (data / name).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="teacher_mixed"):
        device_pack.copy_inputs(data, [tmp_path / "teacher_mixed.jsonl"], tmp_path / "out")


def _keep_recipe_constants(recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Have ``monkeypatch`` restore the constants `device_run.point_recipe` repoints."""
    import device_run

    for name in ("DATA", *device_run.TEACHER_ATTRS):
        monkeypatch.setattr(recipe, name, getattr(recipe, name))


def test_pack_on_a_fresh_checkout_leaves_the_teacher_to_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``runs/`` empty the packing still succeeds: it carries the mixed teacher's questions
    (retrieved here, where the embedder is), warns with what the device will answer and the
    ``--teach-s`` to give it, and the device run finds every question missing, the mixed ones
    first. A malformed teacher file is still refused."""

    import default as recipe
    import device_run

    from semidyn_rag.training.samples import read_jsonl

    data, teacher = _fixture_data(tmp_path)
    questions = read_jsonl(teacher / device_pack.MIXED_QUESTIONS)
    seen = []

    def retrieved(limit: int | None = None) -> list:  # the real one loads all-MiniLM
        seen.append(recipe.DATA)
        assert limit == recipe.MIXED_LIMIT  # only the rows the mixed teacher answers are encoded
        return questions[:limit]

    monkeypatch.setattr(recipe, "retrieved_hotpot", retrieved)
    monkeypatch.setattr(recipe, "MIXED_LIMIT", 6)
    root, gguf = _pack_root(tmp_path)
    data_before = recipe.DATA

    caplog.set_level("INFO", logger="recipes.device_pack")
    calls = device_pack.pack(root, download=None, gguf=gguf, data=data)
    packed = root / device_pack.DEVICE_DIR / "teacher"
    assert seen == [root / device_pack.DEVICE_DIR / "data"]  # the data that travels
    assert recipe.DATA is data_before  # and the recipe's constants are restored
    assert sorted(p.name for p in packed.iterdir()) == [device_pack.MIXED_QUESTIONS]
    carried = [q.id for q in read_jsonl(packed / device_pack.MIXED_QUESTIONS)]
    assert carried == [f"m{i}" for i in range(6)]  # the first MIXED_LIMIT
    assert f"{device_pack.DEVICE_DIR}/teacher" in calls[-1].carry
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "lacks teacher.jsonl, teacher_mixed.jsonl" in warning
    assert "teacher_mixed.jsonl 6" in warning and "--teach-s 90" in warning

    _keep_recipe_constants(recipe, monkeypatch)
    monkeypatch.setattr(recipe, "RUN", tmp_path / "device_runs")  # no synth.jsonl on the device
    device_run.point_recipe(root / ".device" / "data", packed, tmp_path / "work")
    todo = device_run.teacher_todo(_count, "broad", device_run.mixed_questions(packed))
    assert [p.name for _, p in todo] == [
        "teacher_mixed.jsonl",
        "teacher.jsonl",
        "teacher_unanswerable.jsonl",
    ]
    assert [s.id for s in todo[0][0]] == carried
    assert all(s.provenance["kind"] == "qa" for s in todo[1][0]) and todo[1][0]
    assert f"teacher.jsonl {len(todo[1][0])}," in warning  # the count the device will find

    caplog.clear()
    device_pack.pack(root, download=None, gguf=gguf, data=data, run_args=["--teach-s", "0.5"])
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert '--run-args="... --teach-s 10"' in warning  # 22+ questions at 20 a second

    run = root / "runs" / "default"
    run.mkdir(parents=True)
    (run / "teacher.jsonl").write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        device_pack.pack(root, download=None, gguf=gguf, data=data)


def test_teacher_todo_asks_the_mixed_questions_first_and_only_those_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import default as recipe
    import device_run

    from semidyn_rag.training.samples import read_jsonl

    _, teacher = _point_recipe(recipe, tmp_path, monkeypatch)
    questions = read_jsonl(teacher / device_pack.MIXED_QUESTIONS)
    todo = device_run.teacher_todo(_count, "diverse", questions)
    assert todo[0][1] == recipe.MIXED_TEACHER
    assert [s.id for s in todo[0][0]] == ["m8", "m9"]  # the file answers m0..m7
    assert [p.name for _, p in todo] == ["teacher_mixed.jsonl", "teacher.jsonl"]


def test_grow_teacher_counts_what_it_left_unanswered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A teacher budget that runs out after the first chunk: the mixed answers are written, the
    one the teacher answered with nothing is counted, and every training question left is
    counted and warned about, not dropped silently."""
    import time

    import default as recipe
    import device_run

    from semidyn_rag.training.samples import read_jsonl

    _, teacher = _point_recipe(recipe, tmp_path, monkeypatch)
    questions = read_jsonl(teacher / device_pack.MIXED_QUESTIONS)

    def answer(model, samples, batch_size, progress):
        time.sleep(0.05)  # past the teacher's 0.01 s
        return [s.model_copy(update={"answer": "taught"}) for s in samples[1:]]

    class Model:
        @staticmethod
        def tokenizer(text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": text.split()}

        def eval(self):
            return self

    monkeypatch.setattr(device_run, "teacher_answers", answer)
    clock = device_run.Clock(budget_s=100.0, reserve_s=0.0)
    out = tmp_path / "out.jsonl"
    counts = device_run.grow_teacher(Model(), clock, 0.01, 1, out, "diverse", questions)
    training = len(device_run.teacher_todo(_count, "diverse", [])[1][0])
    assert counts["teacher_mixed.jsonl"] == {"written": 1, "empty": 1, "left": 0}
    assert counts["teacher.jsonl"] == {"written": 0, "empty": 0, "left": training} and training
    assert [s.id for s in read_jsonl(out)] == ["m9"]
    assert read_jsonl(recipe.MIXED_TEACHER)[-1].id == "m9"
    assert any("left unanswered" in r.getMessage() for r in caplog.records)
    nothing = device_run.grow_teacher(Model(), clock, 0.0, 1, out, "diverse", questions)
    assert nothing["teacher_mixed.jsonl"] == {"written": 0, "empty": 0, "left": 1}  # m8


def test_device_run_refuses_without_the_mixed_questions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packing from before the questions were carried: the run could neither answer nor count
    the mixed answers it lacks, so it stops before the model loads; a complete mixed teacher
    file needs no questions."""
    import default as recipe
    import device_run

    data, teacher = _fixture_data(tmp_path)
    (teacher / device_pack.MIXED_QUESTIONS).unlink()
    _keep_recipe_constants(recipe, monkeypatch)
    args = device_run.parse_args(
        [
            *("--device", "cpu", "--tiny", "--budget-s", "30", "--out", str(tmp_path / "o")),
            *("--data", str(data), "--teacher-dir", str(teacher), "--work", str(tmp_path / "w")),
            *("--export-s", "1", "--eval-limit", "0"),
        ]
    )
    with pytest.raises(FileNotFoundError, match=r"mixed_questions\.jsonl .* 8 of 192"):
        device_run.run(args)
    assert not (tmp_path / "w" / "tiny_base").exists()
    monkeypatch.setattr(recipe, "MIXED_LIMIT", 8)
    assert device_run.mixed_questions(teacher) == []


def test_device_run_refuses_a_package_from_another_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the recipe's own steps: the run starts from the imported package's bundled default."""
    import default as recipe
    import device_run

    monkeypatch.setattr(recipe, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="imports the bundled default from"):
        device_run.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_first_call_fails_without_a_gpu(tmp_path: Path) -> None:
    """The first call's check must fail (not print ``False`` and exit 0) when torch sees no GPU:
    the 8-minute last call would otherwise find out."""
    import shlex
    import subprocess

    part = tmp_path / "p0"
    part.write_bytes(b"x")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "SHA256").write_text("abc  f  1\n")
    calls = device_pack.plan_calls(0, [part, part], tmp_path / "wheels", [], root=tmp_path)
    check = calls[0].command.split("nvidia-smi -L; ")[1]
    argv = shlex.split(check)
    assert argv[:2] == ["python3", "-c"]
    result = subprocess.run(
        [sys.executable, "-c", argv[2]],
        capture_output=True,
        text=True,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
        cwd=RECIPES.parent,
    )
    assert result.returncode != 0 and "no GPU" in result.stderr


class _Loaded(Exception):
    pass


def _record_loads(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make the recipe's ``SemiDynamicCompressor.from_pretrained`` record its keyword arguments
    into the returned dict and stop the caller (`_Loaded`) before anything loads."""
    import default as recipe

    seen: dict = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr(recipe.SemiDynamicCompressor, "from_pretrained", fake_load)
    return seen


@pytest.mark.parametrize(("phase", "layer"), [("shallow", 0), ("mix", None), ("mirror", None)])
def test_train_phase_loads_the_pool_layer_its_phase_names(
    phase: str, layer: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``shallow`` pools the input embeddings (``POOL_LAYERS``); every other phase loads the
    bundled default as it is, pooling what its config says."""
    import default as recipe

    seen = _record_loads(monkeypatch)
    with pytest.raises(_Loaded):
        recipe.train_phase(phase)
    assert seen.get("pool_layer") == layer
    assert seen["head_layer"] == recipe.HEAD_LAYER
    assert set(recipe.POOL_LAYERS) <= set(recipe.PHASE_DRAWS)


@pytest.mark.parametrize("phase", ["ask", "mix"])
def test_train_phase_loads_the_prompt_its_phase_trains_on(
    phase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ask`` trains on the question-first template (``PROMPT_TEMPLATES``), a valid template
    that asks before and after the context; every other phase keeps the bundled default's."""
    import default as recipe

    from semidyn_rag.config import CompressorConfig

    seen = _record_loads(monkeypatch)
    with pytest.raises(_Loaded):
        recipe.train_phase(phase)
    if phase in recipe.PROMPT_TEMPLATES:
        template = seen["prompt_template"]
        assert template.index("{question}") < template.index("{context}")
        assert template.rindex("{question}") > template.index("{context}")
        CompressorConfig.model_validate(
            {**recipe.COMPRESSOR.model_dump(), "prompt_template": template}
        )
    else:
        assert "prompt_template" not in seen
    assert set(recipe.PROMPT_TEMPLATES) <= set(recipe.PHASE_DRAWS)


@pytest.mark.parametrize("shipped", [2, 0])
def test_a_phase_that_does_not_align_needs_the_layer_its_converter_reads(
    shipped: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``shallow2`` keeps the converter it loads; on a bundled default whose converter reads
    another layer than it pools, it would train on latents nothing was fitted to."""
    import default as recipe

    (tmp_path / recipe.CONFIG_NAME).write_text(json.dumps({"pool_layer": shipped}))
    monkeypatch.setattr(recipe, "DEFAULT_CHECKPOINT", tmp_path)
    seen = _record_loads(monkeypatch)
    if shipped == recipe.POOL_LAYERS["shallow2"]:
        with pytest.raises(_Loaded):
            recipe.train_phase("shallow2")
        assert seen["pool_layer"] == shipped
    else:
        with pytest.raises(SystemExit, match="reads layer 2: ship the phase it continues first"):
            recipe.train_phase("shallow2")
        assert not seen


def test_pack_appends_run_args_to_the_last_call_only(tmp_path: Path) -> None:
    parts = [tmp_path / ".device" / "gguf" / f"part-0{i}" for i in range(3)]
    wheels = tmp_path / ".device" / "wheels"
    calls = device_pack.plan_calls(
        0, parts, wheels, [], root=tmp_path, run_args=["--phase", "joint", "--batch-size", "32"]
    )
    assert calls[-1].command.endswith("--phase joint --batch-size 32")
    assert all("--phase" not in c.command for c in calls[:-1])


def test_pack_refuses_run_args_device_run_would_refuse() -> None:
    device_pack.check_run_args(["--phase", "joint", "--max-epochs", "6"])
    with pytest.raises(ValueError, match="--run-args: argument --phase: invalid choice"):
        device_pack.check_run_args(["--phase", "no-such-phase"])
    with pytest.raises(ValueError, match="--budget-s"):
        device_pack.check_run_args(["--budget-s", "100"])


class _TimedTrainer:
    """A `Trainer` stand-in whose steps take ``slow_s`` while probing (the first 12) and
    ``fast_s`` after, as a GPU's first steps do."""

    def __init__(self, slow_s: float, fast_s: float) -> None:
        from semidyn_rag.training.trainer import TrainConfig

        self.config = TrainConfig(steps=1, batch_size=2)
        self.examples = list(range(10**6))
        self.step, self.slow_s, self.fast_s = 0, slow_s, fast_s

    def train(self) -> None:
        import time

        while self.step < self.config.steps:
            time.sleep(self.slow_s if self.step < 12 else self.fast_s)
            self.step += 1


def test_train_within_replans_when_steps_speed_up() -> None:
    import device_run

    trainer = _TimedTrainer(slow_s=0.04, fast_s=0.004)
    clock = device_run.Clock(budget_s=1.6, reserve_s=0.2)
    timing = device_run.train_within(trainer, clock, probe_steps=10, max_steps=None)
    first_plan = timing["plans"][0]
    # planning once from the probe's 0.04 s would stop near 12 + 0.9 * 0.9 s / 0.04 s = 32 steps
    assert first_plan < 40 and trainer.step > 2 * first_plan
    assert timing["planned_steps"] == trainer.step and timing["step_s"] < 0.02
    assert clock.train_left() > -0.3  # and the stages stayed within the training time


def test_train_within_stops_at_the_epoch_cap() -> None:
    import device_run

    trainer = _TimedTrainer(slow_s=0.001, fast_s=0.001)
    trainer.examples = list(range(20))  # 10 steps an epoch at batch 2
    clock = device_run.Clock(budget_s=30.0, reserve_s=0.0)
    device_run.train_within(trainer, clock, probe_steps=3, max_steps=None, max_epochs=2)
    assert trainer.step == 20


def _hotpot_row(id: str, titles: list[str]) -> dict:
    return {
        "id": id,
        "question": "Where?",
        "answer": "there",
        "type": "bridge",
        "level": "hard",
        "supporting_facts": {"title": titles[:1], "sent_id": [0]},
        "context": {
            "title": titles,
            "sentences": [
                [f"The {t} museum opened in Vienna in {1900 + i}.", " It shows old maps of rivers."]
                for i, t in enumerate(titles)
            ],
        },
    }


def test_corpus_leaves_out_the_evaluated_and_monitored_paragraphs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`corpus_tasks` draws on every HotpotQA training paragraph, distractors included, except
    those whose title the dev rows (evaluated) or the monitor rows (watched) hold."""
    import default as recipe

    hotpot = tmp_path / "hotpotqa"
    hotpot.mkdir()
    train = [
        _hotpot_row("t0", ["Alpha", "Beta", "Gamma"]),
        _hotpot_row("t1", ["Delta", "Alpha", "Epsilon"]),
        _hotpot_row("t2", ["Zeta", "Eta"]),  # the monitor row
    ]
    dev = [_hotpot_row("d0", ["Gamma", "Theta"])]
    (hotpot / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
    (hotpot / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in dev))
    monkeypatch.setattr(recipe, "DATA", tmp_path)
    monkeypatch.setattr(recipe, "MONITOR", 1)
    paragraphs = recipe.corpus_paragraphs()
    assert [p.split(":")[0] for p in paragraphs] == ["Alpha", "Beta", "Delta", "Alpha", "Epsilon"]
    tasks = recipe.corpus_tasks(lambda text: len(text.split()))
    kinds = sorted({t.provenance["kind"] for t in tasks})
    assert kinds == ["cloze", "reconstruction"]
    assert all(t.contexts[0] in paragraphs for t in tasks)
    assert all(t.y is not None for t in tasks)  # density-labelled like every other sample
    assert len({t.id for t in tasks}) == len(tasks)


def test_run_args_cannot_abbreviate_what_the_last_call_fixes() -> None:
    """argparse takes "--budget" for "--budget-s" unless told not to; appended after the last
    call's own "--budget-s 480" it would win."""
    for sneaky in (["--budget", "100"], ["--dev", "cpu"], ["--ou", "/x"]):
        with pytest.raises(ValueError, match="--run-args: unrecognized arguments"):
            device_pack.check_run_args(sneaky)
    with pytest.raises(ValueError, match="--probe-steps: must be greater than 0"):
        device_pack.check_run_args(["--probe-steps", "0"])


def test_first_call_clears_the_stash_and_a_single_call_skips_the_smoke(tmp_path: Path) -> None:
    part = tmp_path / "p0"
    part.write_bytes(b"x")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "SHA256").write_text("abc  f  1\n")
    two = device_pack.plan_calls(0, [part, part], tmp_path / "wheels", [], root=tmp_path)
    assert two[0].command.index(f"rm -rf {device_pack.STASH}") < two[0].command.index("cp ")
    assert device_pack.SMOKE in two[0].command and "rm -rf" not in two[1].command
    one = device_pack.plan_calls(0, [part], tmp_path / "wheels", [], root=tmp_path)
    assert device_pack.SMOKE not in one[0].command and "device_run.py" in one[0].command


def _count(text: str) -> int:
    return len(text.split())


def test_unanswerable_questions_are_the_training_articles_impossible_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Teacher questions without gold: only the training articles' (the held-out articles are
    evaluated), each once, marked so that nothing mistakes the placeholder for an answer."""
    import default as recipe

    data, _ = _fixture_data(tmp_path)
    monkeypatch.setattr(recipe, "DATA", data)
    questions = recipe.unanswerable_questions()
    train, held_out = recipe.squad_split()
    train_titles = {s.title for s in train}
    assert len(questions) == 2 * len(train_titles)  # two paragraphs per article
    assert {q.provenance["title"] for q in questions} == train_titles
    assert not train_titles & {s.title for s in held_out}
    assert all(q.answer == recipe.NO_GOLD for q in questions)
    assert all(q.provenance["kind"] == "qa-unanswerable" for q in questions)
    assert len({q.id for q in questions}) == len(questions)
    assert not {q.id for q in questions} & {s.id for s in train}


@pytest.mark.parametrize(("phase", "adds"), [("broad", True), ("diverse", False), ("scale", False)])
def test_only_the_broad_phase_draws_the_unanswerable_teacher_answers(
    phase: str, adds: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import default as recipe
    import device_run

    from semidyn_rag.training.samples import TrainSample, write_jsonl

    _point_recipe(recipe, tmp_path, monkeypatch)
    questions = recipe.unanswerable_questions()
    answered = [q.model_copy(update={"answer": "The word."}) for q in questions[:1]]
    write_jsonl(answered, recipe.UNANSWERABLE_TEACHER)
    drawn = {s.id for s in recipe.phase_training_set(phase, _count)}
    assert (answered[0].id in drawn) is adds

    todo = {
        path.name: [s.id for s in left] for left, path in device_run.teacher_todo(_count, phase, [])
    }
    assert ("teacher_unanswerable.jsonl" in todo) is adds
    if adds:  # what the file holds is not asked again
        assert todo["teacher_unanswerable.jsonl"] == [q.id for q in questions[1:]]
    assert all(isinstance(s, TrainSample) for s in questions)


def test_pack_carries_every_teacher_file_the_recipe_names() -> None:
    """device_pack (standard library only) names the files; device_run points the recipe's
    constants at their copies: the two lists must name the same files."""
    import default as recipe
    import device_run

    packed = {*device_pack.TEACHER_FILES, *device_pack.GROWN_TEACHER_FILES}
    assert packed == {getattr(recipe, a).name for a in device_run.TEACHER_ATTRS}


def test_device_phases_start_from_the_packed_default_only() -> None:
    """The packing carries the bundled default (the fifth phase): a phase that continues another
    shipped phase would silently train from the wrong start on the device."""
    import default as recipe
    import device_run

    assert "read" in recipe.PHASE_DRAWS and "broad" in device_run.DEVICE_PHASES
    assert not set(device_run.DEVICE_PHASES) & set(recipe.CONTINUES)
    assert set(recipe.CONTINUES.values()) <= set(recipe.PHASES)


def test_broad_without_its_teacher_file_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import default as recipe

    _point_recipe(recipe, tmp_path, monkeypatch, unanswerable="missing.jsonl")
    with pytest.raises(FileNotFoundError, match="teach-unanswerable"):
        recipe.phase_training_set("broad", _count)


def test_teaching_resumes_after_a_line_cut_mid_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill during ``write_jsonl`` leaves half a line; the rerun drops it, keeps the whole
    lines, and answers only what they lack (the cut one included)."""
    import default as recipe

    from semidyn_rag.training.samples import TrainSample, read_jsonl, write_jsonl

    samples = [
        TrainSample(id=f"s{i}", contexts=["a b c"], question="Q?", answer="x") for i in range(3)
    ]
    path = tmp_path / "teacher.jsonl"
    write_jsonl(samples[:1], path)
    with path.open("a") as f:
        f.write('{"id": "s1", "contexts": ["a b')
    asked = []

    def answer(model, todo, progress=False):
        asked.extend(s.id for s in todo)
        return [s.model_copy(update={"answer": "taught"}) for s in todo]

    monkeypatch.setattr(recipe, "teacher_answers", answer)
    recipe.teach_into(None, path, samples, "teacher")
    assert asked == ["s1", "s2"]
    assert [s.id for s in read_jsonl(path)] == ["s0", "s1", "s2"]


def test_a_cpu_run_of_a_phase_takes_the_device_batch_in_micro_batches() -> None:
    """``--grad-accum 8 --mixed-precision bf16`` runs a phase as the device run does (batch 32,
    bf16) in batches of 4, into its own directory, saving as often in examples."""
    import default as recipe
    import device_run

    assert recipe.phase_run("broad") is recipe.PHASES["broad"]
    cpu, device = recipe.phase_run("broad", 8, "bf16"), device_run.phase_config("broad", 32, "bf16")
    assert cpu.batch_size * cpu.grad_accum == device.batch_size * device.grad_accum == 32
    same = ("lr", "seed", "schedule", "train_ratios", "kd_weight", "encoder_warmup_steps")
    assert {k: getattr(cpu, k) for k in same} == {k: getattr(device, k) for k in same}
    assert cpu.mixed_precision == "bf16" and cpu.output_dir.endswith("broad-accum8-bf16")
    base = recipe.PHASES["broad"]
    assert cpu.steps * 8 >= base.steps and cpu.save_every == max(1, base.save_every // 8)
    # a side the phase holds throughout stays held; the fifth phase holds its encoder side
    mix = recipe.phase_run("mix", 4)
    assert mix.encoder_warmup_steps >= mix.steps and mix.output_dir.endswith("mix-accum4")
    with pytest.raises(ValueError, match="grad_accum"):
        recipe.phase_run("broad", 0)


def test_run_flags_name_the_cpu_run_and_other_steps_refuse_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import default as recipe

    assert recipe.run_flags(1, "no") == ""
    assert recipe.run_flags(8, "bf16") == " --grad-accum 8 --mixed-precision bf16"
    monkeypatch.setattr(sys, "argv", ["default.py", "distill", "--grad-accum", "8"])
    with pytest.raises(SystemExit) as exit_info:
        recipe.main()
    assert exit_info.value.code == 2 and "not distill" in capsys.readouterr().err


# ---------------------------------------------------------------------------- fresh-user review
def _git(*args: str, cwd: Path) -> str:
    import subprocess

    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _packable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """A git checkout with the pinned wheels (empty files) in ``.device/wheels``, a small GGUF
    stand-in and `_fixture_data`, the embedder's retrieval replaced: what `pack` needs."""
    import default as recipe

    from semidyn_rag.training.samples import read_jsonl

    data, teacher = _fixture_data(tmp_path)
    questions = read_jsonl(teacher / device_pack.MIXED_QUESTIONS)
    monkeypatch.setattr(recipe, "retrieved_hotpot", lambda limit=None: questions[:limit])
    monkeypatch.setattr(recipe, "MIXED_LIMIT", 6)
    return (*_pack_root(tmp_path), data)


def _pack_root(tmp_path: Path) -> tuple[Path, Path]:
    """A git checkout with the pinned wheels (empty files) in ``.device/wheels``, and a small
    GGUF stand-in beside it."""
    root = tmp_path / "repo"
    root.mkdir()
    _git("init", "-q", cwd=root)
    wheels = root / device_pack.DEVICE_DIR / "wheels"
    wheels.mkdir(parents=True)
    for name, version in device_pack.pinned_versions().items():
        (wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"g" * 5000)
    return root, gguf


def test_pack_ignores_its_folder_in_a_git_worktree(tmp_path: Path) -> None:
    """In a worktree ``.git`` is a file: the exclude file is the one git names."""
    main = tmp_path / "main"
    main.mkdir()
    _git("init", "-q", cwd=main)
    _git("commit", "-q", "--allow-empty", "-m", "start", cwd=main)
    _git("worktree", "add", "-q", str(tmp_path / "wt"), cwd=main)
    worktree = tmp_path / "wt"
    assert (worktree / ".git").is_file()
    for root in (worktree, worktree, main):  # twice: the entry is added once
        device_pack.exclude_device_dir(root)
        (root / device_pack.DEVICE_DIR).mkdir(exist_ok=True)
        (root / device_pack.DEVICE_DIR / "part-00").write_bytes(b"x")
        assert _git("status", "--porcelain", "--untracked-files=all", cwd=root) == ""
    exclude = Path(_git("rev-parse", "--git-path", "info/exclude", cwd=main).strip())
    entries = (main / exclude).read_text().splitlines()
    assert entries.count(f"/{device_pack.DEVICE_DIR}/") == 1


def test_an_unfinished_pack_leaves_no_call_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call list is written last, naming every carried file with its size and sha256: a pack
    that fails midway leaves none (not an earlier one beside new parts), and ``--check`` finds a
    file changed since the packing before any device time is spent."""
    root, gguf, data = _packable(tmp_path, monkeypatch)
    calls_file = root / device_pack.DEVICE_DIR / device_pack.CALLS_NAME
    calls = device_pack.pack(root, download=None, gguf=gguf, data=data)
    recorded = json.loads(calls_file.read_text())
    assert [c["carry"] for c in recorded] == [c.carry for c in calls]
    part = root / calls[0].carry[0]
    assert recorded[0]["files"][calls[0].carry[0]] == [
        part.stat().st_size,
        device_pack.sha256_file(part),
    ]
    assert any(name.startswith(".device/data/squad/") for name in recorded[-1]["files"])
    assert [c.carry for c in device_pack.check_packed(root)] == [c.carry for c in calls]

    part.write_bytes(b"h" + part.read_bytes()[1:])  # same size, another packing's bytes
    with pytest.raises(ValueError, match="changed"):
        device_pack.check_packed(root)
    (root / device_pack.DEVICE_DIR / "teacher" / "extra.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="new"):
        device_pack.check_packed(root)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(device_pack, "split_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        device_pack.pack(root, download=None, gguf=gguf, data=data)
    assert not calls_file.exists()
    with pytest.raises(FileNotFoundError, match="no packing finished"):
        device_pack.check_packed(root)


def test_pack_and_fetch_refuse_a_package_from_another_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from another directory, both would import another checkout's ``semidyn_rag`` (its
    code packed, its runs/ written): refused before anything is packed or installed."""
    import default as recipe
    import device_fetch

    def never(*args, **kwargs):
        raise AssertionError("reached")

    monkeypatch.setattr(recipe, "ROOT", tmp_path)
    monkeypatch.setattr(device_pack, "pack", never)
    monkeypatch.setattr(device_fetch, "install", never)
    with pytest.raises(SystemExit, match="imports the bundled default from"):
        device_pack.main(["--no-download"])
    with pytest.raises(SystemExit, match="imports the bundled default from"):
        device_fetch.main([str(tmp_path)])


PARSER_REFUSES = [
    (["--batch-size", "0"], "--batch-size: must be greater than 0"),
    (["--teach-s", "-5"], "--teach-s: must be at least 0"),
    (["--max-epochs", "0"], "--max-epochs: must be greater than 0"),
    (["--teach-batch", "0"], "--teach-batch: must be greater than 0"),
    (["--max-steps", "-1"], "--max-steps: must be greater than 0"),
    (["--eval-limit", "-1"], "--eval-limit: must be at least 0"),
    (["--eval-s", "nan"], "--eval-s: must be at least 0"),
    (["--batch-size", "x"], "'x' is not an integer"),
    (["--eval-s", "x"], "'x' is not a number"),
]
"""Values ``device_run``'s parser itself refuses, with what its message says."""


@pytest.mark.parametrize(
    ("run_args", "says"),
    [
        (["--eval-s", "500"], "leaves no training time after the 525 s"),
        (["--export-s", "480", "--eval-limit", "0"], "leaves no training time after the 480 s"),
        (["--tiny"], "--run-args sets --tiny"),
        (["--parts", "/nowhere"], "--run-args sets --parts"),
        (["--data=/nowhere"], "--run-args sets --data"),
        (["--help"], "--run-args sets --help"),
        *PARSER_REFUSES,
    ],
)
def test_run_args_are_checked_as_the_device_run_checks_them(run_args: list, says: str) -> None:
    """What the last call's ``device_run`` would refuse (against the pack's budget), or what
    would override the options the call sets, is refused here, each message naming
    ``--run-args``."""
    with pytest.raises(ValueError, match="--run-args") as refused:
        device_pack.check_run_args(run_args)
    assert says in str(refused.value)
    options = device_pack.check_run_args(["--teach-s", "0", "--eval-limit", "0"], budget_s=300)
    assert options.budget_s == 300 and options.parts == Path(device_pack.STASH)


@pytest.mark.parametrize(("run_args", "says"), PARSER_REFUSES)
def test_device_run_parser_refuses_sizes_and_seconds_out_of_range(
    run_args: list, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import device_run

    with pytest.raises(SystemExit):
        device_run.parse_args(["--out", "o", *run_args])
    assert says in capsys.readouterr().err


def test_pack_errors_name_its_own_option(capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt ``--run-args`` option is reported under device_pack's usage, naming
    ``--run-args``, not under device_run's as if it were the pack's own option."""
    with pytest.raises(SystemExit) as exit_info:
        device_pack.main(["--no-download", "--run-args=--phse joint"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "--run-args: unrecognized arguments: --phse" in err
    assert "--no-download" in err and "--teach-batch" not in err  # device_pack's usage


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--budget-s", "1000"], "--budget-s: a run budget of 1000 s"),
        (["--run-args", "--phase 'joint"], "No closing quotation"),
        (["--run-args=--out /x"], "--run-args sets --out"),
        (["--run-args=--budget-s 100"], "--run-args sets --budget-s"),
        (["--run-args=--tiny"], "--run-args sets --tiny"),
    ],
)
def test_pack_refuses_before_importing_torch(argv: list, says: str) -> None:
    """A budget out of range, broken quoting and an option the last call sets are refused with
    a usage error naming the option, not a traceback, and before torch is imported (seconds)."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, 'recipes'); import device_pack\n"
        f"try: device_pack.main({argv!r})\n"
        "except SystemExit as e: print('exit', e.code, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=RECIPES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "exit 2 False", done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("budget_s", "rate", "run_args"),
    [(150, 1.0, []), (480, 0.1, ["--teach-s", "5"]), (480, 0.2, ["--teach-s", "5"])],
)
def test_suggested_teach_s_fits_the_budget(
    budget_s: int,
    rate: float,
    run_args: list,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The teacher stops at 0.75 x budget less the reserves whatever ``--teach-s`` says: a
    suggested ``--teach-s`` never exceeds what the budget leaves, and a budget too small for
    every answer is said, with the number."""
    import re

    import device_run

    _, _, data = _packable(tmp_path, monkeypatch)
    teacher = tmp_path / "teacher"
    (teacher / "teacher.jsonl").unlink()  # every training question to answer
    monkeypatch.setattr(device_pack, "TEACH_RATE_GUESS", rate)
    caplog.set_level("INFO", logger="recipes.device_pack")
    left = device_pack.plan_teaching(data, teacher, run_args, budget_s)
    options = device_pack.check_run_args(run_args, budget_s)
    stop = device_run.teach_limit_s(budget_s, device_run.reserve_s(options))
    limit = int(stop - device_pack.LOAD_GUESS_S)
    assert limit == device_pack.teaching_limit_s(options)[0] > 0
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"the {limit} s the budget leaves the teacher" in warning
    assert f"--budget-s {budget_s}" in warning
    suggested = [int(s) for s in re.findall(r'--teach-s (\d+)"', warning)]
    assert all(s <= limit for s in suggested)
    needed = -(-sum(left.values()) // rate)
    if needed > limit:
        assert f"about {int(limit * rate)} of the {sum(left.values())} answers fit" in warning
    else:
        assert suggested and suggested[0] >= needed


def test_copy_whole_lines_reads_as_read_jsonl(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Blank lines are skipped, not refused, and a whole last line without its newline is kept
    (with one added, so the device run can append); a line being written is still left out."""
    from semidyn_rag.training.samples import TrainSample, read_jsonl, write_jsonl

    source, target = tmp_path / "teacher.jsonl", tmp_path / "copy.jsonl"
    samples = [TrainSample(id=f"s{i}", contexts=["a b"], question="Q?", answer="x") for i in (0, 1)]
    samples[1] = samples[1].model_copy(update={"question": "Q\u2028?"})  # JSON need not escape it
    write_jsonl(samples, source)
    lines = source.read_text().split("\n")[:2]
    source.write_text(f"{lines[0]}\n\n  \n{lines[1]}\n\n")
    assert device_pack.copy_whole_lines(source, target) == 2
    assert [s.id for s in read_jsonl(target)] == ["s0", "s1"]
    source.write_text(lines[0])  # one line, no final newline
    caplog.clear()  # read_jsonl above logs at INFO when the suite's log level lets it
    assert device_pack.copy_whole_lines(source, target) == 1
    assert target.read_text() == lines[0] + "\n"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    write_jsonl(samples[1:], target, append=True)
    assert [s.id for s in read_jsonl(target)] == ["s0", "s1"]
    source.write_bytes(f"{lines[0]}\n{lines[1][:-3]}".encode() + "é".encode()[:1])
    assert device_pack.copy_whole_lines(source, target) == 1
    assert target.read_text() == lines[0] + "\n"
    assert any("left out" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_retrieved_hotpot_encodes_only_the_rows_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row ranks its own paragraphs and the draws go row by row: the first rows alone are
    the same as the first rows of all, and only they are encoded."""
    import default as recipe

    import semidyn_rag.embeddings as embeddings

    data, _ = _fixture_data(tmp_path)
    monkeypatch.setattr(recipe, "DATA", data)
    monkeypatch.setattr(recipe, "MONITOR", 2)
    encoded = []

    def encode(model, texts, batch_size, normalize):
        encoded.append(texts[0])
        return [[float(len(t) % 7), float(sum(map(ord, t)) % 11)] for t in texts]

    monkeypatch.setattr(embeddings, "load_sentence_model", lambda name: None)
    monkeypatch.setattr(embeddings, "encode", encode)
    every = recipe.retrieved_hotpot()
    assert len(encoded) == len(every) == 18
    encoded.clear()
    first = recipe.retrieved_hotpot(5)
    assert len(encoded) == 5 and first == every[:5]
