"""Training: samples and density labels, the single-stage SFT trainer, teacher data synthesis."""

from .diagnostics import LatentUse, evaluate_loss, latent_use, relative_spread
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

__all__ = [
    "LatentUse",
    "RatioRegressor",
    "RatioRegressorConfig",
    "StepLog",
    "TrainConfig",
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
