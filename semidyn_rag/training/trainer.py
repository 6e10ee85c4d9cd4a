"""Single-stage SFT (Eq. 7): one small, readable training loop.

``Trainer(model, samples, TrainConfig(...)).train()`` optimises ``LM + λ·MSE`` with AdamW over the
trainable tensors (both LoRA adapters, ratio head, converter, memory tokens; the base weights too
with ``train_base``), gradient accumulation, warmup + cosine/linear decay, and clipping. Checkpoints
``output_dir/checkpoint-N`` hold a loadable compressor (``save_pretrained``: what a user ships, no
absolute paths in it); the trainer state (trainable tensors, AdamW moments and RNG in safetensors,
scalars in JSON, no pickle anywhere) lies beside them in ``output_dir/trainer-state/checkpoint-N``,
so ``resume_from`` continues exactly where the run stopped. ``accelerate`` prepares model and optimizer
(DDP across GPUs; a no-op on CPU), each process taking its own slice of every batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import statistics
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import CONFIG_NAME
from ..loading import portable_name
from ..modeling import SemiDynamicCompressor
from .align import AlignTarget, align_converter
from .diagnostics import LatentUse, latent_use
from .loss import LossFn, TrainExample, compressor_loss
from .samples import TrainSample, to_examples

logger = logging.getLogger(__name__)

STATE_DIR = "trainer"
"""Trainer state inside the checkpoint directory (``checkpoint-N/trainer/``): the older layout,
read when resuming from such a checkpoint."""
STATE_ROOT = "trainer-state"
"""Trainer state lives in ``output_dir/trainer-state/checkpoint-N/``, beside the checkpoints, so a
``checkpoint-N`` directory holds only what a user ships (config, adapters, our tensors)."""
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class TrainConfig(BaseModel):
    """Hyperparameters of one run. ``steps`` count optimizer steps; each sees
    ``batch_size × grad_accum × processes`` examples."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The schedule decays to ``lr × min_lr_ratio``."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    module_lr_scale: float = Field(1.0, gt=0)
    """Learning-rate multiplier for the tensors that start from random weights outside the base
    models (converter, ratio head, memory tokens): LoRA adapters start as a no-op and move slowly
    at a pretrained model's learning rate, while a fresh converter must travel far to map encoder
    states into the decoder's embedding space. Above 1 it speeds up latent collapse
    (docs/experiments.md)."""
    decoder_warmup_steps: int = Field(0, ge=0)
    """Keep the decoder's LoRA adapter fixed for the first this many steps (ICAE-style). A decoder
    that learns from the start can lower its loss by ignoring uninformative latents; held fixed, it
    leaves encoder and converter only one way down, writing latents it can read."""
    encoder_warmup_steps: int = Field(0, ge=0)
    """Keep the encoder side (its LoRA adapter, converter, memory tokens) fixed for the first this
    many steps, which also spares its backward pass; the ratio head learns. Meant to follow
    ``align_steps``: the decoder first learns to read latents that cannot collapse while it does,
    because nothing that makes them moves (collapse comes from encoder and converter;
    docs/experiments.md)."""
    align_steps: int = Field(0, ge=0)
    """Before step 0, fit the converter for this many steps to pooled decoder embeddings
    (`align.align_converter`, on up to ``align_contexts`` training contexts); 0: off."""
    align_contexts: int = Field(300, ge=1)
    align_target: AlignTarget = "mean"
    """What each latent is fitted to: the mean embedding of its window's tokens, or the embedding
    of its rarest token (see `align.align_converter`)."""
    mse_weight: float = Field(1.0, ge=0)
    """λ of Eq. 7."""
    kd_weight: float = Field(0.0, ge=0)
    """Weight of token-level distillation (`loss.distillation_loss`) on samples that carry
    teacher targets (`distill.teacher_answers`); 0: off."""
    hidden_weight: float = Field(0.0, ge=0)
    """Weight of hidden-state distillation (`loss.hidden_state_loss`: the decoder's states at the
    question and answer against the base decoder's reading the plain text) on samples whose
    contexts' texts are known; 0: off. Costs one more decoder pass (no gradient) per batch. The
    `Trainer` refuses a weight above 0 when no training example carries its texts."""
    gain_cap: float | None = Field(None, ge=1)
    """Weigh the LM and KD terms' answer tokens of samples with teacher targets by their context
    gain, capped here (`loss.context_gain_weights`, LongCE; 5 in its paper); ``None``: uniform.
    At least 1 (a lower cap would weigh the tokens the context helps no more than the others). The
    weights are normalised to mean 1 over each sample's answer tokens: they shift loss among its
    tokens, not between samples. Costs one more decoder pass (no gradient) over the questions
    alone per batch. The `Trainer` refuses a cap when no training example has teacher targets."""
    ratio_sampling: Literal["multi", "mode"] = "multi"
    """``multi``: one ratio drawn from the model's candidate set per optimizer step (multi-ratio
    and semi-dynamic mean pooling); ``mode``: the mode decides (fixed ratio/length; semi- and fully
    dynamic follow the label ``y`` where known)."""
    train_ratios: list[float] | None = None
    """The ratios multi-ratio sampling draws from (default: all of the model's candidates); e.g. the
    low ratios only, where a short run has the most to learn."""
    train_base: bool = False
    """Train the base weights as well (from-scratch runs, where LoRA on random weights is too weak);
    checkpoints then carry the trained base in ``base/``."""
    max_context_tokens: int | None = None
    """Truncate training contexts to this many tokens (default: the encoder segment size)."""
    seed: int = 0
    output_dir: str | None = None
    save_every: int = Field(0, ge=0)
    """Save ``checkpoint-N`` every this many steps (0: only at the end); needs ``output_dir``."""
    keep_last: int | None = Field(None, ge=1)
    """Delete older checkpoints beyond this many (None keeps all)."""
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)
    """Every this many steps (and at the end), log `diagnostics.latent_use` on the trainer's
    ``eval_samples``: held-out loss with the right vs another example's latents (0: off)."""
    resume_from: str | None = None
    """A checkpoint directory, or ``auto`` for the latest one in ``output_dir`` (none: start)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.save_every or self.resume_from == "auto") and not self.output_dir:
            raise ValueError("save_every and resume_from='auto' need output_dir")
        return self


class StepLog(BaseModel):
    step: int
    loss: float
    lm_loss: float
    mse_loss: float
    kd_loss: float | None = None
    """Token-level distillation term, mean over the step's micro-batches that had one."""
    hidden_loss: float | None = None
    """Hidden-state distillation term, mean over the step's micro-batches that had one."""
    lr: float
    ratio: float | None = None


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    floor = config.lr * config.min_lr_ratio
    if config.schedule == "constant" or config.steps <= config.warmup_steps:
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "linear":
        return floor + (config.lr - floor) * (1 - progress)
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _peft_prefixes(model: nn.Module) -> list[str]:
    return [name + "." for name, m in model.named_modules() if isinstance(m, PeftModel)]


