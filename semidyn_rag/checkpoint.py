"""Saving and loading compressors: our layout, and import of the paper's released checkpoints.

Our layout (everything but JSON is safetensors, so loading never unpickles)::

    DIR/semidyn_config.json      CompressorConfig
    DIR/modules.safetensors      ratio_head.*, converter.*, memory
    DIR/encoder/, DIR/decoder/   peft LoRA adapters

The paper's layout: ``config.json`` (``comp_ratio_or_len``, ``feature_extract_method``, ...),
``projector.pth`` (``{"projector": ..., "compress_ratio_head": ...}``, read with
``weights_only=True``) and the same two adapter folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from .config import CompressorConfig
from .loading import load_base
from .modeling import SemiDynamicCompressor

logger = logging.getLogger(__name__)

CONFIG_NAME = "semidyn_config.json"
MODULES_NAME = "modules.safetensors"
OFFICIAL_CONFIG = "config.json"
OFFICIAL_WEIGHTS = "projector.pth"
ADAPTERS = ("encoder", "decoder")
DEFAULT_CHECKPOINT = Path(__file__).parent / "default"

_BACKBONES = {
    "mean_pooling": ("mean_pooling", True),
    "mean_pooling_causal": ("mean_pooling", False),
    "last_tokens": ("last_tokens", False),
    "same_memory_tokens": ("compression_tokens", False),
    "different_memory_tokens": ("compression_tokens", False),
}


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or does not fit the model it is loaded into."""


def _own_tensors(model: SemiDynamicCompressor) -> dict[str, torch.Tensor]:
    """The live tensors that are ours (not the base's, not LoRA's), by their file names."""
    state = {f"ratio_head.{k}": v for k, v in model.ratio_head.state_dict().items()}
    state.update({f"converter.{k}": v for k, v in model.converter.state_dict().items()})
    if model.memory is not None:
        state["memory"] = model.memory.data
    return state


def _own_state(model: SemiDynamicCompressor) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in _own_tensors(model).items()}


def save_compressor(model: SemiDynamicCompressor, directory: str | Path) -> None:
    """Write our layout; the config goes last so a half-written directory never looks complete."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_own_state(model), out / MODULES_NAME)
    model.encoder.save_pretrained(out, selected_adapters=["encoder"])
    if model.decoder is model.encoder:
        model.encoder.save_pretrained(out, selected_adapters=["decoder"])
    else:
        model.decoder.save_pretrained(out, selected_adapters=["decoder"])
    tmp = out / f".{CONFIG_NAME}.tmp"
    tmp.write_text(model.config.model_dump_json(indent=2))
    os.replace(tmp, out / CONFIG_NAME)


def _require(directory: Path, *names: str) -> None:
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {', '.join(missing)}")


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

    return Path(snapshot_download(str(name_or_path)))


def _with_adapters(
    config: CompressorConfig,
    directory: Path,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
) -> SemiDynamicCompressor:
    """Load the base model(s) and attach the saved ``encoder``/``decoder`` adapters."""
    _require(directory, *(f"{a}/adapter_config.json" for a in ADAPTERS))
    enc_base = load_base(config.encoder_model, config.encoder_gguf_file, config, device, dtype)
    encoder = PeftModel.from_pretrained(enc_base, directory / "encoder", adapter_name="encoder")
    if config.shared_base:
        encoder.load_adapter(directory / "decoder", adapter_name="decoder")
        decoder = encoder
    else:
        dec_base = load_base(config.decoder_model, config.decoder_gguf_file, config, device, dtype)
        decoder = PeftModel.from_pretrained(dec_base, directory / "decoder", adapter_name="decoder")
    model = SemiDynamicCompressor(
        config, encoder, decoder, *SemiDynamicCompressor._tokenizers(config)
    )
    return model.eval()


def _load_state(model: SemiDynamicCompressor, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy our tensors in, naming any shape mismatch (e.g. a checkpoint for another base)."""
    own = _own_tensors(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    with torch.no_grad():
        for key, target in own.items():
            if target.shape != state[key].shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(state[key].shape)} but the model needs "
                    f"{tuple(target.shape)} (hidden sizes of the checkpoint and the base differ)"
                )
            target.copy_(state[key].to(target.dtype))


def _local_bases(raw: dict, directory: Path) -> dict:
    """Base paths written ``./name`` live inside the checkpoint (bases trained with it, e.g. from
    scratch): resolve them against the checkpoint directory, not the working directory."""
    for key in ("encoder_model", "decoder_model"):
        value = raw.get(key)
        if isinstance(value, str) and value.startswith("./"):
            raw[key] = str(directory / value[2:])
    return raw


