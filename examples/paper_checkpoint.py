"""Run the paper's released Qwen3 weights through the LlamaIndex pipeline of ``rag_demo.py``.

The authors published their compressors on Hugging Face as
``yuyijiong/qwen3-semi-dynamic-soft-context-compress``. `SemiDynamicCompressor.from_pretrained`
reads their layout (``config.json`` + ``projector.pth`` + ``encoder/`` + ``decoder/`` LoRA
adapters, ``memory_token_embedding.pth`` for compression-token settings; ``.pth`` files are loaded
with ``weights_only=True``) and runs it as their inference code does: the encoder adapter they save
over the bare transformer is re-keyed for our encoder (any weight that does not load is an error
naming its file and keys), ``<eos>`` is pooled with the context, windows start at the first token
when the ratio head chooses and end at the last when the ratio is fixed, the encoder tokenizer keeps
its special tokens, and ratios are discretised as theirs are. Their evaluation ran in bf16
(``--dtype bfloat16`` here; LoRA stays float32 as in theirs). Nothing is downloaded here: on a
machine with network access, fetch the checkpoint and the base models it names first, e.g.::

    huggingface-cli download yuyijiong/qwen3-semi-dynamic-soft-context-compress --local-dir paper
    huggingface-cli download Qwen/Qwen3-0.6B --local-dir qwen3-0.6b
    huggingface-cli download Qwen/Qwen3-Embedding-0.6B --local-dir qwen3-embedding-0.6b

and then, offline::

    python examples/paper_checkpoint.py paper/<setting> \\
        --encoder-base qwen3-embedding-0.6b --decoder-base qwen3-0.6b

``<setting>`` is the folder of the variant you want when the repository holds several (the one
with ``config.json`` and ``projector.pth``). ``--encoder-base``/``--decoder-base`` replace the
base paths written in its ``config.json`` (``base_encoder_model_path``/``base_decoder_model_path``),
which point at the authors' machines or at the hub; when both name one model, ``--encoder-base``
alone moves both. Use ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch
from _pipeline import CORPUS_DIR, setup_logging
from rag_demo import format_report, run_demo

from semidyn_rag import SemiDynamicCompressor
from semidyn_rag.checkpoint import OFFICIAL_CONFIG, OFFICIAL_WEIGHTS

logger = logging.getLogger("paper_checkpoint")
HUB_ID = "yuyijiong/qwen3-semi-dynamic-soft-context-compress"


def check_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be loaded offline, or None when it looks like the paper's layout."""
    if not path.is_dir():
        return (
            f"{path} is not a local directory. This example does not download; fetch {HUB_ID} "
            "and its base models first (see the top of this file)."
        )
    needed = (OFFICIAL_CONFIG, OFFICIAL_WEIGHTS, "encoder", "decoder")
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        inner = sorted(p.parent.name for p in path.glob(f"*/{OFFICIAL_WEIGHTS}"))
        hint = f"; settings found inside: {', '.join(inner)}" if inner else ""
        return f"{path} lacks {', '.join(missing)}: not one of the paper's checkpoints{hint}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("checkpoint", type=Path, help="a local copy of one released setting")
    parser.add_argument("--encoder-base", help="local encoder base (e.g. Qwen3-Embedding-0.6B)")
    parser.add_argument("--decoder-base", help="local decoder base (e.g. Qwen3-0.6B)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16 as theirs"
    )
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="*.md + questions.jsonl")
    parser.add_argument("--scale", type=float, default=0.0, help="higher compresses more")
    parser.add_argument("--limit", type=int, help="ask only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    setup_logging(args.quiet, plain_text_corpus=True)

    problem = check_checkpoint(args.checkpoint)
    if problem:
        sys.stderr.write(problem + "\n")
        return 2
    raw = json.loads((args.checkpoint / OFFICIAL_CONFIG).read_text())
    overrides = {}
    if args.encoder_base:
        overrides["encoder_model"] = args.encoder_base
    if args.decoder_base:
        overrides["decoder_model"] = args.decoder_base
    logger.info(
        "bases: encoder %s, decoder %s",
        overrides.get("encoder_model", raw.get("base_encoder_model_path")),
        overrides.get("decoder_model", raw.get("base_decoder_model_path")),
    )
    model = SemiDynamicCompressor.from_pretrained(
        args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype), **overrides
    ).eval()
    cfg = model.config
    logger.info(
        "loaded as %s / %s, ratios %s; pools <eos> too: %s; windows %s-aligned when the head "
        "chooses, %s-aligned when the ratio is fixed",
        cfg.backbone,
        cfg.mode,
        cfg.ratios,
        cfg.pool_eos,
        cfg.pooling_alignment,
        cfg.fixed_ratio_alignment or cfg.pooling_alignment,
    )
    with tempfile.TemporaryDirectory() as scratch:
        result = run_demo(
            model,
            corpus=args.corpus,
            store_path=Path(scratch) / "latents",
            scale=args.scale,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
        )
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
