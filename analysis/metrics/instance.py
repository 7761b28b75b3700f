"""Instance-awareness: how much of a patch query's attention stays on its own instance (new).

R-MAE (Nguyen et al. 2023, Fig. 6) shows qualitatively that a query patch's attention
concentrates on the query's instance; :func:`instance_awareness` measures it against
ground-truth instance maps (patch ownership from :mod:`analysis.groundtruth`). Attention inputs
follow :mod:`analysis.metrics._layers`.

Mass, leak and Jaccard are descriptive: they reward locality as much as instance-awareness (a
content-free 3×3 window scores a mass of 0.6 on an 8×8 grid with 3×3 instances). The metric with
a direction is :func:`instance_selectivity`, which subtracts what the same attention rows score on
other images' instance layouts at the same place — ≈ 0 for any content-free encoder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import torch

from analysis.groundtruth import patch_ownership

from ._layers import AttentionInput, Chunk, HeadMode, LayerMetric, Tensor, layer_values, masked_query_mean
from .dino import keep_mass_threshold

__all__ = ["InstanceAwareness", "InstanceLayer", "SelectivityLayer", "instance_awareness", "instance_selectivity"]


@dataclass
class InstanceAwareness:
    """Per-image instance-awareness of a batch (see :func:`instance_awareness`).

    Each value tensor is float64 ``[B]`` + ``[layers]`` (sequence input) + ``[heads]``
    (``heads="each"``): the mean over the image's valid query patches, NaN for an image with none.
    ``mass + leak + background = 1`` per query (hence per image).

    Attributes:
        mass: attention mass on patches of the query's own instance.
        leak: mass on patches of other instances.
        background: mass on background patches.
        jaccard: Jaccard of the query's keep-``mass``-thresholded map with its instance's patches.
        num_queries: int64 ``[B]`` valid query patches per image (weights for pooling).
    """

    mass: Tensor
    leak: Tensor
    background: Tensor
    jaccard: Tensor
    num_queries: Tensor

    _NAMES = {"mass": "instance_mass", "leak": "instance_leak", "background": "background_mass",
              "jaccard": "instance_jaccard"}

    def as_dict(self) -> dict[str, Tensor]:
        """Per-image values under the report's names: ``instance_mass``, ``instance_leak``,
        ``background_mass``, ``instance_jaccard``."""
        return {self._NAMES[k]: getattr(self, k) for k in self._NAMES}

    def pooled(self) -> dict[str, Tensor]:
        """Query-weighted means over images (= mean over all valid queries of the batch), under the
        report's names; shape ``[layers][heads]``. NaN if no image has a valid query."""
        w = self.num_queries.double()
        out = {}
        for key, name in self._NAMES.items():
            v = getattr(self, key)
            wv = w.reshape(-1, *([1] * (v.ndim - 1)))
            out[name] = torch.where(wv > 0, v, torch.zeros_like(v)).mul(wv).sum(0) / w.sum()
        return out

    @classmethod
    def cat(cls, parts: Iterable[InstanceAwareness]) -> InstanceAwareness:
        """Concatenate the per-image values of several batches (streaming over a dataset)."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def instance_awareness(attn: AttentionInput, instances: Tensor, patch_size: int | Sequence[int], *,
                       mass: float = 0.6, min_purity: float = 0.5, heads: HeadMode = "mean",
                       num_prefix: int = 1) -> InstanceAwareness:
    """How much a patch query's attention stays on its own ground-truth instance (new metric).

    R-MAE (Nguyen et al. 2023, Fig. 6) shows qualitatively that a query patch's attention
    concentrates on the query's instance; this measures it. Patch ownership by majority vote
    (:func:`analysis.groundtruth.patch_ownership`): ``own(j)`` is patch ``j``'s id (0 = background).

    Queries: patches ``q`` with ``own(q) > 0`` and purity ``≥ min_purity`` (the instance covers at
    least that fraction of the query patch's pixels; 0.5 by default, so the query lies mostly
    inside the instance). Keys: all patches, by owner. With ``ã_qj`` renormalised over patch
    keys (:mod:`analysis.metrics._layers`)::

        mass(q)       = Σ_{j: own(j) = own(q)}        ã_qj
        leak(q)       = Σ_{j: own(j) ∉ {0, own(q)}}   ã_qj
        background(q) = Σ_{j: own(j) = 0}             ã_qj      (the three sum to 1)
        jaccard(q)    = |T_q ∩ M_q| / |T_q ∪ M_q|,
            T_q = keep_mass_threshold(ã_q·, mass)  (DINO-style, default 60 %),
            M_q = {j : own(j) = own(q)}

    each averaged over the image's queries. Reference points: uniform attention gives
    ``mass = |M_q| / L`` (the instance's patch share); a map on exactly the instance gives
    mass 1, leak 0, Jaccard 1.

    Heads: ``"mean"`` averages the (renormalised) heads first — identical to the mean of per-head
    masses, but the Jaccard then thresholds the head-mean map (as DINO's mean-attention figures);
    ``"each"`` keeps a head dimension.

    Args:
        attn: ``[B, h, N, N]`` or a sequence of layers.
        instances: int ``[B, H, W]`` pixel instance map, ``H = gh·p_h``, ``W = gw·p_w``.
        patch_size: the model's patch size (``p`` or ``(p_h, p_w)``).
    Returns:
        :class:`InstanceAwareness` with per-image ``[B]`` (+ ``[layers]``) (+ ``[h]``) values and
        ``num_queries [B]``.
    """
    metric = InstanceLayer(instances, patch_size, mass=mass, min_purity=min_purity, heads=heads)
    res = layer_values(metric, attn, num_prefix, metric.L).movedim(-1, 0)
    return InstanceAwareness(mass=res[0], leak=res[1], background=res[2], jaccard=res[3],
                             num_queries=metric.valid.sum(-1))


def _check_batch(attn: Tensor, B: int) -> None:
    if attn.shape[0] != B:
        raise ValueError(f"attention batch {attn.shape[0]} ≠ instance-map batch {B}")


class InstanceLayer(LayerMetric):
    """:func:`instance_awareness` of one layer at a time → ``[B, (h,) 4]`` (mass, leak, background,
    Jaccard — the last axis); the ground truth is prepared once, at construction."""

    def __init__(self, instances: Tensor, patch_size: int | Sequence[int], *, mass: float = 0.6,
                 min_purity: float = 0.5, heads: HeadMode = "mean") -> None:
        if heads not in ("mean", "each"):
            raise ValueError(f"heads must be 'mean' or 'each', got {heads!r}")
        owner, purity = patch_ownership(instances, patch_size)
        self.B = owner.shape[0]
        owner, purity = owner.reshape(self.B, -1), purity.reshape(self.B, -1)
        self.L = owner.shape[1]
        self.valid = (owner > 0) & (purity >= min_purity)  # [B, L] query patches
        self.same = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] > 0)  # [B, Lq, Lk]
        self.other = ~self.same & (owner[:, None, :] > 0)
        self.background = owner == 0  # [B, Lk]
        self.mass, self.heads = mass, heads
        self._weights: dict[torch.dtype, tuple[Tensor, Tensor, Tensor]] = {}

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The same / other / background masks as numbers of ``dtype`` (made once per dtype)."""
        if dtype not in self._weights:
            self._weights[dtype] = (self.same.to(dtype), self.other.to(dtype), self.background.to(dtype))
        return self._weights[dtype]

    def begin(self, attn: Tensor) -> None:
        _check_batch(attn, self.B)
        self.parts: list[Tensor] = []

    def update(self, chunk: Chunk) -> None:
        q = chunk.queries
        p = chunk.head_mean[:, None] if self.heads == "mean" else chunk.rows  # [B, h', q, L]
        same_w, other_w, background_w = self.weights(p.dtype)
        m_same = torch.einsum("bhqk,bqk->bhq", p, same_w[:, q]).double()
        m_other = torch.einsum("bhqk,bqk->bhq", p, other_w[:, q]).double()
        m_bg = torch.einsum("bhqk,bk->bhq", p, background_w).double()
        # Jaccard of the valid queries only (the others are never averaged): their rows are the
        # only ones thresholded, and thresholding (a sort per row) is the costly part
        b, i = self.valid[:, q].nonzero(as_tuple=True)
        kept = keep_mass_threshold(p[b, :, i], self.mass)  # [n, h', L]
        same = self.same[:, q][b, i][:, None]  # [n, 1, L]
        jac = torch.zeros_like(m_same)
        jac[b, :, i] = (kept & same).sum(-1).double() / (kept | same).sum(-1).double().clamp_min(1.0)
        # [B, h', 4, q]: per-query values, averaged over the valid queries once all chunks are in
        self.parts.append(torch.stack([m_same, m_other, m_bg, jac], 2))

    def result(self) -> Tensor:
        per_query = torch.cat(self.parts, dim=-1)
        out = masked_query_mean(per_query.flatten(1, 2), self.valid).unflatten(1, per_query.shape[1:3])  # [B, h', 4]
        return out[:, 0] if self.heads == "mean" else out


def instance_selectivity(attn: AttentionInput, instances: Tensor, patch_size: int | Sequence[int], *,
                         min_purity: float = 0.5, num_prefix: int = 1) -> Tensor:
    """Own-instance attention mass beyond what the same attention scores on *other* images'
    instance layouts at the same query position (new; the locality-corrected instance metric).

    ``instance_mass`` rewards locality: instances are contiguous, so any attention concentrated
    around the query — a content-free 3×3 window, a Gaussian — lands mostly on the query's own
    instance. The null here keeps each attention row exactly as it is (its spatial profile around
    the query) and breaks only its relation to the instance, by scoring it against the layouts of
    the other images of the batch in which the same position is also inside an instance. With
    ``ã_q`` the head-mean attention row of patch query ``q`` over patch keys (renormalised as in
    every metric here), ``own_b(j)`` the owner of patch ``j`` in image ``b`` and ``V_b`` the valid
    queries of image ``b`` (inside an instance with purity ≥ ``min_purity``)::

        observed(b, q) = Σ_j ã_qj [own_b(j) = own_b(q)]
        null(b, q)     = mean over c ≠ b with q ∈ V_c of  Σ_j ã_qj [own_c(j) = own_c(q)]
        selectivity(b) = mean over q ∈ V_b that have such a c of  observed(b, q) − null(b, q)

    Reference points: ≈ 0 for any content-free encoder (its rows do not depend on the image, so the
    observed layout is just one more draw of the null's) however local it is; ≈ 0 for uniform
    attention; positive when attention follows the query's own instance (the oracle that attends
    exactly its instance scores 1 − the mean overlap of its instance with other images' instances
    at the same place). Negative values mean attention avoids the own instance. Needs a batch of
    at least two images with instances; NaN for an image with no usable query.

    Args:
        attn: ``[B, h, N, N]`` or a sequence of layers.
        instances: int ``[B, H, W]`` pixel instance maps (0 = background).
    Returns:
        float64 ``[B]`` (one layer) or ``[B, layers]``.
    """
    metric = SelectivityLayer(instances, patch_size, min_purity=min_purity)
    return layer_values(metric, attn, num_prefix, metric.L)


class SelectivityLayer(LayerMetric):
    """:func:`instance_selectivity` of one layer at a time → ``[B]``; the ground truth (and the
    null's layouts) are prepared once, at construction."""

    def __init__(self, instances: Tensor, patch_size: int | Sequence[int], *, min_purity: float = 0.5) -> None:
        owner, purity = patch_ownership(instances, patch_size)
        self.B = owner.shape[0]
        owner, purity = owner.reshape(self.B, -1), purity.reshape(self.B, -1)
        self.L = owner.shape[1]
        valid = (owner > 0) & (purity >= min_purity)  # [B, L]
        self.same = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] > 0)  # [B, Lq, Lk]
        eye = torch.eye(self.B, dtype=torch.bool, device=owner.device)
        self.others = valid[None, :, :] & ~eye[:, :, None]  # [B, C, L] layouts that score each query's null
        self.n_null = self.others.sum(1)  # [B, L]
        self.usable = valid & (self.n_null > 0)

    def begin(self, attn: Tensor) -> None:
        _check_batch(attn, self.B)
        self.parts: list[Tensor] = []

    def update(self, chunk: Chunk) -> None:
        q = chunk.queries
        p = chunk.head_mean  # [B, q, Lk], heads averaged
        same = self.same[:, q].to(p.dtype)
        observed = (p * same).sum(-1).double()  # [B, q]
        cross = torch.einsum("bqk,cqk->bcq", p, same).double()  # row of image b scored on layout c
        null = (cross * self.others[:, :, q]).sum(1) / self.n_null[:, q].clamp_min(1)
        self.parts.append(observed - null)

    def result(self) -> Tensor:
        return masked_query_mean(torch.cat(self.parts, dim=-1)[:, None], self.usable)[:, 0]
