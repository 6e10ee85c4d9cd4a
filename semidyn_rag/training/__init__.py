"""Training: samples and density labels, the single-stage SFT trainer, teacher data synthesis."""

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
from .trainer import StepLog, TrainConfig, Trainer, evaluate_loss, list_checkpoints

__all__ = [
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
    "list_checkpoints",
    "read_jsonl",
    "reconstruction_sample",
    "reconstruction_samples",
    "to_examples",
    "write_jsonl",
]