def load_compressor(
    name_or_path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: object,
) -> SemiDynamicCompressor:
    """Load our layout or the paper's; ``overrides`` replace config fields (e.g. ``mode``)."""
    directory = _resolve(name_or_path)
    if (directory / CONFIG_NAME).exists():
        _require(directory, MODULES_NAME)
        raw = _local_bases(json.loads((directory / CONFIG_NAME).read_text()), directory)
        config = CompressorConfig.model_validate({**raw, **overrides})
        model = _with_adapters(config, directory, device, dtype)
        _load_state(model, load_file(directory / MODULES_NAME), directory)
        return model
    if (directory / OFFICIAL_CONFIG).exists() and (directory / OFFICIAL_WEIGHTS).exists():
        return import_official(directory, device=device, dtype=dtype, **overrides)
    raise CheckpointError(
        f"{directory} is not a compressor checkpoint: expected {CONFIG_NAME} (ours) or "
        f"{OFFICIAL_CONFIG} + {OFFICIAL_WEIGHTS} (the paper's release)"
    )


def official_config(raw: dict, **overrides: object) -> CompressorConfig:
    """Translate the paper's ``config.json`` into a `CompressorConfig`.

    Ratios there are fractions (0.125 = 8x) and lengths are integers; windows are end-aligned
    because that is how those weights were trained.
    """
    method = raw.get("feature_extract_method", "mean_pooling")
    if method not in _BACKBONES:
        raise CheckpointError(f"unknown feature_extract_method {method!r}")
    backbone, bidirectional = _BACKBONES[method]
    values = raw.get("comp_ratio_or_len")
    values = values if isinstance(values, list) else [values]
    fields: dict[str, object] = {
        "encoder_model": raw["base_encoder_model_path"],
        "decoder_model": raw.get("base_decoder_model_path"),
        "backbone": backbone,
        "bidirectional": bidirectional,
        "pooling_alignment": "end",
        "quantize": raw.get("discretize_ratio_mode", "round"),
        "compare_space": "log2" if raw.get("discretize_compare_in_log") else "linear",
        "converter_hidden": raw.get("mlp_converter_hidden_dim", 4096),
    }
    if all(0 < v < 1 for v in values):
        fields["ratios"] = sorted(round(1 / v) for v in values)
        fields["fixed_ratio"] = fields["ratios"][0]
        dynamic = len(values) > 1
        fields["mode"] = "semi_dynamic" if dynamic else "fixed_ratio"
        if backbone != "mean_pooling":
            fields["mode"] = "fixed_ratio" if not dynamic else "multi_ratio"
    else:
        fields["lengths"] = sorted(int(v) for v in values)
        fields["fixed_length"] = fields["lengths"][0]
        fields["mode"] = "semi_dynamic" if len(values) > 1 else "fixed_length"
    if backbone == "compression_tokens":
        fields["num_memory_tokens"] = max(fields.get("lengths", [1]))
    fields.update(overrides)
    return CompressorConfig.model_validate(fields)


def import_official(
    directory: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: object,
) -> SemiDynamicCompressor:
    """Run the paper's released weights through our API (no research code, no unpickling)."""
    directory = Path(directory)
    _require(directory, OFFICIAL_CONFIG, OFFICIAL_WEIGHTS)
    raw = json.loads((directory / OFFICIAL_CONFIG).read_text())
    weights = torch.load(directory / OFFICIAL_WEIGHTS, map_location="cpu", weights_only=True)
    projector = weights["projector"]
    overrides.setdefault("converter_gated", "gate_proj.weight" in projector)
    config = official_config(raw, **overrides)
    model = _with_adapters(config, directory, device, dtype)
    state = {f"converter.{k}": v for k, v in projector.items()}
    head = weights.get("compress_ratio_head")
    # fixed-ratio releases ship no ratio head; the fresh one is then never consulted
    head = head or model.ratio_head.state_dict()
    state.update({f"ratio_head.{k}": v for k, v in head.items()})
    if model.memory is not None:
        begin = int(raw["memory_token_begin_id"])
        table = model.encoder.get_input_embeddings().weight.detach()
        rows = [begin] * config.memory_tokens
        if raw.get("feature_extract_method") == "different_memory_tokens":
            rows = list(range(begin, begin + config.memory_tokens))
        state["memory"] = table[rows].clone()
    _load_state(model, state, directory)
    logger.info(
        "imported the paper's checkpoint %s as %s/%s", directory, config.backbone, config.mode
    )
    return model


def fingerprint(model: SemiDynamicCompressor) -> str:
    """A short hash of what determines the latents: config, base weights' identity, trained tensors.

    Base models are identified by their architecture config and input-embedding table rather than
    by path, so the same checkpoint copied to another folder or machine keeps its fingerprint (and
    a store precompressed elsewhere stays usable), while another base under the same name does not.
    """
    config = model.config.model_dump(exclude={"encoder_model", "decoder_model"})
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    tensors = dict(_own_state(model))
    for role, peft_model in (("encoder", model.encoder), ("decoder", model.decoder)):
        base = peft_model.get_base_model()
        base_config = base.config.to_dict()
        base_config.pop("_name_or_path", None)
        digest.update(json.dumps(base_config, sort_keys=True, default=str).encode())
        tensors[f"{role}.embed_tokens"] = base.get_input_embeddings().weight.detach().cpu()
    for name, param in model.named_parameters():
        if "lora_" in name:
            tensors[name] = param.detach().cpu()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()[:32]
