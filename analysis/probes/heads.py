"""Grids of probe heads: G independent heads (one per learning rate) evaluated in one forward.

Every head is initialised on the CPU from a seeded generator (then moved by
:func:`analysis.probes.fit.fit_grid`), so a probe starts from the same weights on every device.
Heads share no parameters; the only shared module is a ``BatchNorm(affine=False)``, which has
nothing to learn and whose statistics depend on the inputs only, which all heads share.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProbeError

CPU = torch.device("cpu")


def _bn(dim: int) -> nn.BatchNorm1d:
    # momentum=None: running stats are the exact average over all training batches, not an
    # EMA, so they are right even after a handful of steps (tiny datasets, short schedules).
    return nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None, device=CPU)


def _params(n: int, make) -> nn.ParameterList:  # noqa: ANN001 - a zero-argument tensor factory
    return nn.ParameterList([nn.Parameter(make()) for _ in range(n)])


class LinearGrid(nn.Module):
    """G linear heads after one shared ``BatchNorm1d(affine=False)`` (MAE's linear probe).

    x float32 [B, D] → logits float32 [G, B, C].
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, generator: torch.Generator) -> None:
        super().__init__()
        self.bn = _bn(dim)
        # MAE's linear-probe init: weight N(0, 0.01), bias 0.
        self.weight = _params(num_heads, lambda: torch.randn(num_classes, dim, generator=generator, device=CPU) * 0.01)
        self.bias = _params(num_heads, lambda: torch.zeros(num_classes, device=CPU))

    def head_params(self, g: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weight-decayed, not decayed) parameters of head ``g``."""
        return [self.weight[g]], [self.bias[g]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        w = torch.stack(list(self.weight))  # [G, C, D]
        b = torch.stack(list(self.bias))  # [G, C]
        return torch.einsum("bd,gcd->gbc", x, w) + b[:, None, :]


class DenseGrid(LinearGrid):
    """Per-patch linear heads: tokens [B, L, D] → logits [G, B, L, C] (BatchNorm over all
    patches of the batch, then each head's Linear on every patch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return super().forward(x.reshape(B * L, D)).view(len(self.weight), B, L, -1)


class AttentiveGrid(nn.Module):
    """G attentive probes over patch tokens: x float32 [B, L, D] → logits float32 [G, B, C].

    AIM-style learned-query cross-attention (El-Nouby et al. 2024, ``AttentionPoolingClassifier``):
    tokens normalised by a shared ``BatchNorm(affine=False)`` over D (needed for un-normed
    intermediate layers), ``Q`` learned queries [Q, D] attend with ``H`` heads over keys
    ``x W_k`` and values ``x W_v + b_v``; the Q outputs are averaged, then LayerNorm and Linear.
    It differs from AIM's head in two places: AIM's value projection has no bias (here ``b_v``),
    and AIM feeds the averaged output straight to the Linear (here a LayerNorm with affine
    parameters comes first). The key bias both omit would add one constant to every logit of a
    head, which softmax ignores.

    Computed without materialising keys and values: for query ``q_h`` of attention head ``h``,
    ``q_h · (W_k x)_h = (W_{k,h}ᵀ q_h) · x`` and ``Σ_l a_l W_{v,h} x_l = W_{v,h} (Σ_l a_l x_l)``.
    That is the same function of the same parameters (hence identical gradients) at ~D/H times
    fewer FLOPs than projecting all L tokens — which is what makes a grid of attentive probes
    affordable on a CPU.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, generator: torch.Generator,
                 attn_heads: int = 1, num_queries: int = 1) -> None:
        super().__init__()
        if dim % attn_heads:
            raise ProbeError(f"attention heads ({attn_heads}) must divide the feature width ({dim})")
        self.h, self.q_n, self.dim = attn_heads, num_queries, dim
        self.bn = _bn(dim)
        bound = math.sqrt(6.0 / (2 * dim))  # xavier-uniform for the D×D projections

        def uniform() -> torch.Tensor:
            return (torch.rand(dim, dim, generator=generator, device=CPU) * 2 - 1) * bound

        n = num_heads
        self.query = _params(n, lambda: torch.randn(num_queries, dim, generator=generator, device=CPU) * 0.02)
        self.wk = _params(n, uniform)
        self.wv = _params(n, uniform)
        self.bv = _params(n, lambda: torch.zeros(dim, device=CPU))
        self.ln_w = _params(n, lambda: torch.ones(dim, device=CPU))
        self.ln_b = _params(n, lambda: torch.zeros(dim, device=CPU))
        self.fc_w = _params(n, lambda: torch.randn(num_classes, dim, generator=generator, device=CPU) * 0.01)
        self.fc_b = _params(n, lambda: torch.zeros(num_classes, device=CPU))

    def head_params(self, g: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return ([self.wk[g], self.wv[g], self.fc_w[g]],
                [self.query[g], self.bv[g], self.ln_w[g], self.ln_b[g], self.fc_b[g]])

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights [G, B, Q, H, L] of the (batch-normalised) tokens x [B, L, D]."""
        G, H, D = len(self.query), self.h, self.dim
        dh = D // H
        q = torch.stack(list(self.query)).view(G, self.q_n, H, dh)
        wk = torch.stack(list(self.wk)).view(G, H, dh, D)
        u = torch.einsum("gqhe,ghed->gqhd", q, wk)  # W_{k,h}ᵀ q_h: [G, Q, H, D]
        return (torch.einsum("bld,gqhd->gbqhl", x, u) * dh**-0.5).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        G, H = len(self.query), self.h
        x = self.bn(x.reshape(B * L, D)).view(B, L, D)
        a = self.attention(x)
        pooled = torch.einsum("gbqhl,bld->gbqhd", a, x)  # attention-weighted tokens per head
        wv = torch.stack(list(self.wv)).view(G, H, D // H, D)
        v = torch.einsum("gbqhd,ghed->gbqhe", pooled, wv).reshape(G, B, self.q_n, D)
        v = v + torch.stack(list(self.bv))[:, None, None, :]
        v = F.layer_norm(v.mean(2), (D,), eps=1e-6)  # the queries' outputs averaged, as AIM does
        v = v * torch.stack(list(self.ln_w))[:, None] + torch.stack(list(self.ln_b))[:, None]
        return torch.einsum("gbd,gcd->gbc", v, torch.stack(list(self.fc_w))) + torch.stack(list(self.fc_b))[:, None]
