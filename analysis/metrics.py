"""Metrics of attention, instance-awareness, representation similarity and object discovery.

Pure functions on tensors (plus two small helpers that run a model: :func:`last_layer_keys`
and :func:`layer_cka`). Every formula is written out in its function's docstring with the
paper it comes from.

Conventions shared by every attention metric
--------------------------------------------
- ``attn`` is one layer ``[B, heads, N, N]`` (rows = queries, columns = keys, rows sum to 1)
  or a sequence of layers (a list, or a ``[layers, B, heads, N, N]`` tensor). ``N = P + L``:
  the first ``P = num_prefix`` tokens are the cls token (and registers, if any), then the
  ``L = gh·gw`` patches in row-major order (patch ``i`` ↔ grid cell ``(i // gw, i % gw)``).
- **Patch queries, patch keys.** Metrics read the ``[L, L]`` patch-to-patch block and
  renormalise every row over the patch keys,
  ``ã_ij = a_ij / Σ_{j'∈patches} a_ij'``.
  Why: the cls key is not a place in the image (it has no position, belongs to no instance), so
  distances, instance masses and entropies are only defined over patch keys; renormalising
  keeps each row a distribution, so "mass on the same instance" is a fraction of the attention
  the query spends *on the image*, and models that park different amounts of attention on cls
  (a known MAE/ViT habit) stay comparable. The cls query is excluded for the same reason (it is
  measured separately by :func:`cls_jaccard`).
- **Per-image values.** Every metric returns one value per image along dim 0, so reports can
  average, or bootstrap confidence intervals, over images. A sequence of layers adds a layer
  dimension at position 1: ``[B, heads]`` for one layer, ``[B, layers, heads]`` for many.
- **NaN marks undefined values** (an image with no query patch inside an instance, no
  foreground patch, no ground-truth box); aggregate with ``torch.nanmean`` or the query
  weights provided.
- Arithmetic is float64 (attention entropies and CKA's centred sums lose digits in float32).

Patch ownership (instance ground truth at patch resolution)
-----------------------------------------------------------
A pixel instance map (0 = background, 1..n = instances) is downsampled by **majority vote per
patch**: the owner of a patch is the id covering the most of its ``p·p`` pixels (ties go to the
lowest id, so background wins a tie with an object), and its *purity* is that id's pixel
fraction. See :func:`patch_ownership`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
AttentionInput = Tensor | Sequence[Tensor]
HeadMode = Literal["mean", "each"]

__all__ = [
    "InstanceAwareness",
    "StreamingCKA",
    "recording_last_layer_keys",
    "TokenCut",
    "attention_entropy",
    "attention_nmi",
    "box_iou",
    "boxes_from_instances",
    "cls_jaccard",
    "corloc",
    "discover_objects",
    "instance_awareness",
    "keep_mass_threshold",
    "last_layer_keys",
    "layer_cka",
    "linear_cka",
    "mean_attention_distance",
    "patch_distances",
    "patch_ownership",
    "tokencut",
]

# Relative slack when comparing float64 prefix sums with a mass target: a prefix whose exact sum
# equals the target must count as reaching it even if summation rounded it a hair below.
_MASS_RTOL = 1e-10


# ------------------------------------------------------------------------------------------
# shared helpers


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    a, b = x
    return int(a), int(b)


def _map_layers(fn: Callable[[Tensor], Tensor], attn: AttentionInput) -> Tensor:
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


def _check_layer(attn: Tensor, num_prefix: int, num_patches: int | None = None) -> int:
    """Validate one layer ``[B, h, N, N]`` and return L = N − P."""
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be [B, heads, N, N], got {list(attn.shape)}")
    L = attn.shape[-1] - num_prefix
    if L < 1:
        raise ValueError(f"attention has N = {attn.shape[-1]} tokens, not more than num_prefix = {num_prefix}")
    if num_patches is not None and L != num_patches:
        raise ValueError(
            f"attention has N = {attn.shape[-1]} tokens = {num_prefix} prefix + {L} patches, but the grid "
            f"has {num_patches} patches; check grid_hw / patch_size / num_prefix"
        )
    return L


def _patch_rows(attn: Tensor, num_prefix: int) -> Tensor:
    """Patch-query × patch-key block, rows renormalised over patch keys, float64.

    ``[B, h, N, N] → [B, h, L, L]``. A row with zero mass on patch keys (possible only for a
    degenerate map) stays all-zero rather than becoming NaN.
    """
    a = attn[..., num_prefix:, num_prefix:].double()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    """``−Σ p log p`` in nats, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(p, p).sum(dim=dim)


