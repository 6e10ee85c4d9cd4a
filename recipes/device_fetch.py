"""Install what the GPU run returned as a checkpoint ``ship --phase device`` can ship.

    .venv/bin/python recipes/device_fetch.py <files_at of the last device call>
    python recipes/default.py ship --phase device

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
from device_run import CHECKPOINT_OUT, RESULTS_NAME, TEACHER_OUT

from semidyn_rag.checkpoint import CONFIG_NAME
from semidyn_rag.training.trainer import list_checkpoints, state_dir

logger = logging.getLogger("recipes.device_fetch")


def find_returned(files: Path) -> Path:
    """The folder holding `RESULTS_NAME` and `CHECKPOINT_OUT` under ``files`` (the tool may nest
    what came back under the command's ``$OUT`` path).

    Raises:
        FileNotFoundError: no such folder, or its checkpoint lacks the config.
    """
    found = sorted(p.parent for p in files.rglob(RESULTS_NAME))
    if not found:
        raise FileNotFoundError(f"no {RESULTS_NAME} under {files}: did the device run finish?")
    folder = found[0]
    if not (folder / CHECKPOINT_OUT / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder / CHECKPOINT_OUT / CONFIG_NAME} is missing")
    return folder


def install(files: Path, run_dir: Path) -> Path:
    """Copy the returned checkpoint into ``run_dir/checkpoint-N`` with its trainer-state record;
    return the checkpoint directory.

    Raises:
        FileNotFoundError: see `find_returned`; FileExistsError: ``checkpoint-N`` exists already.
    """
    folder = find_returned(files)
    results = json.loads((folder / RESULTS_NAME).read_text())
    target = run_dir / f"checkpoint-{int(results['steps'])}"
    if target.exists():
        raise FileExistsError(f"{target} exists: move it away to install another device run")
    shutil.copytree(folder / CHECKPOINT_OUT, target)
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
            shutil.copy(folder / name, run_dir / name)
    if target not in list_checkpoints(run_dir):
        raise RuntimeError(f"{target} is not listed as a checkpoint of {run_dir}")
    logger.info(
        "installed %s (%d steps on %s); ship it: python recipes/default.py ship --phase device",
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
    install(args.files, args.run_dir)


if __name__ == "__main__":
    main()
