"""Training: samples and density labels, the loss, the single-stage SFT trainer, teacher data.

Names are imported lazily, so that `semidyn_rag.training.loss` (which the model class uses)
does not pull in the trainer and its dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LatentUse": "diagnostics",
    "evaluate_loss": "diagnostics",
    "latent_use": "diagnostics",
    "relative_spread": "diagnostics",
    "LossOutput": "loss",
    "TrainExample": "loss",
    "RatioRegressor": "regressor",
    "RatioRegressorConfig": "regressor",
    "TrainSample": "samples",
    "density_label": "samples",
    "from_qa_sample": "samples",
    "from_qa_samples": "samples",
    "read_jsonl": "samples",
    "reconstruction_sample": "samples",
    "reconstruction_samples": "samples",
    "to_examples": "samples",
    "write_jsonl": "samples",
    "StepLog": "trainer",
    "TrainConfig": "trainer",
    "Trainer": "trainer",
    "list_checkpoints": "trainer",
}
__all__ = [
    "LatentUse",
    "LossOutput",
    "RatioRegressor",
    "RatioRegressorConfig",
    "StepLog",
    "TrainConfig",
    "TrainExample",
    "TrainSample",
    "Trainer",
    "density_label",
    "evaluate_loss",
    "from_qa_sample",
    "from_qa_samples",
    "latent_use",
    "list_checkpoints",
    "read_jsonl",
    "reconstruction_sample",
    "reconstruction_samples",
    "relative_spread",
    "to_examples",
    "write_jsonl",
]

if TYPE_CHECKING:
    from .diagnostics import LatentUse, evaluate_loss, latent_use, relative_spread
    from .loss import LossOutput, TrainExample
    from .regressor import RatioRegressor, RatioRegressorConfig
    from .samples import (
        TrainSample,
        density_label,
        from_qa_sample,
        from_qa_samples,
        read_jsonl,
        reconstruction_sample,
        reconstruction_samples,
        to_examples,
        write_jsonl,
    )
    from .trainer import StepLog, TrainConfig, Trainer, list_checkpoints


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'semidyn_rag.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
