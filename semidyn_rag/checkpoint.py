"""Checkpoint I/O: our layout, and import of the paper's released checkpoints.

This module reads and writes plain parts (a `CompressorConfig`, the LoRA-wrapped bases, our own
tensors by file key); `SemiDynamicCompressor.from_pretrained` and ``save_pretrained`` assemble
and take apart the model. Nothing here imports the model class.

Our layout (everything but JSON is safetensors, so loading never unpickles)::

    DIR/semidyn_config.json      CompressorConfig
    DIR/modules.safetensors      ratio_head.*, converter.*, memory
    DIR/encoder/, DIR/decoder/   peft LoRA adapters (over the causal LM)

The paper's layout, as its code saves it: ``config.json`` (``comp_ratio_or_len``,
``feature_extract_method``, ...); ``projector.pth``, either ``{"projector": ...,
"compress_ratio_head": ...}`` (semi-dynamic) or the converter's flat state dict (fixed ratio);
``encoder/`` (LoRA over the bare transformer, keys ``base_model.model.layers.N...``) and
``decoder/`` (LoRA over the causal LM); ``memory_token_embedding.pth`` (``{"indices", "weight"}``,
the trained vocabulary rows) for compression-token checkpoints. ``.pth`` files are read with
``weights_only=True``.

Every tensor a file holds must land in the model and every tensor the model needs must come from a
file: a missing or unexpected key is a `CheckpointError` naming the file and the keys
(`copy_tensors`). PEFT only warns when adapter keys do not load (the LoRA weights then stay at
their zero init), so adapters are loaded here and checked key by key (`attach_adapter`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .config import CompressorConfig
from .loading import load_base, portable_name

logger = logging.getLogger(__name__)

CONFIG_NAME = "semidyn_config.json"
MODULES_NAME = "modules.safetensors"
OFFICIAL_CONFIG = "config.json"
OFFICIAL_WEIGHTS = "projector.pth"
OFFICIAL_MEMORY = "memory_token_embedding.pth"
ADAPTERS = ("encoder", "decoder")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DEFAULT_CHECKPOINT = Path(__file__).parent / "default"

# the paper's feature_extract_method -> (our backbone, bidirectional encoder)
_PAPER_METHODS = {
    "mean_pooling": ("mean_pooling", True),
    "mean_pooling_causal": ("mean_pooling", False),
    "last_tokens": ("last_tokens", False),
    "same_memory_tokens": ("compression_tokens", False),
    "different_memory_tokens": ("compression_tokens", False),
}
_ALIASES = {
    "mean_pooling_by_ratio": "mean_pooling",
    "mean_pooling_by_ratio_causal": "mean_pooling_causal",
}


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or does not fit the model it is loaded into."""


@dataclass
class LoadedCheckpoint:
    """What a checkpoint holds, loaded: the parts a `SemiDynamicCompressor` is assembled from."""

    config: CompressorConfig
    encoder: PeftModel
    """The encoder's base with its ``encoder`` adapter (on a shared base also ``decoder``)."""
    decoder: PeftModel
    """The decoder's base with its ``decoder`` adapter: ``encoder`` itself on a shared base."""
    tensors: dict[str, torch.Tensor]
    """Our own tensors by file key (``ratio_head.*``, ``converter.*``, ``memory``), on the CPU;
    `copy_tensors` moves them into the model, checked."""
    source: Path
    """The file ``tensors`` came from (errors name it)."""