def mark_trainable(model: nn.Module, train_base: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` and return the trainable ``(name, param)`` pairs in a fixed order.

    Everything outside the peft-wrapped base models trains (ratio head, converter, memory); inside
    them the LoRA tensors of every adapter train, and the base weights only with ``train_base``.
    """
    bases = _peft_prefixes(model)
    chosen = []
    for name, param in model.named_parameters():
        is_base = any(name.startswith(b) for b in bases) and "lora_" not in name
        param.requires_grad_(train_base or not is_base)
        if param.requires_grad:
            chosen.append((name, param))
    return chosen


def param_groups(
    model: nn.Module, params: Sequence[tuple[str, nn.Parameter]], config: TrainConfig
) -> list[dict]:
    """AdamW groups: weight decay on matrices only; ``module_lr_scale`` on the tensors outside
    the base models. Group ``lr_scale`` entries are applied by the schedule each step."""
    bases = _peft_prefixes(model)
    groups = []
    for fresh in (False, True):
        for decay in (True, False):
            chosen = [
                p
                for name, p in params
                if (not any(name.startswith(b) for b in bases)) == fresh and (p.dim() >= 2) == decay
            ]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "weight_decay": config.weight_decay if decay else 0.0,
                        "lr_scale": config.module_lr_scale if fresh else 1.0,
                    }
                )
    return groups


class _Loss(nn.Module):
    """Puts ``loss_fn(model, ...)`` behind ``forward``, with the model as a submodule, so that
    DDP (``accelerator.prepare``) sees the call and syncs the model's gradients."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(
        self,
        examples: Sequence[TrainExample],
        ratio: float | None,
        mse_weight: float,
        encoder_grad: bool,
        kd_weight: float,
        hidden_weight: float,
        gain_cap: float | None,
    ) -> tuple[torch.Tensor, ...]:
        """``(loss, lm, mse, kd, hidden)``; a distillation term that is off or absent is NaN."""
        out = self.loss_fn(
            self.model,
            examples,
            ratio=ratio,
            mse_weight=mse_weight,
            encoder_grad=encoder_grad,
            kd_weight=kd_weight,
            hidden_weight=hidden_weight,
            gain_cap=gain_cap,
        )
        nan = torch.tensor(float("nan"))
        kd = nan if out.kd_loss is None else out.kd_loss
        hidden = nan if out.hidden_loss is None else out.hidden_loss
        return out.loss, out.lm_loss, out.mse_loss, kd, hidden


class Trainer:
    """Trains a model on `TrainSample`s or examples, minimising ``loss_fn`` (a `loss.LossFn`):
    `loss.compressor_loss` for a `SemiDynamicCompressor` (the default),
    `regressor.regressor_loss` for a `regressor.RatioRegressor`."""

    def __init__(
        self,
        model: nn.Module,
        samples: Sequence[TrainSample] | Sequence[TrainExample],
        config: TrainConfig,
        eval_samples: Sequence[TrainSample] | Sequence[TrainExample] = (),
        *,
        loss_fn: LossFn = compressor_loss,
    ) -> None:
        if not samples:
            raise ValueError("no training samples")
        if config.eval_every and len(eval_samples) < 2:
            raise ValueError(
                "eval_every needs at least two eval_samples (their latents are swapped)"
            )
        candidates = getattr(getattr(model, "config", None), "ratios", None) or []
        unknown = set(config.train_ratios or []) - set(candidates)
        if unknown:
            raise ValueError(f"train_ratios {sorted(unknown)} are not in the model's {candidates}")
        self.config = config
        self.model = model
        self.loss_fn = loss_fn
        self.examples = self._examples(samples)
        self.eval_examples = self._examples(eval_samples)
        if config.hidden_weight and all(getattr(ex, "texts", None) is None for ex in self.examples):
            raise ValueError(
                f"hidden_weight={config.hidden_weight}, but no training example carries its "
                "contexts' texts (TrainExample.texts; to_examples drops them where a context was "
                "cut to max_context_tokens): hidden-state distillation would never run"
            )
        if config.gain_cap is not None and all(
            getattr(ex, "teacher_ids", None) is None for ex in self.examples
        ):
            raise ValueError(
                f"gain_cap={config.gain_cap}, but no training example has teacher targets "
                "(TrainExample.teacher_ids, from distill.teacher_answers): the context-gain "
                "weights would never apply"
            )
        self.labelled = sum(
            1 for ex in self.examples if any(math.isfinite(y) for y in getattr(ex, "y", ()))
        )
        """Examples with at least one density label: the ratio head's only training signal."""
        self._warn_unlabelled(model)
        self.latent_use: list[tuple[int, LatentUse]] = []
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        model.train()
        self.params = mark_trainable(model, config.train_base)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, self.params, config), lr=config.lr, betas=config.betas
        )
        self.loss_module, self.prepared_optimizer = self.accelerator.prepare(
            _Loss(model, loss_fn), self.optimizer
        )
        self.step = 0
        self.history: list[StepLog] = []
        self._orders: dict[int, list[int]] = {}
        n_params = sum(p.numel() for _, p in self.params)
        logger.info(
            "training %d tensors (%.2fM values) on %d examples",
            len(self.params),
            n_params / 1e6,
            len(self.examples),
        )

    def _warn_unlabelled(self, model: nn.Module) -> None:
        """Say loudly when the ratio head cannot learn: no example carries a density label."""
        if self.labelled or self.config.mse_weight == 0:
            return
        mode = getattr(getattr(model, "config", None), "mode", None)
        if mode not in ("semi_dynamic", "fully_dynamic", None):
            return  # a fixed or multi-ratio model never consults the head
        logger.warning(
            "none of the %d training examples carries a density label y: the ratio head gets "
            "no training signal (the MSE term is 0 at every step) and semi-dynamic compression "
            "will choose ratios from an untrained head. Add labelled samples (`semidyn synth`, "
            "or density labels in --samples files), or pass --mse-weight 0 to train without it",
            len(self.examples),
        )

    # ------------------------------------------------------------------ data
    def _examples(
        self, samples: Sequence[TrainSample] | Sequence[TrainExample]
    ) -> list[TrainExample]:
        if samples and isinstance(samples[0], TrainSample):
            return to_examples(self.model, samples, self.config.max_context_tokens)  # type: ignore[arg-type]
        return list(samples)  # type: ignore[arg-type]

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(self.config.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def batch(self, step: int, micro: int) -> list[TrainExample]:
        """This process's examples for one micro-batch: a pure function of the step (resumable)."""
        cfg, acc = self.config, self.accelerator
        size = cfg.batch_size
        first = ((step * cfg.grad_accum + micro) * acc.num_processes + acc.process_index) * size
        n = len(self.examples)
        return [self.examples[self._order(i // n)[i % n]] for i in range(first, first + size)]

    def ratio_for(self, step: int) -> float | None:
        if self.config.ratio_sampling == "mode":
            return None
        ratios = self.config.train_ratios or getattr(self.model.config, "ratios", None)
        if not ratios:  # e.g. a ratio regressor: no structure to choose
            return None
        return random.Random(self.config.seed * 7_919 + step).choice(list(ratios))

    # ------------------------------------------------------------------ loop
    def train(self) -> list[StepLog]:
        """Run up to ``config.steps`` optimizer steps; return the per-step loss history."""
        cfg, acc = self.config, self.accelerator
        torch.manual_seed(cfg.seed)
        self._maybe_resume()
        if self.step == 0 and cfg.align_steps:
            self._align()
        self.model.train()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (cfg.progress and acc.is_main_process),
            desc="train",
        )
        self.prepared_optimizer.zero_grad(set_to_none=True)  # nothing computed before may leak in
        while self.step < cfg.steps:
            log = self._optimizer_step()
            self.history.append(log)
            bar.update(1)
            bar.set_postfix(loss=f"{log.loss:.4f}", lr=f"{log.lr:.2e}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                mse = f"{log.mse_loss:.4f}" if self.labelled else "n/a: no density labels"
                extra = "".join(
                    f", {name} {value:.4f}"
                    for name, value in (("kd", log.kd_loss), ("hidden", log.hidden_loss))
                    if value is not None
                )
                logger.info(
                    "step %d/%d loss %.4f (lm %.4f, mse %s%s) lr %.2e ratio %s",
                    self.step,
                    cfg.steps,
                    log.loss,
                    log.lm_loss,
                    mse,
                    extra,
                    log.lr,
                    log.ratio,
                )
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                self._check_latent_use()
            if cfg.output_dir and (
                (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps
            ):
                self.save_checkpoint()
        bar.close()
        self.model.eval()
        return self.history

    def _check_latent_use(self) -> None:
        use = latent_use(
            self.model,
            self.eval_examples,
            batch_size=self.config.batch_size,
            loss_fn=self.loss_fn,
        )
        self.latent_use.append((self.step, use))
        logger.info(
            "step %d held-out loss %.4f with own latents, %.4f with others' (gap %.4f)",
            self.step,
            use.own_loss,
            use.other_loss,
            use.gap,
        )

    def _align(self) -> None:
        rng = random.Random(self.config.seed)
        contexts = [c for ex in self.examples for c in ex.contexts]
        chosen = rng.sample(contexts, min(len(contexts), self.config.align_contexts))
        align_converter(
            self.model,  # type: ignore[arg-type]
            chosen,
            steps=self.config.align_steps,
            seed=self.config.seed,
            target=self.config.align_target,
            progress=self.config.progress and self.accelerator.is_main_process,
        )

    def _optimizer_step(self) -> StepLog:
        cfg, acc = self.config, self.accelerator
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        ratio = self.ratio_for(self.step)
        sums = torch.zeros(3)
        terms: dict[str, list[float]] = {"kd": [], "hidden": []}
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            with nullcontext() if last else acc.no_sync(self.loss_module):
                with acc.autocast():
                    loss, lm, mse, kd, hidden = self.loss_module(
                        self.batch(self.step, micro),
                        ratio,
                        cfg.mse_weight,
                        self.step >= cfg.encoder_warmup_steps,
                        cfg.kd_weight,
                        cfg.hidden_weight,
                        cfg.gain_cap,
                    )
                acc.backward(loss / cfg.grad_accum)
            sums += torch.tensor([float(loss.detach()), float(lm), float(mse)]) / cfg.grad_accum
            for name, value in (("kd", float(kd)), ("hidden", float(hidden))):
                if not math.isnan(value):
                    terms[name].append(value)
        for name, param in self.params:  # AdamW leaves tensors without a gradient untouched
            if self._held(name):
                param.grad = None
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_([p for _, p in self.params], cfg.max_grad_norm)
        self.prepared_optimizer.step()
        self.prepared_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepLog(
            step=self.step,
            loss=float(sums[0]),
            lm_loss=float(sums[1]),
            mse_loss=float(sums[2]),
            kd_loss=statistics.fmean(terms["kd"]) if terms["kd"] else None,
            hidden_loss=statistics.fmean(terms["hidden"]) if terms["hidden"] else None,
            lr=lr,
            ratio=ratio,
        )

    def _held(self, name: str) -> bool:
        """Whether tensor ``name`` is held fixed at the current step (the warmup options)."""
        cfg = self.config
        if "lora_" in name:
            adapter_held = {
                "decoder": self.step < cfg.decoder_warmup_steps,
                "encoder": self.step < cfg.encoder_warmup_steps,
            }
            return any(held and f".{a}." in name for a, held in adapter_held.items())
        encoder_side = ("converter.", "memory")
        return self.step < cfg.encoder_warmup_steps and name.startswith(encoder_side)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        """Write ``checkpoint-<step>`` (the loadable model, what a user ships) and its trainer state
        in `state_dir` (``output_dir/trainer-state/checkpoint-<step>``: trainable tensors, AdamW
        moments, RNG, step). The state is renamed into place first and a checkpoint counts only
        with both (`list_checkpoints`), so a kill at any point leaves the last complete pair."""
        acc = self.accelerator
        acc.wait_for_everyone()
        out = Path(directory or Path(self.config.output_dir or ".") / f"checkpoint-{self.step}")
        if acc.is_main_process:
            state = state_dir(out)
            tmp_state = state.with_name(state.name + ".tmp")
            shutil.rmtree(tmp_state, ignore_errors=True)
            self._save_state(tmp_state)
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _portable_adapters(self.model)
            self.model.save_pretrained(tmp)  # type: ignore[operator]
            # PEFT writes a boilerplate model card naming the base; ours is the config JSON
            (tmp / "README.md").unlink(missing_ok=True)
            if self.config.train_base:
                save_trained_bases(self.model, tmp)
            shutil.rmtree(state, ignore_errors=True)
            os.replace(tmp_state, state)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            logger.info("saved %s (trainer state in %s)", out, state)
            self._prune()
        acc.wait_for_everyone()
        return out

    def _save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {name: p.detach().cpu().contiguous() for name, p in self.params},
            directory / "trainable.safetensors",
        )
        optim = self.optimizer.state_dict()
        tensors = {
            f"state.{idx}.{key}": value.detach().cpu().contiguous()
            for idx, entry in optim["state"].items()
            for key, value in entry.items()
        }
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = state
        save_file(tensors, directory / "optimizer.safetensors")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]]
        state = {
            "step": self.step,
            "param_names": [name for name, _ in self.params],
            "param_groups": groups,
            "train_config": self.config.model_dump(mode="json"),
            "draw": self.draw(),
            "history": [h.model_dump() for h in self.history],
        }
        (directory / "state.json").write_text(json.dumps(state, indent=1))

    def _prune(self) -> None:
        keep = self.config.keep_last
        if not keep or not self.config.output_dir:
            return
        for old in list_checkpoints(self.config.output_dir)[:-keep]:
            shutil.rmtree(state_dir(old), ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    def _maybe_resume(self) -> None:
        source = self.config.resume_from
        if source is None:
            return
        if source == "auto":
            found = list_checkpoints(self.config.output_dir or ".")
            if not found:
                logger.info("no checkpoint in %s; starting from step 0", self.config.output_dir)
                return
            source = str(found[-1])
        self.load_state(source)

    def load_state(self, checkpoint: str | Path) -> None:
        """Restore trainable tensors, AdamW moments, RNG, step and history from a checkpoint.

        Raises:
            FileNotFoundError: the checkpoint has no trainer state (e.g. a shipped copy).
            ValueError: the checkpoint is from an interrupted run that drew its batches otherwise
                (`draw`), or holds other trainable tensors or optimizer groups.
        """
        directory = state_dir(checkpoint)
        if not (directory / "state.json").is_file():
            raise FileNotFoundError(
                f"no trainer state for {checkpoint} (looked in {directory}); resume from a "
                "checkpoint of an output_dir, or start from its weights with --init"
            )
        state = json.loads((directory / "state.json").read_text())
        self._check_same_draw(checkpoint, state)
        names = [name for name, _ in self.params]
        if state["param_names"] != names:
            raise ValueError(
                f"{checkpoint} was written for other trainable tensors "
                f"({len(state['param_names'])} vs {len(names)}); same model and train_base?"
            )
        trainable = load_file(directory / "trainable.safetensors")
        with torch.no_grad():
            for name, param in self.params:
                param.copy_(trainable[name])
        tensors = load_file(directory / "optimizer.safetensors")
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, idx, field = key.split(".", 2)
                optim_state.setdefault(int(idx), {})[field] = value
        fresh = self.optimizer.state_dict()["param_groups"]
        if len(state["param_groups"]) != len(fresh):
            raise ValueError(
                f"{checkpoint} has {len(state['param_groups'])} optimizer groups, this trainer "
                f"{len(fresh)}; it was written by another version of the trainer or another "
                "module_lr_scale/weight-decay layout"
            )
        groups = [
            {**saved, "betas": tuple(saved["betas"]), "params": g["params"]}
            for saved, g in zip(state["param_groups"], fresh, strict=True)
        ]
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        self.step = int(state["step"])
        self.history = [StepLog.model_validate(h) for h in state["history"]]
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    def draw(self) -> dict:
        """What decides the examples and ratio of each step (`batch`, `ratio_for` are pure
        functions of the step and these): the seed, the examples per step (``batch_size ×
        grad_accum × processes``: any split of the same number draws the same examples), the ratio
        sampling and its candidates, and the number of examples. Data of the same size but other
        content or order is not told apart."""
        cfg = self.config
        ratios = cfg.train_ratios or getattr(self.model.config, "ratios", None)
        if cfg.ratio_sampling == "mode":  # each sample's own ratio: the candidates draw nothing
            ratios = None
        return {
            "seed": cfg.seed,
            "examples_per_step": cfg.batch_size * cfg.grad_accum * self.accelerator.num_processes,
            "ratio_sampling": cfg.ratio_sampling,
            "ratios": [float(r) for r in ratios] if ratios else None,
            "examples": len(self.examples),
        }

    def _check_same_draw(self, checkpoint: str | Path, state: dict) -> None:
        """Refuse to finish an interrupted run with other draws than it started with.

        Only a run stopped before its own ``steps`` is checked, and only when this one trains
        past its step: continuing a finished run (a next phase in the same ``output_dir``, with
        other ratios or data) is deliberate, and a run with no steps left draws nothing."""
        saved, step = state.get("draw"), int(state["step"])
        planned = state.get("train_config", {}).get("steps", step)
        if saved is None or step >= planned or step >= self.config.steps:
            return
        now = self.draw()
        changed = [k for k in now if saved.get(k) != now[k]]
        if changed:
            diff = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(
                f"{checkpoint} is step {step} of a {planned}-step run that drew its batches "
                f"differently ({diff}); finishing it so would repeat some examples and skip "
                "others. Resume with the same settings and data, or start in a fresh output_dir"
            )


def state_dir(checkpoint: str | Path) -> Path:
    """Where the trainer state of ``checkpoint`` lives: ``../trainer-state/<name>``, or inside
    the checkpoint (``trainer/``) for checkpoints in the older layout."""
    checkpoint = Path(checkpoint)
    legacy = checkpoint / STATE_DIR
    if (legacy / "state.json").is_file():
        return legacy
    return checkpoint.parent / STATE_ROOT / checkpoint.name


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` directories under ``output_dir`` (model and trainer state),
    oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT.match(p.name))
        and p.is_dir()
        and (state_dir(p) / "state.json").exists()
    ]
    return [p for _, p in sorted(found)]


