"""Position embeddings at another image size, the way each original project computes them.

A foreign encoder analysed at a size other than the one its weights were trained at must see
the position embeddings its own code would give it there — else its features are not the
original model's. Each project does it its own way (``resample`` in a run's ``arch``):

==========  =====================================================================================
rule        what the original code does (and where)
==========  =====================================================================================
dino        bicubic ``F.interpolate`` with ``scale_factor = (g + 0.1) / g0`` (DINO and iBOT
            ``VisionTransformer.interpolate_pos_encoding``, on every forward pass)
dinov2      the same with ``interpolate_offset`` (0.1; 0 → ``size=``) and ``interpolate_antialias``
            (the hub's register models: offset 0, antialias on) — DINOv2 ``interpolate_pos_encoding``
bicubic     bicubic ``F.interpolate(size=…, align_corners=False)``, no antialias: DeiT's and MAE's
            fine-tuning loaders, BEiT's absolute embeddings, Hugging Face ViTMAE
            ``interpolate_pos_encoding`` — timm's ``resample_abs_pos_embed(antialias=False)``
sincos      MoCo v3's fixed 2-D sin-cos embedding computed for the new grid (its model builds it
            for whatever grid it is given; nothing is learned)
timm        timm's default (bicubic with antialias), for files imported by ``arch=`` alone
==========  =====================================================================================

BEiT's relative position bias tables follow ``rel_pos: beit``: the geometric-progression
resampling of BEiT's ``run_class_finetuning.py`` (cubic spline through the table on
geometrically spaced offsets). The original calls ``scipy.interpolate.interp2d(kind="cubic")``,
removed in SciPy 1.14; on a rectangular grid that is FITPACK's ``regrid_smth`` with ``s=0`` —
exactly what ``RectBivariateSpline(kx=3, ky=3, s=0)`` fits — which is used here. Both evaluate
through FITPACK's ``bispev``, which clamps offsets just outside the geometric range to its ends.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RULES = ("dino", "dinov2", "bicubic", "sincos", "timm")


def to_size(sd: dict[str, torch.Tensor], rule: dict[str, Any], native: tuple[int, int], size: tuple[int, int],
            patch: int) -> dict[str, torch.Tensor]:
    """``sd`` (timm layout, weights at ``native`` pixels) with its position tables for ``size``.
    Unchanged tensors are the same objects; nothing is resampled when the grids are equal."""
    old = (native[0] // patch, native[1] // patch)
    new = (size[0] // patch, size[1] // patch)
    if old == new:
        return sd
    out = dict(sd)
    if "pos_embed" in sd and rule.get("pos_embed") not in (None, "none"):
        out["pos_embed"] = pos_embed(sd["pos_embed"], old, new, rule)
    if rule.get("rel_pos") == "beit":
        for k, v in sd.items():
            if k.endswith("relative_position_bias_table"):
                out[k] = beit_rel_pos_table(v, old, new)
    return out


def pos_embed(pe: torch.Tensor, old: tuple[int, int], new: tuple[int, int], rule: dict[str, Any]) -> torch.Tensor:
    """``[1, P + old_h·old_w, D]`` → ``[1, P + new_h·new_w, D]``; the ``P`` prefix positions (cls,
    distillation token) are kept as they are."""
    name = rule.get("pos_embed")
    prefix = pe.shape[1] - old[0] * old[1]
    if name == "sincos":
        return mocov3_sincos(new, pe.shape[-1])
    if name in ("bicubic", "timm"):
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pe, list(new), list(old), num_prefix_tokens=prefix, interpolation="bicubic",
                                      antialias=name == "timm")
    if name in ("dino", "dinov2"):
        offset = float(rule.get("offset", 0.1))
        antialias = bool(rule.get("antialias", False)) if name == "dinov2" else False
        return _interpolate_offset(pe, old, new, prefix, offset, antialias)
    raise ValueError(f"unknown position-embedding rule {name!r}; known: {', '.join(RULES)}")


def _interpolate_offset(pe: torch.Tensor, old: tuple[int, int], new: tuple[int, int], prefix: int, offset: float,
                        antialias: bool) -> torch.Tensor:
    """DINO / DINOv2: bicubic with ``scale_factor = (new + offset) / old`` (``size=new`` when the
    offset is 0), in float32, on the square grid the weights were trained at."""
    if old[0] != old[1]:
        raise ValueError(f"DINO-style interpolation needs a square trained grid, got {old}")
    M = old[0]
    head, grid = pe[:, :prefix], pe[:, prefix:].float()
    grid = grid.reshape(1, M, M, -1).permute(0, 3, 1, 2)
    if offset:
        kw: dict[str, Any] = {"scale_factor": ((new[0] + offset) / M, (new[1] + offset) / M)}
    else:
        kw = {"size": new}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    if tuple(grid.shape[-2:]) != tuple(new):
        raise ValueError(f"interpolation gave a {tuple(grid.shape[-2:])} grid, expected {new}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(pe.dtype)
    return torch.cat([head, grid], dim=1)


def mocov3_sincos(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed embedding ``[1, 1 + h·w, dim]`` (zero cls position), built as its model
    builds it: the meshgrid of ``(arange(w), arange(h))`` in ``ij`` order, then
    ``[sin(w·ω), cos(w·ω), sin(h·ω), cos(h·ω)]`` with ``ω = temperature^(−i/(dim/4))``."""
    if dim % 4:
        raise ValueError(f"MoCo v3's sin-cos embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    gw, gh = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", gw.flatten(), omega)
    out_h = torch.einsum("m,d->md", gh.flatten(), omega)
    emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)
    return torch.cat([torch.zeros(1, dim), emb], dim=0)[None]


def beit_rel_pos_table(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """A BEiT relative position bias table ``[(2·old−1)² + 3, heads]`` for a ``new`` window, by
    BEiT's geometric-progression cubic resampling (see module docstring). The 3 trailing rows
    (cls→token, token→cls, cls→cls) are kept."""
    from scipy.interpolate import RectBivariateSpline

    if old[0] != old[1] or new[0] != new[1]:
        raise ValueError(f"BEiT's relative-position resampling needs square windows, got {old} → {new}")
    src, dst = 2 * old[0] - 1, 2 * new[0] - 1
    extra = table.shape[0] - src * src
    body, tail = table[:-extra], table[-extra:]

    def geometric_progression(a: float, r: float, n: int) -> float:
        return a * (1.0 - r ** n) / (1.0 - r)

    left, right = 1.01, 1.5
    while right - left > 1e-6:  # the ratio q whose progression spans the new window
        q = (left + right) / 2.0
        if geometric_progression(1, q, src // 2) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = np.array([-d for d in reversed(dis)] + [0.0] + dis)
    t = dst // 2.0
    dx = np.arange(-t, t + 0.1, 1.0)
    heads = []
    for i in range(table.shape[1]):
        z = body[:, i].reshape(src, src).float().numpy()
        # interp2d(x, y, z)(dx, dy) on a rectangular grid == RectBivariateSpline(x, y, zᵀ)(dx, dy)ᵀ
        f = RectBivariateSpline(x, x, z.T, kx=3, ky=3, s=0)
        heads.append(torch.tensor(f(dx, dx).T, dtype=torch.float32).contiguous().reshape(-1, 1))
    return torch.cat([torch.cat(heads, dim=-1).to(table.dtype), tail], dim=0)


__all__ = ["RULES", "beit_rel_pos_table", "mocov3_sincos", "pos_embed", "to_size"]