def save_checkpoint(
    directory: str | Path,
    config: CompressorConfig,
    tensors: dict[str, torch.Tensor],
    encoder: PeftModel,
    decoder: PeftModel,
) -> None:
    """Write our layout: ``tensors`` (our own, by file key), the ``encoder`` adapter of
    ``encoder`` and the ``decoder`` adapter of ``decoder`` (the same model on a shared base).

    The config goes last, so a half-written directory never looks complete. Adapter configs name
    their base portably (never a path of this machine).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, out / MODULES_NAME)
    had_card = (out / "README.md").exists()
    for peft_model in (encoder, decoder):
        for peft_config in peft_model.peft_config.values():
            if peft_config.base_model_name_or_path:
                name = portable_name(peft_config.base_model_name_or_path)
                peft_config.base_model_name_or_path = name
    # our LoRA never targets embeddings; "auto" would probe the base name on disk and the hub
    options = {"save_embedding_layers": False}
    encoder.save_pretrained(out, selected_adapters=["encoder"], **options)
    decoder.save_pretrained(out, selected_adapters=["decoder"], **options)
    if not had_card:  # PEFT's boilerplate model card; the config JSON describes the model
        (out / "README.md").unlink(missing_ok=True)
    tmp = out / f".{CONFIG_NAME}.tmp"
    tmp.write_text(config.model_dump_json(indent=2))
    os.replace(tmp, out / CONFIG_NAME)


def _require(directory: Path, *names: str) -> None:
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a JSON object")
    return raw


def _read_pth(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (no code runs), errors naming the file.

    ``torch.load`` does not verify the CRC32 that ``torch.save`` writes for each entry of its zip
    archive, so damaged tensor bytes would load as silently wrong weights: the archive is checked
    first (the legacy non-zip format carries no checksum to check).
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
            if damaged is not None:
                raise CheckpointError(
                    f"{path} is damaged: entry {damaged} fails its checksum; copy the file again"
                )
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, truncation and I/O errors all mean the same here
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc


def _resolve(name_or_path: str | Path | None) -> Path:
    if name_or_path is None:
        if not (DEFAULT_CHECKPOINT / CONFIG_NAME).exists():
            raise CheckpointError(
                f"no bundled default compressor at {DEFAULT_CHECKPOINT}; name a checkpoint"
            )
        return DEFAULT_CHECKPOINT
    path = Path(name_or_path)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path)))
    # offline, unknown repository, malformed id: the hub's own messages do not name the input
    except Exception as exc:
        raise CheckpointError(
            f"compressor {name_or_path}: no such local directory, and not a hub model that could "
            f"be fetched ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "check the path, or download the model while online"
        ) from exc


# ---------------------------------------------------------------------- adapters
def _adapter_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    found = [directory / n for n in ADAPTER_WEIGHTS if (directory / n).is_file()]
    if not found:
        raise CheckpointError(
            f"adapter {directory} is missing {ADAPTER_WEIGHTS[0]} (the LoRA weights); copy the "
            "whole checkpoint directory"
        )
    path = found[0]
    if path.suffix == ".safetensors":
        try:
            return path, load_file(path)
        except Exception as exc:  # safetensors raises its own error type for a damaged header
            raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
    state = _read_pth(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return path, state


def _onto_causal_lm(weights: dict[str, torch.Tensor], base: PreTrainedModel) -> dict[str, Any]:
    """Re-key an adapter saved over the bare transformer (``AutoModel``: ``base_model.model.
    layers.N...``) for the causal LM that wraps it (``base_model.model.model.layers.N...``).

    Keys that already address the causal LM are kept, so both layouts load; a key that fits
    neither stays as it is and is then reported as unexpected.
    """
    prefix = "base_model.model."
    inner_name = getattr(base, "base_model_prefix", "model")
    inner = getattr(base, inner_name, None)
    outer = {name for name, _ in base.named_children()}
    keyed = {}
    for key, value in weights.items():
        head = key[len(prefix) :].split(".", 1)[0] if key.startswith(prefix) else None
        if head is not None and head not in outer and inner is not None and hasattr(inner, head):
            key = f"{prefix}{inner_name}.{key[len(prefix) :]}"
        keyed[key] = value
    return keyed


def attach_adapter(
    model: PreTrainedModel | PeftModel, directory: str | Path, name: str
) -> PeftModel:
    """Load the LoRA adapter saved in ``directory`` onto ``model`` as adapter ``name``.

    ``model`` is a causal LM (a new `PeftModel` is made around it) or a `PeftModel` that gets one
    more adapter. Adapters saved over the bare transformer (the paper's encoder) are re-keyed for
    the causal LM. Raises `CheckpointError` naming the file and the keys when any LoRA tensor of
    the adapter is not in the file, or any tensor of the file has no place in the model.
    """
    directory = Path(directory)
    _require(directory, ADAPTER_CONFIG)
    try:
        config = PeftConfig.from_pretrained(str(directory))
    except Exception as exc:  # a damaged or foreign adapter_config.json
        raise CheckpointError(f"{directory / ADAPTER_CONFIG} cannot be read ({exc})") from exc
    path, weights = _adapter_weights(directory)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    weights = _onto_causal_lm(weights, base)
    config = copy.deepcopy(config)
    # Our encoder is the causal LM's inner stack, whatever the adapter was saved over; one
    # task type also keeps `generate` on a shared base whichever adapter is attached first.
    config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    config.base_model_name_or_path = base.name_or_path  # the base it now sits on
    try:
        if isinstance(model, PeftModel):
            model.add_adapter(name, config)
            peft = model
        else:
            peft = get_peft_model(model, config, adapter_name=name)
        result = set_peft_model_state_dict(peft, weights, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatch, unknown modules
        raise CheckpointError(f"{path} does not fit the base model: {exc}") from exc
    marker = f".{name}."
    missing = sorted(k for k in result.missing_keys if "lora_" in k and marker in k)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        base_class = (getattr(config, "auto_mapping", None) or {}).get("base_model_class")
        saved_over = f" (saved over {base_class})" if base_class else ""
        raise CheckpointError(
            f"{path}{saved_over}: LoRA weights not loaded onto {type(base).__name__}: "
            f"{len(missing)} missing {_keys(missing)}, {len(unexpected)} unexpected "
            f"{_keys(unexpected)}"
        )
    return peft


def _keys(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "[]"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def _base(
    name: str,
    gguf_file: str | None,
    config: CompressorConfig,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    role: str,
) -> PreTrainedModel:
    try:
        return load_base(name, gguf_file, config, device, dtype)
    except OSError as exc:
        raise CheckpointError(
            f"the {role} base model {name!r} cannot be loaded ({exc}); pass "
            f"{role}_model=<a local copy> to from_pretrained"
        ) from exc


def _with_adapters(
    config: CompressorConfig,
    directory: Path,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
) -> tuple[PeftModel, PeftModel]:
    """Load the base model(s) and attach the saved ``encoder``/``decoder`` adapters, checked."""
    for adapter in ADAPTERS:  # before any base loads: a broken copy fails fast
        _require(directory, f"{adapter}/{ADAPTER_CONFIG}")
        _adapter_weights(directory / adapter)
    enc_base = _base(
        config.encoder_model, config.encoder_gguf_file, config, device, dtype, "encoder"
    )
    encoder = attach_adapter(enc_base, directory / "encoder", "encoder")
    if config.shared_base:
        decoder = attach_adapter(encoder, directory / "decoder", "decoder")
    else:
        dec_base = _base(
            config.decoder_model or config.encoder_model,
            config.decoder_gguf_file,
            config,
            device,
            dtype,
            "decoder",
        )
        decoder = attach_adapter(dec_base, directory / "decoder", "decoder")
    return encoder, decoder


def copy_tensors(
    live: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str | Path
) -> None:
    """Copy ``state`` into the ``live`` tensors of the same keys, cast to their dtype.

    Raises `CheckpointError` naming ``source`` for a missing or unexpected key (before anything
    is copied), a value that is not a tensor, or one of another shape.
    """
    own = live
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    with torch.no_grad():
        for key, target in own.items():
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
            if target.shape != value.shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(value.shape)} but the model needs "
                    f"{tuple(target.shape)} (hidden sizes of the checkpoint and the base differ)"
                )
            target.copy_(value.to(target.dtype))


def _local_bases(raw: dict, directory: Path) -> dict:
    """Base paths written ``./name`` live inside the checkpoint (bases trained with it, e.g. from
    scratch): resolve them against the checkpoint directory, not the working directory."""
    for key in ("encoder_model", "decoder_model"):
        value = raw.get(key)
        if isinstance(value, str) and value.startswith("./"):
            raw[key] = str(directory / value[2:])
    return raw


def read_config(directory: str | Path, **overrides: object) -> CompressorConfig:
    """The config of a checkpoint in our layout (``directory / CONFIG_NAME``), without loading
    weights: ``./`` base paths resolved against ``directory``, the checkpoint's own
    ``trust_remote_code`` dropped (only an override enables remote code), ``overrides`` applied.

    Raises `CheckpointError` naming the file when it is missing, unreadable or not a valid config.
    """
    directory = Path(directory)
    raw = _local_bases(_read_json(directory / CONFIG_NAME), directory)
    raw.pop("trust_remote_code", None)
    try:
        return CompressorConfig.model_validate({**raw, **overrides})
    except ValueError as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {exc}") from exc


def load_checkpoint(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: object,
) -> LoadedCheckpoint:
    """Load our layout or the paper's (`load_official`): a local directory, a hub id, or ``None``
    for the bundled default; ``overrides`` replace config fields (e.g. ``mode``).

    A checkpoint's own ``trust_remote_code`` is ignored: only an override enables remote code.
    Raises `CheckpointError` naming the file for a missing or damaged file, or an adapter that
    does not fit its base.
    """
    directory = _resolve(name_or_path)
    if (directory / CONFIG_NAME).exists():
        _require(directory, MODULES_NAME)
        config = read_config(directory, **overrides)
        encoder, decoder = _with_adapters(config, directory, device, dtype)
        try:
            state = load_file(directory / MODULES_NAME)
        except Exception as exc:  # a truncated or foreign file
            raise CheckpointError(
                f"{directory / MODULES_NAME} cannot be read ({type(exc).__name__}: {exc})"
            ) from exc
        return LoadedCheckpoint(config, encoder, decoder, state, directory / MODULES_NAME)
    if (directory / OFFICIAL_CONFIG).exists() and (directory / OFFICIAL_WEIGHTS).exists():
        return load_official(directory, device=device, dtype=dtype, **overrides)
    raise CheckpointError(
        f"{directory} is not a compressor checkpoint: expected {CONFIG_NAME} (ours) or "
        f"{OFFICIAL_CONFIG} + {OFFICIAL_WEIGHTS} (the paper's release)"
    )


def _ratio_values(raw: dict, path: Path) -> list[float | int]:
    values = raw.get("comp_ratio_or_len", raw.get("num_doc_tokens"))
    values = values if isinstance(values, list) else [values]
    if not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise CheckpointError(
            f"{path}: comp_ratio_or_len must be positive numbers (ratios in (0, 1] or latent "
            f"counts), got {raw.get('comp_ratio_or_len')!r}"
        )
    return values


def official_config(
    raw: dict, *, has_head: bool = True, source: Path | None = None, **overrides: object
) -> CompressorConfig:
    """Translate the paper's ``config.json`` into a `CompressorConfig` with its inference semantics.

    Ratios there are fractions (0.125 = 8x) kept in their order; latent counts are integers. The
    result pools the context and its ``<eos>`` (``pool_eos``), start-aligned when the head picks
    the ratio and end-aligned when it is fixed (``fixed_ratio_alignment``), keeps the encoder
    tokenizer's special tokens, discretises as that code does (``selector_semantics``), gates the
    converter on its raw input and keeps LoRA in float32. Several ratios without a ratio head
    (``has_head=False``: a multi-ratio static checkpoint) give ``multi_ratio`` mode. Raises
    `CheckpointError` naming ``source`` for a field that is missing or wrong.
    """
    path = source or Path(OFFICIAL_CONFIG)
    method = raw.get("feature_extract_method", raw.get("compress_method", "mean_pooling"))
    method = _ALIASES.get(method, method)
    if method not in _PAPER_METHODS:
        raise CheckpointError(f"{path}: unknown feature_extract_method {method!r}")
    backbone, bidirectional = _PAPER_METHODS[method]
    encoder = raw.get("base_encoder_model_path", raw.get("base_embed_model_path"))
    decoder = raw.get("base_decoder_model_path", raw.get("base_gen_model_path"))
    if not isinstance(encoder, str) or not encoder:
        raise CheckpointError(f"{path} names no base_encoder_model_path")
    values = _ratio_values(raw, path)
    fields: dict[str, object] = {
        "encoder_model": encoder,
        # one base named twice is one shared base: an encoder_model override then moves both
        "decoder_model": None if decoder in (None, encoder) else decoder,
        "backbone": backbone,
        "bidirectional": bidirectional,
        "pooling_alignment": "start",
        "fixed_ratio_alignment": "end",
        "pool_eos": True,
        "keep_special_tokens": True,
        "selector_semantics": "official",
        "converter_gate_input": "raw",
        "lora_float32": True,
        "quantize": raw.get("discretize_ratio_mode", "round"),
        "compare_space": "log2" if raw.get("discretize_compare_in_log") else "linear",
        "converter_hidden": raw.get("mlp_converter_hidden_dim", raw.get("mlp_hidden_dim", 4096)),
    }
    several = len(values) > 1
    if backbone == "mean_pooling":
        if not all(0 < v <= 1 for v in values):
            raise CheckpointError(
                f"{path}: {method} takes ratios in (0, 1] as comp_ratio_or_len, got {values}"
            )
        fields["ratios"] = [1.0 / v for v in values]
        if several and has_head:
            fields["mode"] = "semi_dynamic"
            fields["fixed_ratio"] = min(fields["ratios"])
        else:
            fields["mode"] = "multi_ratio" if several else "fixed_ratio"
            fields["fixed_ratio"] = min(fields["ratios"])
    else:
        if not all(isinstance(v, int) for v in values):
            raise CheckpointError(
                f"{path}: {method} takes latent counts (ints) as comp_ratio_or_len, got {values}"
            )
        fields["lengths"] = list(values)
        fields["fixed_length"] = max(values) if several else values[0]
        fields["mode"] = "semi_dynamic" if several and has_head else "fixed_length"
        if backbone == "compression_tokens":
            fields["num_memory_tokens"] = max(values)
    fields.update(overrides)
    try:
        return CompressorConfig.model_validate(fields)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _split_projector(weights: Any, path: Path) -> tuple[dict, dict | None]:
    """Converter and ratio-head state dicts from ``projector.pth`` in any of its saved forms:
    ``{"projector": ..., "compress_ratio_head": ...}`` (semi-dynamic), the flat converter state
    dict (fixed ratio), or converter keys prefixed ``projector.``."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds a {type(weights).__name__}, not a state dict")
    if "projector" in weights:
        projector = weights["projector"]
        head = weights.get("compress_ratio_head")
        extra = sorted(set(weights) - {"projector", "compress_ratio_head"})
    elif any(str(k).startswith("projector.") for k in weights):
        projector = {
            k[len("projector.") :]: v for k, v in weights.items() if k.startswith("projector.")
        }
        head = {
            k[len("compress_ratio_head.") :]: v
            for k, v in weights.items()
            if k.startswith("compress_ratio_head.")
        } or None
        extra = sorted(
            k for k in weights if not k.startswith(("projector.", "compress_ratio_head."))
        )
    else:
        projector, head, extra = weights, None, []
    if extra:
        raise CheckpointError(f"{path}: unexpected entries {extra}")
    for part, name in ((projector, "projector"), (head, "compress_ratio_head")):
        if part is not None and not isinstance(part, dict):
            raise CheckpointError(f"{path}: {name} is a {type(part).__name__}, not a state dict")
    return projector, head


