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
import re
from collections import defaultdict
from pathlib import Path

import torch
from _common import portable
from safetensors.torch import load_file

from semidyn_rag.checkpoint import DEFAULT_CHECKPOINT
from semidyn_rag.training.diagnostics import effective_rank

LAYER = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_A")


def adapter_updates(adapter: Path) -> dict[tuple[str, int], torch.Tensor]:
    """``(module, layer) -> scale · B @ A`` of the PEFT LoRA adapter saved in ``adapter``.

    Raises:
        FileNotFoundError: ``adapter`` lacks ``adapter_config.json`` or its safetensors file.
        ValueError: the file holds no ``lora_A`` tensor of a decoder layer.
    """
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    updates = {}
    for name, a in tensors.items():
        match = LAYER.search(name)
        if match:
            b = tensors[name.replace("lora_A", "lora_B")]
            updates[match[2], int(match[1])] = scale * b.double() @ a.double()
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
    rank = json.loads((args.adapter / "adapter_config.json").read_text())["r"]
    summary = summarize(adapter_updates(args.adapter))
    text = markdown(portable(args.adapter.resolve()), rank, summary)
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
