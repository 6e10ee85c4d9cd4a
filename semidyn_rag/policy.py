"""`CompressionPolicy`: how hard chunks are compressed, as one validated value.

Two numbers decide a chunk's latents besides its text and the weights: ``scale``, the shift the
user adds to the ratio head's predicted ``log2`` ratio before the selector picks a trained ratio
(higher compresses more, negative keeps more), and ``ratio``, a fixed trained ratio that replaces
the selector's choice (``scale`` is then ignored). Every layer that takes them (the service's
default, a framework component's field, one call's argument) resolves them the same way: a value
given at a narrower level replaces the wider one, ``None`` keeps it (:meth:`CompressionPolicy.override`).
The policy's :attr:`~CompressionPolicy.key` is the text stored with, and hashed into, every store
entry (`semidyn_rag.store.policy_key`), so equal policies share latents.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .store import policy_key

__all__ = ["CompressionPolicy"]


class CompressionPolicy(BaseModel):
    """A ratio policy: the selector's ``scale``, or a fixed trained ``ratio`` that overrides it.

    Immutable; invalid values are a ``ValueError`` (pydantic's ``ValidationError``) naming the
    field: ``scale`` must be finite, ``ratio`` finite and at least 1 (a ratio below 1 would
    lengthen the text). Whether ``ratio`` is one the compressor was trained on is checked by the
    compressor (`semidyn_rag.selector.check_ratio`), which knows its candidates.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float = Field(
        0.0, description="shift of the predicted log2 ratio: higher compresses more"
    )
    ratio: float | None = Field(None, description="a fixed trained ratio instead of the selector")

    @field_validator("scale")
    @classmethod
    def _finite_scale(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"scale must be a finite number, got {value}")
        return value

    @field_validator("ratio")
    @classmethod
    def _usable_ratio(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= 1):
            raise ValueError(
                f"ratio must be a finite number >= 1 (or None: the selector), got {value}"
            )
        return value

    def override(self, scale: float | None = None, ratio: float | None = None) -> CompressionPolicy:
        """This policy with ``scale`` and/or ``ratio`` replaced; ``None`` keeps this one's value.

        A fixed ``ratio`` of this policy stays in force under a new ``scale`` (the ratio overrides
        the selector wherever it was set). Returns ``self`` when nothing changes.
        """
        update = {
            name: value
            for name, value in (("scale", scale), ("ratio", ratio))
            if value is not None and value != getattr(self, name)
        }
        if not update:
            return self
        return CompressionPolicy.model_validate({**self.model_dump(), **update})

    @property
    def fixed(self) -> bool:
        """Whether a fixed ``ratio`` replaces the selector (and ``scale`` plays no part)."""
        return self.ratio is not None

    @property
    def selector_scale(self) -> float | None:
        """The ``scale`` the selector uses, or ``None`` under a fixed ratio (it uses none)."""
        return None if self.fixed else self.scale

    @property
    def key(self) -> str:
        """The store's text for this policy (``"scale=0.0"``, ``"ratio=4.0"``), canonical:
        ``4`` and ``4.0``, ``0.0`` and ``-0.0`` give the same key, and so do two policies with the
        same fixed ratio and different scales."""
        return policy_key(self.selector_scale, self.ratio)