def _memory_rows(
    raw: dict, directory: Path, config: CompressorConfig, encoder: PeftModel, method: str
) -> torch.Tensor:
    """The compression-token embeddings the paper's code appends: vocabulary rows from
    ``memory_token_begin_id`` (one row repeated, or consecutive rows), with the trained rows of
    ``memory_token_embedding.pth`` written over the base's."""
    count = config.memory_tokens
    begin = raw.get("memory_token_begin_id", 151000)
    table = encoder.get_input_embeddings().weight.detach().clone()
    distinct = method == "different_memory_tokens"
    valid = isinstance(begin, int) and not isinstance(begin, bool) and begin >= 0
    wanted = list(range(begin, begin + count)) if valid and distinct else [begin]
    if not valid or wanted[-1] >= table.shape[0]:
        raise CheckpointError(
            f"{directory / OFFICIAL_CONFIG}: memory_token_begin_id {begin!r} with {len(wanted)} "
            f"memory tokens lies outside the encoder's vocabulary of {table.shape[0]}"
        )
    path = directory / OFFICIAL_MEMORY
    if path.exists():
        state = _read_pth(path)
        if not isinstance(state, dict) or set(state) != {"indices", "weight"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{path}: expected keys ['indices', 'weight'], found {keys}")
        indices, weight = state["indices"], state["weight"]
        indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        missing = sorted(set(wanted) - set(indices))
        unexpected = sorted(set(indices) - set(wanted))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: token rows missing {missing or 'none'}, unexpected "
                f"{unexpected or 'none'} (expected rows {wanted[0]}..{wanted[-1]})"
            )
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (
            len(indices),
            table.shape[1],
        ):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
            raise CheckpointError(
                f"{path}: weight has shape {shape}, expected {(len(indices), table.shape[1])}"
            )
        table[indices] = weight.to(device=table.device, dtype=table.dtype)
    elif raw.get("encoder_training", "none") != "none":
        raise CheckpointError(
            f"checkpoint {directory} is missing {OFFICIAL_MEMORY}: its encoder was trained "
            f"({raw.get('encoder_training')!r}), so its memory-token rows were saved there"
        )
    rows = wanted if distinct else [begin] * count
    return table[rows]


