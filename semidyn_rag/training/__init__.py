"""Training: samples and density labels, the loss, the single-stage SFT trainer, teacher data.

The model (`semidyn_rag.modeling`) does not import this package; the objective is the function
`loss.compressor_loss(model, examples, ...)`, which the `Trainer` minimises.
"""

from __future__ import annotations

from .diagnostics import LatentUse, evaluate_loss, latent_use, relative_spread
from .loss import LossFn, LossOutput, TrainExample, compressor_loss, distillation_loss
from .regressor import RatioRegressor, RatioRegressorConfig, regressor_loss
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

__all__ = [
    "LatentUse",
    "LossFn",
    "LossOutput",
    "RatioRegressor",
    "RatioRegressorConfig",
    "StepLog",
    "TrainConfig",
    "TrainExample",
    "TrainSample",
    "Trainer",
    "compressor_loss",
    "density_label",
    "distillation_loss",
    "evaluate_loss",
    "from_qa_sample",
    "from_qa_samples",
    "latent_use",
    "list_checkpoints",
    "read_jsonl",
    "reconstruction_sample",
    "reconstruction_samples",
    "regressor_loss",
    "relative_spread",
    "to_examples",
    "write_jsonl",
]
