"""Install what the GPU run returned as a checkpoint ``ship --phase device`` can ship.

    .venv/bin/python recipes/device_fetch.py <files_at of the last device call>
    .venv/bin/python recipes/default.py ship --phase device

``recipes/device_run.py`` writes ``checkpoint/`` (the shippable fp16 files), ``device_results.json``
and perhaps ``teacher_device.jsonl`` into ``$OUT``. This copies the checkpoint to
``runs/default/device/checkpoint-N`` (N: its step count) and writes the trainer-state record that
makes `trainer.list_checkpoints` count it: ``state.json`` with the step and loss history only,
so a resume from it fails, naming the missing tensors (the device's optimizer state does not come
back). The results and the teacher answers are kept beside it; the recipe's own teacher file is
left as it is, so the CPU path still reproduces the default.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import default as recipe
from device_pack import sha256_file
from device_run import CHECKPOINT_OUT, RESULTS_NAME, SHIPPED_FILES, TEACHER_OUT

from semidyn_rag.training.trainer import list_checkpoints, state_dir

logger = logging.getLogger("recipes.device_fetch")


def find_returned(files: Path) -> Path:
    """The folder holding `RESULTS_NAME` and `CHECKPOINT_OUT` under ``files`` (the tool may nest
    what came back under the command's ``$OUT`` path).

    Raises:
        FileNotFoundError: no such folder; FileExistsError: more than one (two runs' files).
    """
    found = sorted(p.parent for p in files.rglob(RESULTS_NAME))
    if not found:
        raise FileNotFoundError(f"no {RESULTS_NAME} under {files}: did the device run finish?")
    if len(found) > 1:
        raise FileExistsError(f"{RESULTS_NAME} in {found}: pass the folder of one run")
    return found[0]


def check_returned(folder: Path, results: dict) -> None:
    """Check the returned checkpoint against the sha256 of each file that ``results["files"]``
    records (``device_run.manifest``): every file ``ship`` copies is there and whole.

    Raises:
        ValueError: the results name no files or not all of `SHIPPED_FILES`, or a file's sha256
            differs; FileNotFoundError: a recorded file did not come back (the tool leaves out a
            file over its limits).
    """
    recorded = results.get("files") or {}
    if not set(SHIPPED_FILES) <= set(recorded):
        raise ValueError(
            f"{folder / RESULTS_NAME} records the files {sorted(recorded)}, "
            f"not all of {list(SHIPPED_FILES)}: not a whole device run's results"
        )
    for name, expected in recorded.items():
        path = folder / CHECKPOINT_OUT / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} did not come back (see the call's files_left_out)")
        if sha256_file(path) != expected:
            raise ValueError(f"{path} has another sha256 than the device wrote: damaged")


def install(files: Path, run_dir: Path) -> Path:
    """Copy the returned checkpoint into ``run_dir/checkpoint-N`` with its trainer-state record;
    return the checkpoint directory.

    Raises:
        FileNotFoundError, ValueError: see `find_returned` and `check_returned`;
        FileExistsError: ``run_dir`` holds a checkpoint already (``ship`` would take the one of
            most steps, not necessarily this one), or ``files`` holds two runs.
    """
    folder = find_returned(files)
    results = json.loads((folder / RESULTS_NAME).read_text())
    check_returned(folder, results)
    target = run_dir / f"checkpoint-{int(results['steps'])}"
    earlier = sorted(run_dir.glob("checkpoint-*")) if run_dir.is_dir() else []
    if earlier:
        raise FileExistsError(
            f"{run_dir} holds {[p.name for p in earlier]}: move them (and its trainer-state) "
            "away to install another device run"
        )
    shutil.copytree(folder / CHECKPOINT_OUT, target)
    for path in [target, *target.rglob("*")]:  # the tool's files_at folder is read-only
        path.chmod(path.stat().st_mode | 0o200)
    state = state_dir(target)
    state.mkdir(parents=True, exist_ok=True)
    record = {
        "step": results["steps"],
        "param_names": [],  # no tensors came back: resuming from here raises, naming this
        "param_groups": [],
        "train_config": results["train_config"],
        "history": results["history"],
        "device": {k: results[k] for k in ("device", "device_name", "seconds", "phase")},
    }
    (state / "state.json").write_text(json.dumps(record, indent=1))
    for name in (RESULTS_NAME, TEACHER_OUT):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, run_dir / name)
    if target not in list_checkpoints(run_dir):
        raise RuntimeError(f"{target} is not listed as a checkpoint of {run_dir}")
    logger.info(
        "installed %s (%d steps on %s); ship it: "
        ".venv/bin/python recipes/default.py ship --phase device",
        target,
        results["steps"],
        results.get("device_name"),
    )
    return target


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", type=Path, help="the files_at folder of the last device call")
    parser.add_argument("--run-dir", type=Path, default=Path(recipe.PHASES["device"].output_dir))
    args = parser.parse_args(argv)
    # the checkpoint goes into this checkout's runs/ and ship reads it with the imported package
    recipe.check_checkout()
    install(args.files, args.run_dir)


if __name__ == "__main__":
    main()