def load_official(
    directory: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: object,
) -> LoadedCheckpoint:
    """The paper's released weights, as parts that run through our API as its inference code does.

    No research code runs and nothing is unpickled beyond tensors. The model pools the context
    with its ``<eos>``, keeps the encoder tokenizer's special tokens and discretises as the
    paper's code (see `official_config`); ``overrides`` replace any config field. Raises
    `CheckpointError` naming the file for anything missing, damaged or not loaded.
    """
    directory = Path(directory)
    _require(directory, OFFICIAL_CONFIG, OFFICIAL_WEIGHTS)
    raw = _read_json(directory / OFFICIAL_CONFIG)
    path = directory / OFFICIAL_WEIGHTS
    projector, head = _split_projector(_read_pth(path), path)
    overrides.setdefault("converter_gated", "gate_proj.weight" in projector)
    config = official_config(
        raw, has_head=head is not None, source=directory / OFFICIAL_CONFIG, **overrides
    )
    for name in ("encoder_training", "decoder_training"):
        if raw.get(name, "lora") != "lora":
            raise CheckpointError(
                f"{directory / OFFICIAL_CONFIG}: {name}={raw.get(name)!r}; only LoRA-trained "
                "encoders and decoders can be imported (a fully trained one is a new base model)"
            )
    encoder, decoder = _with_adapters(config, directory, device, dtype)
    state = {f"converter.{k}": v for k, v in projector.items()}
    if head is not None:
        state.update({f"ratio_head.{k}": v for k, v in head.items()})
    else:
        # No ratio head was trained: NaN marks it, so a mode that would consult it fails loudly
        # (the selector refuses a non-finite prediction) instead of following random weights.
        width = encoder.get_base_model().config.hidden_size
        state["ratio_head.weight"] = torch.zeros(1, width)
        state["ratio_head.bias"] = torch.full((1,), float("nan"))
    if config.backbone == "compression_tokens":
        method = _ALIASES.get(raw.get("feature_extract_method"), raw.get("feature_extract_method"))
        state["memory"] = _memory_rows(raw, directory, config, encoder, method)
    logger.info(
        "imported the paper's checkpoint %s as %s/%s", directory, config.backbone, config.mode
    )
    return LoadedCheckpoint(config, encoder, decoder, state, path)