def _portable_adapters(model: nn.Module) -> None:
    """Adapter configs name their base portably (a checkpoint loaded from an older save may
    still carry a path of the machine it was trained on)."""
    for module in model.modules():
        if isinstance(module, PeftModel):
            for peft_config in module.peft_config.values():
                name = peft_config.base_model_name_or_path
                if name:
                    peft_config.base_model_name_or_path = portable_name(name)


# --- trained base weights ------------------------------------------------------------------------


def _save_base(peft_model: PeftModel, tokenizer, directory: Path) -> None:
    """The base model under the LoRA wrappers, as a plain ``from_pretrained`` directory."""
    base = peft_model.get_base_model()
    state = {
        key.replace(".base_layer.", "."): value.detach().cpu().clone().contiguous()
        for key, value in base.state_dict().items()
        if "lora_" not in key
    }
    directory.mkdir(parents=True, exist_ok=True)
    base.config.save_pretrained(directory)
    if base.generation_config is not None:
        base.generation_config.save_pretrained(directory)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def save_trained_bases(model: nn.Module, directory: Path) -> None:
    """Store bases trained with ``train_base`` inside the checkpoint and point its config there
    (``./base``, resolved against the checkpoint directory when loading)."""
    if not isinstance(model, SemiDynamicCompressor):
        raise TypeError("train_base checkpoints are supported for SemiDynamicCompressor only")
    _save_base(model.encoder, model.tokenizer, directory / "base")
    update: dict[str, object] = {"encoder_model": "./base", "encoder_gguf_file": None}
    if model.decoder is model.encoder:
        update.update(decoder_model=None, decoder_gguf_file=None)
    else:
        _save_base(model.decoder, model.decoder_tokenizer, directory / "decoder_base")
        update.update(decoder_model="./decoder_base", decoder_gguf_file=None)
    path = directory / CONFIG_NAME
    raw = json.loads(path.read_text())
    raw.update(update)
    path.write_text(json.dumps(raw, indent=2))
