"""Conventions shared by every attention metric, and the helpers that implement them.

- ``attn`` is one layer ``[B, heads, N, N]`` (rows = queries, columns = keys, rows sum to 1)
  or a sequence of layers (a list, or a ``[layers, B, heads, N, N]`` tensor). ``N = P + L``:
  the first ``P = num_prefix`` tokens are the prefix (the cls token at index 0, then registers
  or a distillation token, if any — :func:`analysis.encoder.num_prefix_tokens`), then the
  ``L = gh·gw`` patches in row-major order (patch ``i`` is token ``P + i``, at grid cell
  ``(i // gw, i % gw)``).
- **Patch queries, patch keys.** Metrics read the ``[L, L]`` patch-to-patch block and
  renormalise every row over the patch keys, ``ã_ij = a_ij / Σ_{j'∈patches} a_ij'``.
  Why: prefix keys are not places in the image (no position, no instance), so distances,
  instance masses and entropies are only defined over patch keys; renormalising keeps each row
  a distribution, so "mass on the same instance" is a fraction of the attention the query
  spends *on the image*, and models that park different amounts of attention on cls or
  registers (a known ViT habit) stay comparable. Prefix queries are excluded for the same
  reason (the cls query is measured separately by :func:`analysis.metrics.cls_jaccard`).
- **Per-image values.** Every metric returns one value per image along dim 0, so reports can
  average, or bootstrap confidence intervals, over images. A sequence of layers adds a layer
  dimension at position 1: ``[B, heads]`` for one layer, ``[B, layers, heads]`` for many.
- **NaN marks undefined values** (an image with no query patch inside an instance, no
  foreground patch, no ground-truth box); aggregate with ``torch.nanmean`` or the query
  weights provided.
- Arithmetic is float64 (attention entropies and CKA's centred sums lose digits in float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

Tensor = torch.Tensor
AttentionInput = Tensor | Sequence[Tensor]
HeadMode = Literal["mean", "each"]


def pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    a, b = x
    return int(a), int(b)


def map_layers(fn: Callable[[Tensor], Tensor], attn: AttentionInput) -> Tensor:
    """Apply a one-layer metric to one layer or to each of a sequence (stacked at dim 1).

    Layers are processed one at a time so only one layer is ever held in float64.
    """
    if isinstance(attn, Tensor):
        if attn.ndim == 4:
            return fn(attn)
        if attn.ndim == 5:
            return torch.stack([fn(a) for a in attn.unbind(0)], dim=1)
        raise ValueError(f"attention must be [B, heads, N, N] or [layers, B, heads, N, N], got {list(attn.shape)}")
    if len(attn) == 0:
        raise ValueError("attention is an empty sequence of layers")
    return torch.stack([fn(a) for a in attn], dim=1)


def check_layer(attn: Tensor, num_prefix: int, num_patches: int | None = None) -> int:
    """Validate one layer ``[B, h, N, N]`` and return ``L = N − P``."""
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be [B, heads, N, N], got {list(attn.shape)}")
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be ≥ 0, got {num_prefix}")
    L = attn.shape[-1] - num_prefix
    if L < 1:
        raise ValueError(f"attention has N = {attn.shape[-1]} tokens, not more than num_prefix = {num_prefix}")
    if num_patches is not None and L != num_patches:
        raise ValueError(
            f"attention has N = {attn.shape[-1]} tokens = {num_prefix} prefix + {L} patches, but the grid "
            f"has {num_patches} patches; check grid_hw / patch_size / num_prefix"
        )
    return L


def patch_rows(attn: Tensor, num_prefix: int) -> Tensor:
    """Patch-query × patch-key block, rows renormalised over patch keys, float64.

    ``[B, h, N, N] → [B, h, L, L]``. A row with zero mass on patch keys (possible only for a
    degenerate map) stays all-zero rather than becoming NaN.
    """
    a = attn[..., num_prefix:, num_prefix:].double()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """``−Σ p log p`` in nats, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(p, p).sum(dim=dim)


def masked_query_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over the query axis (last) of ``values [B, h, L]`` where ``valid [B, L]``.

    → ``[B, h]``; NaN for images without a valid query. Invalid entries are replaced (not
    multiplied) by zero so NaNs there cannot leak into the mean.
    """
    v = valid[:, None, :]
    total = torch.where(v, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    count = v.sum(-1).to(values.dtype)
    return total / count  # 0/0 = NaN where an image has no valid query, by design