def tokenizer_digest(tokenizer: Any) -> str:
    """Hex sha256 of what decides a tokenizer's ids for a text: a fast tokenizer's whole definition
    (normalizer, pre-tokenizer, vocabulary, merges, added tokens, post-processor), else its class
    and vocabulary; plus its eos id (appended when pooling ``<eos>``). No paths are hashed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        definition = json.dumps([type(tokenizer).__name__, vocab], ensure_ascii=False)
    digest = hashlib.sha256(definition.encode("utf-8", "surrogatepass"))
    digest.update(f"|eos={tokenizer.eos_token_id}".encode())
    return digest.hexdigest()


def fingerprint(
    config: CompressorConfig,
    tokenizer: Any,
    tensors: dict[str, torch.Tensor],
    encoder: PeftModel,
    decoder: PeftModel,
    encoder_depth: int,
) -> str:
    """A short hash of what determines the latents: config, and every weight that shapes them.

    ``tokenizer`` is the encoder's, ``tensors`` our own by file key (`LoadedCheckpoint.tensors`),
    ``encoder``/``decoder`` the LoRA-wrapped bases (one model on a shared base),
    ``encoder_depth`` the encoder layers a pass runs.

    Hashed: the compressor config (without base paths), both bases' architecture configs, the
    encoder's tokenizer (`tokenizer_digest`), our own tensors (ratio head, converter, memory),
    every LoRA tensor, the decoder's input-embedding table, and **every encoder base weight the
    encoder pass runs** (its embeddings and its layers up to ``encoder_depth``; the layers past an
    early exit and the LM head do not shape latents). So a base whose weights or tokenizer were
    replaced at the same path, or weights loaded into a live model, give another fingerprint.
    Base models are identified by content rather than by path, so the same checkpoint copied to
    another folder or machine keeps its fingerprint (and a store precompressed elsewhere stays
    usable). Tensors are hashed as raw bytes with their dtype and shape (about
    1.5 GB/s; ``SemiDynamicCompressor.fingerprint`` caches the result until a weight changes).
    """
    fields = config.model_dump(exclude={"encoder_model", "decoder_model"})
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    tensors = dict(tensors)
    for role, peft_model in (("encoder", encoder), ("decoder", decoder)):
        base = peft_model.get_base_model()
        base_config = base.config.to_dict()
        base_config.pop("_name_or_path", None)
        # a GGUF base loads from its converted cache copy or (no writable cache) from the file
        # itself, with the same weights: only the latter carries the GGUF quantization_config
        if (base_config.get("quantization_config") or {}).get("quant_method") == "gguf":
            base_config.pop("quantization_config")
        digest.update(json.dumps(base_config, sort_keys=True, default=str).encode())
        tensors[f"{role}.embed_tokens"] = base.get_input_embeddings().weight
    # the encoder's token ids shape the latents as much as its weights: a tokenizer replaced at
    # the same path (another normalizer, vocabulary or merges) must not reuse the old latents
    digest.update(tokenizer_digest(tokenizer).encode())
    skipped_layers = re.compile(r"\.layers\.(\d+)\.")
    for name, param in encoder.get_base_model().named_parameters():
        layer = skipped_layers.search(name)
        if layer is not None and int(layer.group(1)) >= encoder_depth:
            continue
        if name.startswith("lm_head."):
            continue
        tensors[f"encoder.base.{name}"] = param
    # LoRA tensors keyed as the compressor's `named_parameters` names them (one base: once)
    roles = [("encoder", encoder)] + ([] if decoder is encoder else [("decoder", decoder)])
    for role, peft_model in roles:
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                tensors[f"{role}.{name}"] = param
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:32]
