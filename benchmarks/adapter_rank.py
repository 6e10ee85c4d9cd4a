"""How much of its rank does a LoRA adapter use? Effective rank of each update ``scale · B @ A``.

    python benchmarks/adapter_rank.py                          # the bundled default's decoder
    python benchmarks/adapter_rank.py runs/default/scale/checkpoint-600/decoder --out results/x

Prints, per target module, the mean effective rank over layers (out of the adapter's ``r``), the
share of the update's energy in its 4 largest directions, and the layers whose update is largest.
An adapter that uses a few of its directions is not short of rank: a larger ``r`` would not help.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path

import torch
from _common import portable
from safetensors.torch import load_file

from semidyn_rag.checkpoint import DEFAULT_CHECKPOINT
from semidyn_rag.training.diagnostics import effective_rank

logger = logging.getLogger("benchmarks.adapter_rank")

LORA_A = re.compile(r"\.lora_(?:embedding_)?A\b")
LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_A")


def adapter_config(adapter: Path) -> dict:
    """The ``adapter_config.json`` of the PEFT LoRA adapter saved in ``adapter``, checked to
    describe updates ``scale · B @ A`` with one ``r`` and one ``lora_alpha`` for every module.

    Raises:
        FileNotFoundError: ``adapter`` holds no ``adapter_config.json`` (not an adapter directory).
        ValueError: not a LoRA adapter, a DoRA one (its update is not ``scale · B @ A``), or one
            with per-module ranks or alphas (``rank_pattern``, ``alpha_pattern``).
    """
    path = adapter / "adapter_config.json"
    if not path.is_file():
        inside = [f.parent.name for f in sorted(adapter.glob("*/adapter_config.json"))]
        hint = f"; pass one of the adapters in it: {', '.join(inside)}" if inside else ""
        raise FileNotFoundError(
            f"{adapter} is not a PEFT adapter directory: it holds no adapter_config.json{hint}"
        )
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter} is a {config.get('peft_type')} adapter, not a LoRA one")
    if config.get("use_dora"):
        raise ValueError(
            f"{adapter} is a DoRA adapter: its update rescales the columns of W + B @ A and is "
            "not scale · B @ A, which is what this reads"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(
                f"{adapter} sets {key} {config[key]}: per-module ranks or alphas are not read here"
            )
    return config


def lora_scale(config: dict) -> float:
    """PEFT's scaling of ``B @ A``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
    rank-stabilized LoRA (``use_rslora``)."""
    r = config["r"]
    return config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)


def adapter_updates(adapter: Path) -> dict[tuple[str, int], torch.Tensor]:
    """``(module, layer) -> scale · B @ A`` of the PEFT LoRA adapter saved in ``adapter``
    (`lora_scale`). LoRA tensors outside the decoder layers (e.g. ``lm_head``) are left out, with
    a warning.

    Raises:
        FileNotFoundError: ``adapter`` lacks ``adapter_config.json`` or ``adapter_model.safetensors``.
        ValueError: what `adapter_config` refuses; a ``lora_A`` without its ``lora_B``; or the file
            holds no ``lora_A`` tensor of a decoder layer.
    """
    config = adapter_config(adapter)
    scale = lora_scale(config)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{adapter} holds no adapter_model.safetensors (a PEFT save in pickle, "
            "adapter_model.bin, is not read)"
        )
    tensors = load_file(weights)
    updates, skipped = {}, []
    for name, a in tensors.items():
        if not LORA_A.search(name):
            continue
        match = LAYER.search(name)
        if not match:
            skipped.append(name)
            continue
        b_name = name.replace("lora_A", "lora_B")
        if b_name not in tensors:
            raise ValueError(f"{weights} holds {name} without its {b_name}")
        updates[match[2], int(match[1])] = scale * tensors[b_name].double() @ a.double()
    if skipped:
        logger.warning(
            "left out %d LoRA tensors outside the decoder layers: %s", len(skipped), skipped
        )
    if not updates:
        raise ValueError(f"{adapter} holds no LoRA update of a decoder layer")
    return updates


def summarize(updates: dict[tuple[str, int], torch.Tensor]) -> dict[str, dict]:
    """Per module: mean effective rank, mean top-4 energy share, the 3 largest layers by norm."""
    by_module = defaultdict(list)
    for (module, layer), update in updates.items():
        energy = torch.linalg.svdvals(update) ** 2
        top4 = float(energy[:4].sum() / energy.sum()) if energy.sum() > 0 else 0.0
        by_module[module].append((layer, float(update.norm()), effective_rank(update), top4))
    summary = {}
    for module, rows in sorted(by_module.items()):
        largest = sorted(rows, key=lambda row: -row[1])[:3]
        summary[module] = {
            "layers": len(rows),
            "mean_effective_rank": sum(row[2] for row in rows) / len(rows),
            "mean_top4_energy": sum(row[3] for row in rows) / len(rows),
            "largest": [
                {"layer": layer, "norm": norm, "effective_rank": rank}
                for layer, norm, rank, _ in largest
            ],
        }
    return summary


def markdown(adapter: Path, rank: int, summary: dict[str, dict]) -> str:
    lines = [
        f"Adapter `{adapter}` (r = {rank}); effective rank = exp(entropy of the normalized squared"
        " singular values) of each layer's update.",
        "",
        "| module | mean effective rank | top-4 energy | largest updates (layer: norm / eff. rank) |",
        "|---|---:|---:|---|",
    ]
    if all(x["norm"] == 0 for row in summary.values() for x in row["largest"]):
        return (
            f"{lines[0]}\n\nEvery update is zero: B is still at LoRA's initialisation (0), so this "
            "adapter leaves its base model as it is (it never trained, or was held).\n"
        )
    for module, row in summary.items():
        largest = ", ".join(
            f"{x['layer']}: {x['norm']:.1f} / {x['effective_rank']:.1f}" for x in row["largest"]
        )
        lines.append(
            f"| {module} | {row['mean_effective_rank']:.1f} | {row['mean_top4_energy']:.2f} | "
            f"{largest} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("adapter", type=Path, nargs="?", default=DEFAULT_CHECKPOINT / "decoder")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    args = parser.parse_args()
    try:
        rank = adapter_config(args.adapter)["r"]
        updates = adapter_updates(args.adapter)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    summary = summarize(updates)
    text = markdown(portable(args.adapter.resolve()), rank, summary)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
