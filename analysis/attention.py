"""Attention maps of whole images: every layer and head, for our models and for timm ViTs.

Conventions: ``attn [B, heads, N, N]`` with N = 1 + L tokens (index 0 = cls), rows are
queries and sum to 1. Patch ``i`` (0-based, without cls) sits at grid cell
``(i // gw, i % gw)``; token index = 1 + i. Maps returned for display are ``[B, heads, gh, gw]``.

- Our models compute the weights explicitly inside ``rmae.explicit_attention`` (fused
  attention never materialises them).
- timm's ``Attention`` picks its fused kernel at construction, so hooks on ``attn_drop`` see
  nothing; here a forward hook on each ``attn`` module recomputes ``softmax(q·kᵀ·scale)`` from
  its input with the module's own ``qkv``, ``q_norm``, ``k_norm`` and ``scale``.

Memory: one batch's maps are ``depth × B × heads × N²`` floats (ViT-B/16 224², B = 8:
12·8·12·197² ≈ 45 M floats). Streaming analyses reduce each batch before the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import rmae
from rmae.models import MaskedAutoencoderViT, explicit_attention


def grid_size(model: nn.Module) -> tuple[int, int]:
    grid = model.patch_embed.grid_size
    return int(grid[0]), int(grid[1])


def patch_size(model: nn.Module) -> int:
    p = model.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


class AttentionExtractor:
    """``extractor(images) → list of [B, heads, N, N]`` (one per encoder layer), whole images.

    Works for :class:`rmae.MaskedAutoencoderViT` and for timm ``VisionTransformer`` models
    (``blocks[i].attn`` with ``qkv``). ``layers`` restricts which layers are returned.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int] | None = None):
        self.model = model
        depth = len(model.blocks)
        self.layers = sorted({(i + depth) % depth for i in layers}) if layers is not None else list(range(depth))
        self.is_ours = isinstance(model, MaskedAutoencoderViT)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.with_features(images)[1]

    @torch.no_grad()
    def with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final-norm tokens [B, N, D], attention per selected layer)."""
        if self.is_ours:
            with explicit_attention(self.model.blocks) as attn:
                feats = self.model.forward_features(images)
            return feats, [attn[i] for i in self.layers]
        return self._timm(images)

    def _timm(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps: dict[int, torch.Tensor] = {}
        handles = []
        for i in self.layers:
            attn_mod = self.model.blocks[i].attn

            def hook(mod, inputs, _output, i=i):
                maps[i] = timm_attention_weights(mod, inputs[0])

            handles.append(attn_mod.register_forward_hook(hook))
        try:
            feats = self.model.forward_features(images)
        finally:
            for h in handles:
                h.remove()
        return feats, [maps[i] for i in self.layers]


def timm_attention_weights(attn_mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Recompute a timm ``Attention``'s weights from its input ``x [B, N, C]`` → ``[B, h, N, N]``."""
    B, N, _ = x.shape
    h = attn_mod.num_heads
    qkv = attn_mod.qkv(x).reshape(B, N, 3, h, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q = getattr(attn_mod, "q_norm", nn.Identity())(q)
    k = getattr(attn_mod, "k_norm", nn.Identity())(k)
    return ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def load_for_analysis(path_or_model: Any) -> nn.Module:
    """A run folder / checkpoint path (→ ``rmae.load_model``) or a model, in eval mode."""
    model = rmae.load_model(path_or_model) if not isinstance(path_or_model, nn.Module) else path_or_model
    return model.eval()


# ------------------------------------------------------------------------------------------
# maps


def _to_grid(rows: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """[..., P+L] attention rows → [..., gh, gw] over patch keys (prefix keys dropped)."""
    return rows[..., num_prefix:].reshape(*rows.shape[:-1], *grid)


def cls_maps(attn: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """CLS → patch attention of one layer. attn [B, h, N, N] → [B, h, gh, gw] (not renormalised)."""
    return _to_grid(attn[:, :, 0], grid, num_prefix)


def patch_query_maps(attn: torch.Tensor, query: int | torch.Tensor, grid: tuple[int, int],
                     num_prefix: int = 1) -> torch.Tensor:
    """Attention from one query **patch** (paper Fig. 6). ``query`` is a patch index (0-based,
    without cls), an int or a ``[B]`` tensor (one query per image). → ``[B, h, gh, gw]``."""
    B = attn.shape[0]
    q = torch.as_tensor(query, device=attn.device).long().expand(B) + num_prefix  # token index
    rows = attn[torch.arange(B, device=attn.device), :, q]  # [B, h, N]
    return _to_grid(rows, grid, num_prefix)


def aggregate_heads(maps: torch.Tensor, how: str | int = "mean") -> torch.Tensor:
    """[B, h, ...] → [B, ...]: ``"mean"``, ``"max"``, or a head index (an int)."""
    if isinstance(how, int) or (isinstance(how, str) and how.isdigit()):
        return maps[:, int(how)]
    if how == "mean":
        return maps.mean(dim=1)
    if how == "max":
        return maps.max(dim=1).values
    raise ValueError(f"head aggregation must be 'mean', 'max' or a head index, got {how!r}")


def rollout(attn_layers: list[torch.Tensor], head_fusion: str = "mean", residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020). → ``[B, N, N]``, rows sum to 1.

    Per layer: fuse heads, add the residual path ``Â = (1 − r)·A + r·I``, and **normalise each
    row** (``Â / Â.sum(-1, keepdim=True)``) so Â stays a stochastic matrix. The popular
    vit-explain code divides by ``Â.sum(dim=-1)`` without keepdim, which broadcasts the row sums
    along the wrong axis (column j is divided by row j's sum). Then ``R = Â_L ··· Â_1``.
    """
    result = None
    for attn in attn_layers:
        fused = aggregate_heads(attn, head_fusion).double()  # [B, N, N]
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        a = (1 - residual) * fused + residual * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result.float()


def rollout_maps(attn_layers: list[torch.Tensor], grid: tuple[int, int], query: int | None = None,
                 head_fusion: str = "mean") -> torch.Tensor:
    """Rollout from the cls token (``query=None``) or a query patch → ``[B, gh, gw]``."""
    r = rollout(attn_layers, head_fusion)
    row = r[:, 0] if query is None else r[:, 1 + int(query)]
    return _to_grid(row, grid)


def query_index(y: float, x: float, patch: int, grid: tuple[int, int]) -> int:
    """The patch index under pixel (y, x) of the model's input."""
    gy = min(max(int(y // patch), 0), grid[0] - 1)
    gx = min(max(int(x // patch), 0), grid[1] - 1)
    return gy * grid[1] + gx


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """[..., gh, gw] → [..., H, W] for overlays (nearest keeps patch boundaries visible)."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    x = F.interpolate(x, size=size, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return x.reshape(*lead, *size)


def normalise_for_display(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min–max to [0, 1] over the last two axes."""
    lo = maps.flatten(-2).min(-1).values[..., None, None]
    hi = maps.flatten(-2).max(-1).values[..., None, None]
    return (maps - lo) / (hi - lo).clamp(min=1e-12)


def stream(model: nn.Module, batches: Iterable[dict], reduce: Callable[[dict, torch.Tensor, list[torch.Tensor]], Any],
           layers: Iterable[int] | None = None, device: str | torch.device = "cpu") -> Iterator[Any]:
    """For each batch, extract attention and hand it to ``reduce(batch, feats, attn)``; yields
    what ``reduce`` returns. Only one batch's maps are alive at a time (bounded memory)."""
    extractor = AttentionExtractor(model, layers)
    for batch in batches:
        images = batch["images"].to(device)
        feats, attn = extractor.with_features(images)
        yield reduce(batch, feats, attn)
        del feats, attn
