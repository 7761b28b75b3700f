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
- **Precision.** Arithmetic is float64 (attention entropies and CKA's centred sums lose digits
  in float32). The streamed analysis pass (:mod:`analysis.metrics.stream`) runs the same code
  with ``dtype=float32`` where rounding cannot matter — renormalised rows, per-row sums of at most
  ``L`` products of weights in [0, 1] — and still accumulates over queries in float64 and decides
  keep-mass membership on float64 prefix sums (:func:`analysis.metrics.keep_mass_threshold`);
  its values differ from the float64 ones by float32 rounding (~1e-7 relative).
- **Query chunks.** Metrics that read every patch row go through :func:`reduce_layer`: the
  queries of a layer are visited in chunks (:func:`query_chunks`) so no temporary exceeds
  :data:`CHUNK_ELEMENTS` elements however large the grid, and several metrics share one pass
  over a chunk (its renormalised rows, their head mean and row entropies are computed once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
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


def renormalise(block: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Rows ``[..., L]`` over patch keys → distributions in ``dtype``. A row with zero mass
    (possible only for a degenerate map) stays all-zero rather than becoming NaN."""
    a = block.to(dtype)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """``−Σ p log p`` in nats, with ``0 log 0 = 0`` for ``p ≥ 0`` (``0 · log tiny = 0``; NaN stays
    NaN). A vectorised ``log`` is several times faster than ``xlogy``."""
    return -p.clamp_min(torch.finfo(p.dtype).tiny).log_().mul_(p).sum(dim=dim)


def masked_query_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over the query axis (last) of ``values [B, h, L]`` where ``valid [B, L]``.

    → ``[B, h]``; NaN for images without a valid query. Invalid entries are replaced (not
    multiplied) by zero so NaNs there cannot leak into the mean.
    """
    v = valid[:, None, :]
    total = torch.where(v, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    count = v.sum(-1).to(values.dtype)
    return total / count  # 0/0 = NaN where an image has no valid query, by design


# ------------------------------------------------------------------------------------------
# one pass over a layer's patch queries, in chunks, shared by several metrics

#: the most elements a chunk of renormalised rows ``[B, h, q, L]`` may hold (16 MiB in float32)
CHUNK_ELEMENTS = 1 << 22


class Chunk:
    """Patch queries ``queries`` of one layer, and what several metrics read from them — each
    computed once, on first use (a chunk nobody reads costs nothing).

    ``rows``: ``[B, h, q, L]`` renormalised rows in ``dtype`` (:func:`renormalise`);
    ``head_mean``: ``[B, q, L]`` their mean over heads; ``entropy``: ``[B, h, q]`` each row's
    entropy in nats (returned as float64).
    """

    def __init__(self, attn: Tensor, num_prefix: int, queries: slice, dtype: torch.dtype = torch.float64) -> None:
        self.attn, self.num_prefix, self.queries, self.dtype = attn, num_prefix, queries, dtype

    @cached_property
    def rows(self) -> Tensor:
        P, q = self.num_prefix, self.queries
        return renormalise(self.attn[..., P + q.start:P + q.stop, P:], self.dtype)

    @cached_property
    def head_mean(self) -> Tensor:
        return self.rows.mean(dim=1)

    @cached_property
    def entropy(self) -> Tensor:
        return entropy(self.rows).double()


def query_chunks(attn: Tensor, num_prefix: int, max_elements: int = CHUNK_ELEMENTS,
                 dtype: torch.dtype = torch.float64) -> Iterator[Chunk]:
    """The patch queries of one layer ``[B, h, N, N]`` in order, as :class:`Chunk` s of at most
    ``max_elements`` row elements (at least one query each)."""
    B, h, N, _ = attn.shape
    L = N - num_prefix
    step = max(1, max_elements // max(1, B * h * L))
    for q0 in range(0, L, step):
        yield Chunk(attn, num_prefix, slice(q0, min(q0 + step, L)), dtype)


class LayerMetric:
    """A metric of one layer, read in one pass over its query chunks: :meth:`begin` sees the whole
    layer ``[B, h, N, N]`` (and resets), :meth:`update` each :class:`Chunk` in query order,
    :meth:`result` gives the per-image values. One instance serves layer after layer."""

    def begin(self, attn: Tensor) -> None:
        pass

    def update(self, chunk: Chunk) -> None:
        pass

    def result(self) -> Tensor:
        raise NotImplementedError


def reduce_layer(attn: Tensor, num_prefix: int, metrics: Sequence[LayerMetric], num_patches: int | None = None, *,
                 dtype: torch.dtype = torch.float64, max_elements: int = CHUNK_ELEMENTS) -> list[Tensor]:
    """Every metric of ``metrics`` on one layer ``[B, h, N, N]``, in one chunked pass over its
    patch queries (rows in ``dtype``) → their results, in order."""
    check_layer(attn, num_prefix, num_patches)
    for m in metrics:
        m.begin(attn)
    for chunk in query_chunks(attn, num_prefix, max_elements, dtype):  # rows are computed only if read
        for m in metrics:
            m.update(chunk)
    return [m.result() for m in metrics]


def layer_values(metric: LayerMetric, attn: AttentionInput, num_prefix: int, num_patches: int | None = None) -> Tensor:
    """One metric over one layer or a sequence of layers (stacked at dim 1, see :func:`map_layers`)."""
    return map_layers(lambda a: reduce_layer(a, num_prefix, [metric], num_patches)[0], attn)
