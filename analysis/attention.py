"""Attention maps for display: cls and query-patch maps, head aggregation, rollout, overlays.

Getting the weights is :mod:`analysis.encoder`'s job (``attention_pass`` / ``recording``, for
our models and any timm ViT alike); this module turns them into pictures.

Conventions: ``attn [B, heads, N, N]`` is one layer, rows = queries (each sums to 1), columns
= keys. ``N = P + L``: the ``P = num_prefix`` prefix tokens come first (the cls token at index 0,
then registers / a distillation token, if any), then the ``L = gh·gw`` patches in row-major
order: patch ``i`` is token ``P + i`` and sits at grid cell ``(i // gw, i % gw)``. Maps over
patch keys drop the prefix keys and are **not** renormalised (what a head spends on cls and
registers is simply not drawn); display maps are ``[B, heads, gh, gw]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _patch_keys(rows: Tensor, grid: tuple[int, int], num_prefix: int) -> Tensor:
    """Attention rows ``[..., N]`` → ``[..., gh, gw]`` over the patch keys (prefix keys dropped)."""
    gh, gw = grid
    if rows.shape[-1] - num_prefix != gh * gw:
        raise ValueError(f"attention has N = {rows.shape[-1]} tokens, not {num_prefix} prefix + {gh}×{gw} patches; "
                         f"check grid / num_prefix")
    return rows[..., num_prefix:].reshape(*rows.shape[:-1], gh, gw)


def _need_cls(num_prefix: int) -> None:
    if num_prefix < 1:
        raise ValueError("this encoder has no cls token (num_prefix = 0): use a query patch instead")


def cls_maps(attn: Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """cls → patch attention of one layer: ``[B, h, N, N]`` → ``[B, h, gh, gw]`` (not renormalised)."""
    _need_cls(num_prefix)
    return _patch_keys(attn[:, :, 0], grid, num_prefix)


def patch_query_maps(attn: Tensor, query: int | Tensor, grid: tuple[int, int], num_prefix: int = 1) -> Tensor:
    """Attention from one query **patch** (R-MAE paper, Fig. 6): ``[B, h, N, N]`` → ``[B, h, gh, gw]``.

    ``query`` is a patch index (0-based, counted over patches only), an int or a ``[B]`` tensor
    (one query per image); its token is ``num_prefix + query``.
    """
    B = attn.shape[0]
    q = torch.as_tensor(query, device=attn.device).long().expand(B) + num_prefix  # token index
    rows = attn[torch.arange(B, device=attn.device), :, q]  # [B, h, N]
    return _patch_keys(rows, grid, num_prefix)


def aggregate_heads(maps: Tensor, how: str | int = "mean") -> Tensor:
    """``[B, h, ...]`` → ``[B, ...]``: ``"mean"``, ``"max"``, or a head index (an int)."""
    if isinstance(how, int) or (isinstance(how, str) and how.isdigit()):
        return maps[:, int(how)]
    if how == "mean":
        return maps.mean(dim=1)
    if how == "max":
        return maps.max(dim=1).values
    raise ValueError(f"head aggregation must be 'mean', 'max' or a head index, got {how!r}")


def rollout(attn_layers: Sequence[Tensor], head_fusion: str | int = "mean", residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) over all ``N`` tokens → ``[B, N, N]``, rows sum to 1.

    Per layer: fuse heads, add the residual path ``Â = (1 − r)·A + r·I``, and **normalise each
    row** (``Â / Â.sum(-1, keepdim=True)``) so Â stays a stochastic matrix. The popular
    vit-explain code divides by ``Â.sum(dim=-1)`` without keepdim, which broadcasts the row sums
    along the wrong axis (column j is divided by row j's sum). Then ``R = Â_L ··· Â_1``. Prefix
    tokens take part like any other token (information flows through them).
    """
    result = None
    for attn in attn_layers:
        fused = aggregate_heads(attn, head_fusion).double()  # [B, N, N]
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        a = (1 - residual) * fused + residual * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("rollout needs at least one layer")
    return result.float()


def rollout_maps(attn_layers: Sequence[Tensor], grid: tuple[int, int], query: int | None = None,
                 head_fusion: str | int = "mean", num_prefix: int = 1) -> Tensor:
    """Rollout from the cls token (``query=None``) or from query patch ``query`` → ``[B, gh, gw]``
    over the patch keys."""
    r = rollout(attn_layers, head_fusion)
    if query is None:
        _need_cls(num_prefix)
        row = r[:, 0]
    else:
        row = r[:, num_prefix + int(query)]
    return _patch_keys(row, grid, num_prefix)


def query_index(y: float, x: float, patch: int, grid: tuple[int, int]) -> int:
    """The patch index (counted over patches) under pixel ``(y, x)`` of the model's input,
    clamped to the grid."""
    gy = min(max(int(y // patch), 0), grid[0] - 1)
    gx = min(max(int(x // patch), 0), grid[1] - 1)
    return gy * grid[1] + gx


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "nearest") -> Tensor:
    """``[..., gh, gw]`` → ``[..., H, W]`` for overlays (nearest keeps patch boundaries visible)."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    x = F.interpolate(x, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return x.reshape(*lead, *size)


def normalise_for_display(maps: Tensor) -> Tensor:
    """Per-map min–max to [0, 1] over the last two axes."""
    lo = maps.flatten(-2).min(-1).values[..., None, None]
    hi = maps.flatten(-2).max(-1).values[..., None, None]
    return (maps - lo) / (hi - lo).clamp(min=1e-12)