def _masked_query_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over the query axis (last) of ``values [B, h, L]`` where ``valid [B, L]``.

    → ``[B, h]``; NaN for images without a valid query. Invalid entries are replaced (not
    multiplied) by zero so NaNs there cannot leak into the mean.
    """
    v = valid[:, None, :]
    total = torch.where(v, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    count = v.sum(-1).to(values.dtype)
    return total / count  # 0/0 = NaN where an image has no valid query, by design


# ------------------------------------------------------------------------------------------
# attention distance, entropy, NMI


def patch_distances(grid_hw: tuple[int, int], patch_size: int | Sequence[int],
                    device: torch.device | str | None = None) -> Tensor:
    """Euclidean distances in pixels between patch centres, ``[L, L]`` float64.

    Patch ``i`` at grid cell ``(r, c) = (i // gw, i % gw)`` has its centre at
    ``((r + ½)·p_h, (c + ½)·p_w)`` pixels.
    """
    gh, gw = grid_hw
    ph, pw = _pair(patch_size)
    r, c = torch.meshgrid(torch.arange(gh, dtype=torch.float64, device=device),
                          torch.arange(gw, dtype=torch.float64, device=device), indexing="ij")
    pos = torch.stack([(r + 0.5) * ph, (c + 0.5) * pw], dim=-1).reshape(-1, 2)
    # Explicit differences, not torch.cdist: cdist may switch to a matmul formula that loses
    # precision (and gives non-zero self-distances) on larger inputs.
    return (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1).sqrt()


def mean_attention_distance(attn: AttentionInput, grid_hw: tuple[int, int], patch_size: int | Sequence[int],
                            num_prefix: int = 1) -> Tensor:
    """Mean attention distance in pixels, per image and head.

    For patch query ``i`` with renormalised attention ``ã_ij`` over patch keys ``j`` and patch
    centres ``pos``::

        d_i = Σ_j ã_ij · ‖pos_i − pos_j‖₂          (pixels)
        D   = (1/L) Σ_i d_i                          (averaged over patch queries)

    The "attention distance" of Dosovitskiy et al. 2021 (ViT, Fig. 7 / App. D.7) and Raghu et
    al. 2021 ("Do Vision Transformers See Like Convolutional Neural Networks?", Fig. 3): the
    receptive-field size analogue of self-attention. The cls query and cls key are excluded and
    rows renormalised over patch keys (module docstring): the cls token has no position.

    Args:
        attn: ``[B, h, N, N]`` or a sequence of layers (see module docstring).
        grid_hw: ``(gh, gw)`` patch grid; ``L = gh·gw = N − num_prefix``.
        patch_size: ``p`` or ``(p_h, p_w)`` in pixels.
    Returns:
        float64 ``[B, h]`` (one layer) or ``[B, layers, h]``.
    """
    dist = None

    def one(a: Tensor) -> Tensor:
        nonlocal dist
        _check_layer(a, num_prefix, grid_hw[0] * grid_hw[1])
        if dist is None or dist.device != a.device:
            dist = patch_distances(grid_hw, patch_size, a.device)
        return (_patch_rows(a, num_prefix) * dist).sum(-1).mean(-1)

    return _map_layers(one, attn)


def attention_entropy(attn: AttentionInput, num_prefix: int = 1) -> Tensor:
    """Mean attention entropy in nats, per image and head.

    ``H_i = −Σ_j ã_ij log ã_ij`` over patch keys (rows renormalised without cls, ``0 log 0 = 0``),
    averaged over patch queries. Ranges from 0 (every query attends one key) to ``log L``
    (uniform attention). Used as a locality / focus measure in e.g. Zhai et al. 2023
    ("Stabilizing Transformer Training by Preventing Attention Entropy Collapse") and Park et al.
    2023; here in nats, over patch keys only.

    Returns: float64 ``[B, h]`` or ``[B, layers, h]``.
    """

    def one(a: Tensor) -> Tensor:
        _check_layer(a, num_prefix)
        return _entropy(_patch_rows(a, num_prefix)).mean(-1)

    return _map_layers(one, attn)


def attention_nmi(attn: AttentionInput, num_prefix: int = 1) -> Tensor:
    """Normalised mutual information between query and key position, per image and head.

    Park et al. 2023, "What Do Self-Supervised Vision Transformers Learn?" (ICLR), §2: treat a
    head's attention as a joint distribution of query position ``Q`` and key position ``K``
    with ``p(q) = 1/L`` (uniform over patch queries) and ``p(k|q) = ã_qk``. Then::

        p(k)     = (1/L) Σ_q ã_qk
        I(Q; K)  = H(K) − H(K|Q) = H(p(k)) − (1/L) Σ_q H(ã_q·)
        NMI      = I(Q; K) / sqrt(H(Q) · H(K)),       H(Q) = log L

    (their normalisation, ``mi / sqrt(eq * ek)``). NMI ≈ 0 means *attention collapse*: every
    query attends the same keys (the map does not depend on the query); NMI = 1 for one-hot
    attention to distinct keys (e.g. each patch attends only itself). Unlike the original code
    (which uses the full ``[N, N]`` map), cls is dropped and rows renormalised over patch keys
    (module docstring). When ``H(K) = 0`` (every query attends one and the same key) I = 0 and
    NMI is defined as 0.

    Returns: float64 ``[B, h]`` or ``[B, layers, h]``.
    """

    def one(a: Tensor) -> Tensor:
        L = _check_layer(a, num_prefix)
        p = _patch_rows(a, num_prefix)  # [B, h, L, L] = p(k|q)
        h_k = _entropy(p.mean(dim=-2))  # H(K), p(k) = mean over queries
        h_k_given_q = _entropy(p).mean(dim=-1)
        mi = (h_k - h_k_given_q).clamp_min(0.0)  # ≥ 0 exactly; clamp float rounding
        h_q = torch.log(torch.tensor(float(L), dtype=torch.float64, device=a.device))
        denom = torch.sqrt(h_q * h_k)
        return torch.where(denom > 0, mi / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(mi))

    return _map_layers(one, attn)


# ------------------------------------------------------------------------------------------
# thresholding (DINO)


def keep_mass_threshold(maps: Tensor, mass: float = 0.6, ndim: int = 1) -> Tensor:
    """DINO's thresholding: keep the smallest set of largest values holding ``mass`` of the total.

    Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision Transformers", §4.2.1 /
    ``visualize_attention.py``): sort a map's values in decreasing order and keep the shortest
    prefix whose sum reaches ``mass · Σ values``. Formally, with values sorted
    ``v_(1) ≥ v_(2) ≥ …`` and ``S_k = Σ_{m≤k} v_(m)``, entry ``(k)`` is kept iff
    ``S_{k−1} < mass · S_total`` — so the kept sum is ``≥ mass · total`` and dropping the
    smallest kept value would fall below it (minimal cardinality).

    Ties: the sort is stable, so among equal values the one at the lower flat index is kept
    first; the result is deterministic and has exactly the minimal number of entries (DINO's
    unstable ``torch.sort`` leaves this arbitrary). E.g. a uniform map of n values keeps the
    first ``ceil(mass·n)`` entries in index order.

    Float rounding: the decision is made on the values as given (float32 maps convert exactly to
    float64, so e.g. ``0.3f + 0.4f`` is not ``0.7 · total`` of float32 decimals); prefix sums are
    float64 and compared with a relative slack of 1e-10, so a
    prefix whose exact sum equals the target counts as reaching it (the kept mass is
    ``≥ mass·(1 − 1e-10)·total``). All-zero maps keep nothing; ``mass = 0`` keeps nothing.

    Args:
        maps: non-negative ``[..., n]`` (or ``[..., *spatial]`` with ``ndim`` trailing dims
            forming one map, e.g. ``ndim=2`` for ``[B, h, gh, gw]``).
        mass: fraction in [0, 1].
    Returns:
        bool tensor shaped like ``maps``.
    """
    if not 0.0 <= mass <= 1.0:
        raise ValueError(f"mass must be in [0, 1], got {mass}")
    if ndim < 1 or ndim > maps.ndim:
        raise ValueError(f"ndim must be in [1, {maps.ndim}] for maps of shape {list(maps.shape)}, got {ndim}")
    flat = maps.reshape(*maps.shape[: maps.ndim - ndim], -1).double()
    if (flat < 0).any():
        raise ValueError("keep_mass_threshold needs non-negative maps (attention weights, not logits)")
    values, order = flat.sort(dim=-1, descending=True, stable=True)
    total = values.sum(dim=-1, keepdim=True)
    before = values.cumsum(dim=-1) - values  # exclusive prefix sums S_{k-1}
    keep_sorted = before < mass * total * (1.0 - _MASS_RTOL)
    keep_sorted &= total > 0
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(maps.shape)


# ------------------------------------------------------------------------------------------
# ground truth at patch resolution


def patch_ownership(instances: Tensor, patch_size: int | Sequence[int]) -> tuple[Tensor, Tensor]:
    """Majority-vote instance id of every patch, and its purity.

    ``owner[b, r, c] = argmax_id #{pixels of patch (r, c) with that id}`` (ties → lowest id, so
    background 0 wins a tie), ``purity = that count / (p_h·p_w)``. Counting uses one
    ``bincount`` over (image, patch, id) — memory ``B·L·K`` for K distinct ids, never a one-hot
    image — and ids are compacted first, so sparse ids (e.g. COCO annotation ids) cost nothing.

    Args:
        instances: int ``[B, H, W]`` (or ``[H, W]``), 0 = background, ids ≥ 0; H, W multiples
            of the patch size.
    Returns:
        ``owner`` int64 ``[B, gh, gw]`` and ``purity`` float64 ``[B, gh, gw]`` (no batch dim for
        a ``[H, W]`` input).
    """
    squeeze = instances.ndim == 2
    if squeeze:
        instances = instances[None]
    if instances.ndim != 3:
        raise ValueError(f"instances must be [B, H, W], got {list(instances.shape)}")
    if instances.is_floating_point() or instances.dtype == torch.bool:
        raise ValueError(f"instances must be an integer id map, got {instances.dtype}")
    if (instances < 0).any():
        raise ValueError("instance ids must be ≥ 0 (0 = background)")
    B, H, W = instances.shape
    ph, pw = _pair(patch_size)
    if H % ph or W % pw:
        raise ValueError(f"instance map {H}×{W} is not divisible by the patch size {ph}×{pw}")
    gh, gw = H // ph, W // pw
    L = gh * gw
    ids, dense = torch.unique(instances, sorted=True, return_inverse=True)  # dense ids 0..K-1
    K = ids.numel()
    dev = instances.device
    patch = (torch.arange(H, device=dev) // ph)[:, None] * gw + (torch.arange(W, device=dev) // pw)[None, :]
    index = (torch.arange(B, device=dev)[:, None, None] * L + patch[None]) * K + dense
    counts = torch.bincount(index.reshape(-1), minlength=B * L * K).view(B, L, K)
    best = counts.argmax(dim=-1)  # first maximum → lowest id on ties
    owner = ids[best].view(B, gh, gw)
    purity = (counts.gather(-1, best[..., None])[..., 0].double() / (ph * pw)).view(B, gh, gw)
    if squeeze:
        return owner[0], purity[0]
    return owner, purity


def _foreground_patches(foreground: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """Pixel foreground (bool, or ids with 0 = background) → ``[B, gh, gw]`` bool by strict
    majority: a patch is foreground iff more than half of its pixels are."""
    ph, pw = _pair(patch_size)
    fg = (foreground != 0).double()[:, None]
    if fg.shape[-2] % ph or fg.shape[-1] % pw:
        raise ValueError(f"foreground map {list(fg.shape[-2:])} is not divisible by the patch size {ph}×{pw}")
    return F.avg_pool2d(fg, kernel_size=(ph, pw), stride=(ph, pw))[:, 0] > 0.5


# ------------------------------------------------------------------------------------------
# instance-awareness (new)


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
    (:func:`patch_ownership`): ``own(j)`` is patch ``j``'s id (0 = background).

    Queries: patches ``q`` with ``own(q) > 0`` and purity ``≥ min_purity`` (the instance covers at
    least that fraction of the query patch's pixels; 0.5 by default, so the query lies mostly
    inside the instance). Keys: all patches, by owner. With ``ã_qj`` renormalised over patch
    keys (module docstring)::

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
    if heads not in ("mean", "each"):
        raise ValueError(f"heads must be 'mean' or 'each', got {heads!r}")
    owner, purity = patch_ownership(instances, patch_size)
    B = owner.shape[0]
    owner, purity = owner.reshape(B, -1), purity.reshape(B, -1)
    L = owner.shape[1]
    valid = (owner > 0) & (purity >= min_purity)  # [B, L] query patches
    same = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] > 0)  # [B, Lq, Lk]
    background = (owner == 0).double()  # [B, Lk]
    other = (~same & (owner[:, None, :] > 0)).double()
    same_f = same.double()

    def one(a: Tensor) -> Tensor:
        _check_layer(a, num_prefix, L)
        if a.shape[0] != B:
            raise ValueError(f"attention batch {a.shape[0]} ≠ instance-map batch {B}")
        p = _patch_rows(a, num_prefix)
        if heads == "mean":
            p = p.mean(dim=1, keepdim=True)
        m_same = torch.einsum("bhqk,bqk->bhq", p, same_f)
        m_other = torch.einsum("bhqk,bqk->bhq", p, other)
        m_bg = torch.einsum("bhqk,bk->bhq", p, background)
        kept = keep_mass_threshold(p, mass)
        inter = (kept & same[:, None]).sum(-1).double()
        union = (kept | same[:, None]).sum(-1).double()
        jac = inter / union.clamp_min(1.0)
        # [B, h', 4] (or [B, 4] for head-mean) so that layers stack at dim 1 like every metric
        out = torch.stack([_masked_query_mean(x, valid) for x in (m_same, m_other, m_bg, jac)], dim=-1)
        return out[:, 0] if heads == "mean" else out

    res = _map_layers(one, attn).movedim(-1, 0)
    return InstanceAwareness(mass=res[0], leak=res[1], background=res[2], jaccard=res[3],
                             num_queries=valid.sum(-1))


def cls_jaccard(attn: AttentionInput, foreground: Tensor, patch_size: int | Sequence[int], *,
                mass: float = 0.6, heads: HeadMode = "mean", num_prefix: int = 1) -> Tensor:
    """DINO-style Jaccard of the thresholded CLS→patch attention with the object mask.

    Caron et al. 2021 (DINO, Table 6 / §4.2.1): threshold the cls token's attention over patches
    to keep ``mass`` (60 %) of it (:func:`keep_mass_threshold`) and compare with the foreground::

        J = |T ∩ F| / |T ∪ F|,   T = keep_mass_threshold(ã_cls, mass),
        F = patches whose pixels are more than half foreground (union of all object masks)

    ``ã_cls`` is the cls query's row over patch keys, renormalised (the cls→cls weight dropped).
    ``heads="mean"`` thresholds the head-mean map; ``"each"`` gives one value per head (DINO
    shows per-head maps; report the best or the mean as needed). NaN for images without
    foreground patches (J undefined: there is no object to find).

    Args:
        attn: ``[B, h, N, N]`` or a sequence of layers (DINO uses the last layer).
        foreground: ``[B, H, W]`` bool, or an instance/class id map where non-zero = object.
    Returns:
        float64 ``[B]`` / ``[B, h]`` (``heads``), with a layer dim at 1 for a sequence.
    """
    if heads not in ("mean", "each"):
        raise ValueError(f"heads must be 'mean' or 'each', got {heads!r}")
    fg = _foreground_patches(foreground, patch_size)
    B = fg.shape[0]
    fg = fg.reshape(B, 1, -1)
    has_fg = fg.any(-1)  # [B, 1]

    def one(a: Tensor) -> Tensor:
        _check_layer(a, num_prefix, fg.shape[-1])
        row = a[:, :, 0, num_prefix:].double()
        row = row / row.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        if heads == "mean":
            row = row.mean(dim=1, keepdim=True)
        kept = keep_mass_threshold(row, mass)
        j = (kept & fg).sum(-1).double() / (kept | fg).sum(-1).double().clamp_min(1.0)
        j = torch.where(has_fg, j, torch.full_like(j, float("nan")))
        return j[:, 0] if heads == "mean" else j

    return _map_layers(one, attn)


# ------------------------------------------------------------------------------------------
# CKA (Kornblith et al. 2019)


def linear_cka(X: Tensor, Y: Tensor) -> Tensor:
    """Linear centred kernel alignment between two representations of the same ``n`` examples.

    Kornblith et al. 2019 ("Similarity of Neural Network Representations Revisited", Eq. 5),
    feature-space form: with column-centred ``X [n, p]``, ``Y [n, q]``::

        CKA(X, Y) = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F)

    In [0, 1]; invariant to orthogonal transforms and isotropic scaling of either side (not to
    arbitrary invertible linear maps). NaN if either side has zero variance.

    Returns: float64 scalar.
    """
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must be [n, p] and [n, q] with the same n, got {list(X.shape)}, {list(Y.shape)}")
    X = X.double() - X.double().mean(0)
    Y = Y.double() - Y.double().mean(0)
    return (Y.T @ X).pow(2).sum() / ((X.T @ X).norm() * (Y.T @ Y).norm())


class StreamingCKA:
    """Layer × layer linear CKA between two models, accumulated over batches.

    Memory does not grow with the dataset: per layer it keeps ``n``, ``Σx`` and ``XᵀX`` (and the
    same for Y), and one cross block ``XᵢᵀYⱼ`` per layer pair — all float64. At the end the
    sums are centred exactly (feature-space formula, :func:`linear_cka`)::

        Cxy = Σ (x − x̄)(y − ȳ)ᵀ = Σ x yᵀ − n · x̄ ȳᵀ,   likewise Cxx, Cyy
        CKA_ij = ‖C_{x_i y_j}‖²_F / (‖C_{x_i x_i}‖_F · ‖C_{y_j y_j}‖_F)

    To avoid cancellation in ``Σ x yᵀ − n x̄ ȳᵀ`` when features have large means (ViT residual
    streams do), every row is first shifted by the first batch's mean (any constant shift
    leaves the centred sums unchanged). Cost: ``(Σ_i p_i)·(Σ_j q_j)`` float64s for the cross
    sums — ViT-B (13 × 768 per side) ≈ 0.8 GB, ViT-Tiny ≈ 50 MB.

    Usage: ``update(feats_a, feats_b)`` per batch with lists of ``[n, p_i]`` / ``[n, q_j]``
    tensors (same ``n`` rows, i.e. the same examples); ``compute() → [La, Lb]``.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift_a: list[Tensor] | None = None
        self._shift_b: list[Tensor] | None = None

    def update(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> None:
        xs = [f.detach().double().reshape(f.shape[0], -1) for f in feats_a]
        ys = [f.detach().double().reshape(f.shape[0], -1) for f in feats_b]
        n = xs[0].shape[0]
        if any(x.shape[0] != n for x in xs + ys):
            raise ValueError("every layer of both models must give the same number of rows (examples)")
        if self._shift_a is None:
            self._shift_a = [x.mean(0) for x in xs]
            self._shift_b = [y.mean(0) for y in ys]
            self._sum_a = [torch.zeros_like(s) for s in self._shift_a]
            self._sum_b = [torch.zeros_like(s) for s in self._shift_b]
            self._gram_a = [torch.zeros(len(s), len(s), dtype=torch.float64, device=s.device) for s in self._shift_a]
            self._gram_b = [torch.zeros(len(s), len(s), dtype=torch.float64, device=s.device) for s in self._shift_b]
            self._dims_a = [s.numel() for s in self._shift_a]
            self._dims_b = [s.numel() for s in self._shift_b]
            self._cross = torch.zeros(sum(self._dims_a), sum(self._dims_b), dtype=torch.float64, device=xs[0].device)
        elif [x.shape[1] for x in xs] != self._dims_a or [y.shape[1] for y in ys] != self._dims_b:
            raise ValueError("layer widths changed between batches")
        xs = [x - s for x, s in zip(xs, self._shift_a)]
        ys = [y - s for y, s in zip(ys, self._shift_b)]
        for i, x in enumerate(xs):
            self._sum_a[i] += x.sum(0)
            self._gram_a[i] += x.T @ x
        for j, y in enumerate(ys):
            self._sum_b[j] += y.sum(0)
            self._gram_b[j] += y.T @ y
        self._cross += torch.cat(xs, dim=1).T @ torch.cat(ys, dim=1)  # all layer pairs in one matmul
        self.n += n

    def compute(self) -> Tensor:
        """→ float64 ``[La, Lb]`` CKA matrix."""
        if self.n == 0:
            raise ValueError("StreamingCKA.compute() before any update()")
        n = self.n
        norm_a = [(g - torch.outer(s, s) / n).norm() for g, s in zip(self._gram_a, self._sum_a)]
        norm_b = [(g - torch.outer(s, s) / n).norm() for g, s in zip(self._gram_b, self._sum_b)]
        out = torch.empty(len(norm_a), len(norm_b), dtype=torch.float64)
        oa = 0
        for i, pa in enumerate(self._dims_a):
            ob = 0
            for j, pb in enumerate(self._dims_b):
                c = self._cross[oa:oa + pa, ob:ob + pb] - torch.outer(self._sum_a[i], self._sum_b[j]) / n
                out[i, j] = (c.pow(2).sum() / (norm_a[i] * norm_b[j])).cpu()
                ob += pb
            oa += pa
        return out


def _num_prefix(model: nn.Module) -> int:
    # timm ViTs say how many prefix tokens (cls + registers) they have; ours have one cls token.
    return int(getattr(model, "num_prefix_tokens", 1))


def _block_outputs(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Output tokens ``[B, N, D]`` of every ``model.blocks[i]`` for whole images (no final norm)."""
    outs: list[Tensor] = []
    handles = [blk.register_forward_hook(lambda _m, _i, o: outs.append(o)) for blk in model.blocks]
    try:
        model.forward_features(images)
    finally:
        for h in handles:
            h.remove()
    return outs


def _select_tokens(x: Tensor, tokens: str, num_prefix: int) -> Tensor:
    if tokens == "patch":
        return x[:, num_prefix:].reshape(-1, x.shape[-1])
    if tokens == "cls":
        return x[:, 0]
    if tokens == "mean":
        return x[:, num_prefix:].mean(dim=1)
    raise ValueError(f"tokens must be 'patch', 'cls' or 'mean', got {tokens!r}")


@torch.no_grad()
def layer_cka(model_a: nn.Module, model_b: nn.Module, batches: Iterable[Tensor | dict[str, Any]], *,
              tokens: Literal["patch", "cls", "mean"] = "patch", device: torch.device | str | None = None,
              max_batches: int | None = None) -> Tensor:
    """Layer × layer linear CKA between two ViT encoders (e.g. MAE vs R-MAE) over a dataset.

    Layer ``i`` is the output of ``blocks[i]`` (residual stream, before the final norm) on whole
    images. The examples compared are chosen by ``tokens``: ``"patch"`` — every patch token of
    every image is one example (both models must have the same patch grid; this is the token
    CKA of Raghu et al. 2021); ``"cls"`` — the cls token per image; ``"mean"`` — mean-pooled
    patch tokens per image. Accumulated with :class:`StreamingCKA` (memory independent of the
    number of images). Models run in eval mode (restored afterwards).

    Args:
        batches: iterable of image tensors ``[B, 3, H, W]`` or batch dicts with ``"images"``.
    Returns:
        float64 ``[depth_a, depth_b]``.
    """
    acc = StreamingCKA()
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    try:
        for k, batch in enumerate(batches):
            if max_batches is not None and k >= max_batches:
                break
            images = batch["images"] if isinstance(batch, dict) else batch
            if device is not None:
                images = images.to(device)
            fa = [_select_tokens(x, tokens, _num_prefix(model_a)) for x in _block_outputs(model_a, images)]
            fb = [_select_tokens(x, tokens, _num_prefix(model_b)) for x in _block_outputs(model_b, images)]
            if fa[0].shape[0] != fb[0].shape[0]:
                raise ValueError(f"tokens='{tokens}' gives {fa[0].shape[0]} vs {fb[0].shape[0]} examples: "
                                 f"the models have different patch grids; use tokens='cls' or 'mean'")
            acc.update(fa, fb)
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    return acc.compute()


# ------------------------------------------------------------------------------------------
# unsupervised object discovery (TokenCut) and CorLoc


@contextmanager
def recording_last_layer_keys(model: nn.Module, drop_prefix: bool = True) -> Iterator[list[Tensor]]:
    """Within the block, every forward pass of ``model`` appends its last-layer keys
    (``[B, L, D]``, heads concatenated; see :func:`last_layer_keys`) to the yielded list — so an
    analysis that already runs the encoder gets the keys from the same pass."""
    attn = model.blocks[-1].attn
    heads = int(attn.num_heads)
    prefix = 0 if not drop_prefix else _num_prefix(model)
    k_norm = getattr(attn, "k_norm", None)
    keys: list[Tensor] = []

    def hook(_m, _i, qkv: Tensor) -> None:
        B, N, three_d = qkv.shape
        k = qkv.detach().reshape(B, N, 3, heads, three_d // (3 * heads))[:, :, 1]  # [B, N, heads, head_dim]
        if k_norm is not None and not isinstance(k_norm, nn.Identity):
            k = k_norm(k)  # normalises head_dim, same as timm's [B, heads, N, head_dim] layout
        keys.append(k.reshape(B, N, -1)[:, prefix:])

    handle = attn.qkv.register_forward_hook(hook)
    try:
        yield keys
    finally:
        handle.remove()


@torch.no_grad()
def last_layer_keys(model: nn.Module, images: Tensor, drop_prefix: bool = True) -> Tensor:
    """Keys of the last attention layer, heads concatenated: ``[B, L, D]`` (``[B, N, D]`` with
    prefix tokens when ``drop_prefix=False``).

    A forward hook on ``model.blocks[-1].attn.qkv`` (a Linear, output ``[B, N, 3·D]``) reshapes
    its output to ``(B, N, 3, heads, D/heads)`` and takes index 1 (keys), as TokenCut / LOST do.
    Works for our models and timm ``VisionTransformer`` (same module names); timm's
    ``attn.k_norm`` (QK-norm models) is applied when present, since those are the keys attention
    uses.
    """
    with recording_last_layer_keys(model, drop_prefix) as keys:
        model.forward_features(images)
    return keys[-1]


class TokenCut(NamedTuple):
    """Result of :func:`tokencut` for a batch.

    boxes: float64 ``[B, 4]`` (x0, y0, x1, y1) pixels, x1/y1 exclusive (the data's box convention).
    masks: bool ``[B, gh, gw]`` the seed's connected foreground component.
    seeds: int64 ``[B]`` patch index with the largest |eigenvector| entry.
    eigenvectors: float64 ``[B, gh, gw]`` second-smallest generalised eigenvector, signed so the
        foreground side is the one above the mean.
    """

    boxes: Tensor
    masks: Tensor
    seeds: Tensor
    eigenvectors: Tensor


def _seed_component(mask: Tensor, seeds: Tensor) -> Tensor:
    """4-connected component of ``mask [B, gh, gw]`` containing patch ``seeds [B]`` (flood fill,
    vectorised over the batch; at most ``L`` dilation steps)."""
    B, gh, gw = mask.shape
    comp = torch.zeros(B, gh * gw, dtype=torch.bool, device=mask.device)
    comp[torch.arange(B, device=mask.device), seeds] = True
    comp = comp.view(B, gh, gw) & mask
    while True:
        grown = comp.clone()
        grown[:, 1:, :] |= comp[:, :-1, :]
        grown[:, :-1, :] |= comp[:, 1:, :]
        grown[:, :, 1:] |= comp[:, :, :-1]
        grown[:, :, :-1] |= comp[:, :, 1:]
        grown &= mask
        if torch.equal(grown, comp):
            return comp
        comp = grown


def _mask_boxes(masks: Tensor, patch_size: int | Sequence[int]) -> Tensor:
    """Tight box of each non-empty ``masks [B, gh, gw]`` in pixels (x0, y0, x1, y1), x1/y1 exclusive."""
    ph, pw = _pair(patch_size)
    gh, gw = masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [B, gh], [B, gw]
    r0 = rows.int().argmax(1)
    r1 = gh - 1 - rows.flip(1).int().argmax(1)
    c0 = cols.int().argmax(1)
    c1 = gw - 1 - cols.flip(1).int().argmax(1)
    return torch.stack([c0 * pw, r0 * ph, (c1 + 1) * pw, (r1 + 1) * ph], dim=1).double()


def tokencut(keys: Tensor, grid_hw: tuple[int, int], patch_size: int | Sequence[int], *,
             tau: float = 0.2, eps: float = 1e-5) -> TokenCut:
    """TokenCut object discovery: normalised cut on the patch-key affinity graph, batched.

    Wang et al. 2022 ("Self-Supervised Transformers for Unsupervised Object Discovery using
    Normalized Cut", CVPR; official ``object_discovery.py``)::

        W_ij = 1 if cos(k_i, k_j) > τ else ε          (τ = 0.2, ε = 1e-5: binary graph)
        D    = diag(Σ_j W_ij)
        (D − W) y = λ D y,   y = second-smallest generalised eigenvector
        foreground = {i : y_i > mean(y)}, flipped if needed so it contains the seed argmax_i |y_i|
        box  = bounding box of the 4-connected component of the foreground containing the seed

    The generalised problem is solved as the symmetric one ``D^{-½}(D − W)D^{-½} z = λ z``,
    ``y = D^{-½} z`` (``torch.linalg.eigh``, float64, batched) — the same eigenvector as scipy's
    ``eigh(D − W, D)`` up to sign, and the sign is fixed by the seed rule. Boxes are patch
    boxes scaled by the patch size.

    Args:
        keys: ``[B, L, D]`` patch keys (no prefix tokens), e.g. :func:`last_layer_keys`.
        grid_hw: ``(gh, gw)``, ``gh·gw = L``.
    """
    if keys.ndim == 2:
        keys = keys[None]
    B, L, _ = keys.shape
    gh, gw = grid_hw
    if gh * gw != L:
        raise ValueError(f"keys have {L} patches but the grid {gh}×{gw} has {gh * gw}")
    if L < 2:
        raise ValueError("a normalised cut needs at least 2 patches")
    f = F.normalize(keys.double(), dim=-1)
    sim = f @ f.transpose(1, 2)
    W = torch.full_like(sim, eps).masked_fill_(sim > tau, 1.0)
    d_isqrt = W.sum(-1).rsqrt()  # degrees ≥ L·ε > 0
    eye = torch.eye(L, dtype=torch.float64, device=keys.device)
    lap = eye - d_isqrt[:, :, None] * W * d_isqrt[:, None, :]
    _, vecs = torch.linalg.eigh(lap)  # ascending eigenvalues
    y = d_isqrt * vecs[:, :, 1]
    seeds = y.abs().argmax(dim=1)
    part = y > y.mean(dim=1, keepdim=True)
    flip = ~part.gather(1, seeds[:, None])  # seed not in the "above mean" side → swap sides
    part = torch.where(flip, ~part, part)
    y = torch.where(flip, -y, y)
    masks = _seed_component(part.view(B, gh, gw), seeds)
    return TokenCut(boxes=_mask_boxes(masks, patch_size), masks=masks, seeds=seeds, eigenvectors=y.view(B, gh, gw))


def discover_objects(model: nn.Module, images: Tensor, *, tau: float = 0.2, eps: float = 1e-5) -> TokenCut:
    """:func:`tokencut` on :func:`last_layer_keys` of ``model`` (our ViTs or timm ViTs)."""
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return tokencut(last_layer_keys(model, images), grid, model.patch_embed.patch_size, tau=tau, eps=eps)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``a [n, 4]`` and ``b [m, 4]`` (x0, y0, x1, y1; continuous coordinates, so a
    pixel box with exclusive x1/y1 has area ``(x1 − x0)(y1 − y0)``) → float64 ``[n, m]``."""
    a, b = a.double().reshape(-1, 4), b.double().reshape(-1, 4)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp_min(torch.finfo(torch.float64).tiny)


def boxes_from_instances(instances: Tensor) -> list[Tensor]:
    """Ground-truth boxes from an instance map: for each image of ``[B, H, W]`` (0 = background) a
    float64 ``[n_i, 4]`` tensor (x0, y0, x1, y1), x1/y1 exclusive, one row per id present (in
    increasing id order). Use this after cropping/resizing so boxes match the images."""
    if instances.ndim == 2:
        instances = instances[None]
    out = []
    for inst in instances:  # per image; the per-id work below is vectorised
        ids = torch.unique(inst)
        ids = ids[ids > 0]
        if ids.numel() == 0:
            out.append(torch.zeros(0, 4, dtype=torch.float64, device=inst.device))
            continue
        m = inst[None] == ids[:, None, None]  # [n, H, W]
        out.append(_mask_boxes(m, 1))
    return out


def corloc(pred_boxes: Tensor, gt_boxes: Sequence[Tensor], threshold: float = 0.5) -> Tensor:
    """Correct localisation per image: 1 if the predicted box has IoU ≥ ``threshold`` with any
    ground-truth box of the image, else 0 (Deselaers et al. 2012; the unsupervised object
    discovery protocol of LOST / TokenCut). CorLoc = ``corloc(...).nanmean()``.

    Args:
        pred_boxes: ``[B, 4]`` one box per image (e.g. ``TokenCut.boxes``).
        gt_boxes: B tensors ``[n_i, 4]`` (e.g. :func:`boxes_from_instances`), same convention.
    Returns:
        float64 ``[B]`` of 0/1; NaN for an image without ground-truth boxes.
    """
    if len(gt_boxes) != pred_boxes.shape[0]:
        raise ValueError(f"{pred_boxes.shape[0]} predicted boxes but ground truth for {len(gt_boxes)} images")
    hits = []
    for pred, gt in zip(pred_boxes, gt_boxes):
        if gt.numel() == 0:
            hits.append(float("nan"))
        else:
            hits.append(float(box_iou(pred[None], gt.to(pred.device)).max() >= threshold))
    return torch.tensor(hits, dtype=torch.float64, device=pred_boxes.device)
