"""The MLP converter: pooled encoder features → decoder input-embedding space."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias), as in Llama/Qwen blocks."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Converter(nn.Module):
    """RMSNorm → up-projection → GELU → down-projection (optionally gated: ``GELU(gate) * up``).

    ``gate_input`` says what the gate reads: the normed features (``"normed"``) or the raw input
    (``"raw"``, as the paper's gated converter does); the up-projection always reads the normed ones.

    The norm matters because pooled encoder states have a different scale from the decoder's token
    embeddings; parameter names (``rms_norm``, ``up_proj``, ``gate_proj``, ``down_proj``) follow the
    paper's released ``projector.pth`` so its weights load without renaming.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 4096,
        gated: bool = False,
        gate_input: str = "normed",
    ) -> None:
        super().__init__()
        if gate_input not in ("normed", "raw"):
            raise ValueError(f"gate_input must be 'normed' or 'raw', got {gate_input!r}")
        self.gate_input = gate_input
        self.rms_norm = RMSNorm(in_dim)
        self.up_proj = nn.Linear(in_dim, hidden_dim, bias=False)
        self.gate_proj = nn.Linear(in_dim, hidden_dim, bias=False) if gated else None
        self.down_proj = nn.Linear(hidden_dim, out_dim, bias=False)
        self.act = nn.GELU()

    @torch.no_grad()
    def match_output_scale(self, target_rms: float, seed: int = 0) -> None:
        """Rescale ``down_proj`` so that a fresh converter's outputs have RMS ``target_rms``.

        A randomly initialised MLP emits vectors about ten times larger than a pretrained decoder's
        token embeddings; such inputs swamp the residual stream, and the decoder must first learn
        to ignore their size before it can read them. Matching the scale of the embeddings the
        decoder was trained on removes that detour. Inputs pass the RMSNorm first, so unit-normal
        probes measure the output scale for any encoder.
        """
        generator = torch.Generator(device="cpu").manual_seed(seed)
        weight = self.down_proj.weight
        probe = torch.randn(256, self.rms_norm.weight.shape[0], generator=generator)
        out = self(probe.to(device=weight.device, dtype=weight.dtype)).float()
        weight.mul_(target_rms / out.pow(2).mean().sqrt().clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw, x = x, self.rms_norm(x)
        if self.gate_proj is None:
            h = self.act(self.up_proj(x))
        else:
            gate_in = raw if self.gate_input == "raw" else x
            h = self.act(self.gate_proj(gate_in)) * self.up_proj(x)
        return self.down_proj(h)
