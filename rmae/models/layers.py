"""Transformer building blocks shared by the pixel and region branches.

Parameter names follow timm's ``VisionTransformer`` (and MAE's ``models_mae.py``, which uses
timm's blocks), so an encoder's state dict is a timm state dict with no renaming:
``patch_embed.proj``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``.

Attention has two code paths with identical outputs (timm's ``fused_attn`` idea):
- fused: ``F.scaled_dot_product_attention`` — used for training, never materialises [N, N];
- explicit: ``softmax(q·kᵀ·scale)·v`` — used only when the weights are wanted, inside
  :func:`explicit_attention`, which collects every layer's ``[B, heads, N, N]`` weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-6  # MAE / timm ViT LayerNorm epsilon


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens. ``x [B, C, H, W] → [B, L, D]``, L = (H/p)·(W/p)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)

    def init_as_linear(self) -> None:
        # MAE initialises the patch projection like a Linear layer (xavier on [D, C·p·p]).
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention. ``x [B, N, C] → [B, N, C]``.

    ``fused_attn`` picks scaled_dot_product_attention; otherwise the explicit path computes the
    weights ``[B, heads, N, N]`` (rows sum to 1; row = query, column = key) and passes them
    through ``attn_drop`` — timm's names, so :func:`explicit_attention` records the weights of
    our attention and of timm's the same way (a hook on ``attn_drop``).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Identity()  # hook point of the explicit path's weights (no dropout here)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, heads, N, N]
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Queries attend to a memory. ``q [B, Nq, C], memory [B, Nm, Cm] → [B, Nq, C]``.

    Names (``q``, ``kv``, ``proj``) follow the official R-MAE ``CrossAttention``.
    """

    def __init__(self, dim: int, memory_dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(memory_dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = memory.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(memory).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """``fc1 → GELU → fc2`` (timm names)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (used when fine-tuning; pre-training keeps rate 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Block(nn.Module):
    """Pre-norm ViT block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. ``[B, N, C] → [B, N, C]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class QueryDecoderBlock(nn.Module):
    """DETR-style block for region queries (official ``DecoderBlock``).

    ``queries [B, k, C]``, ``memory [B, 1+L, Cm]`` → ``[B, k, C]``: self-attention among the k
    queries, cross-attention to the memory, MLP — each pre-norm and residual.
    """

    def __init__(self, dim: int, memory_dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = layer_norm(dim)
        self.cross_attn = CrossAttention(dim, memory_dim, num_heads)
        self.norm3 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), memory)
        return x + self.mlp(self.norm3(x))


class ExpansionDecoderBlock(nn.Module):
    """Final region-decoder block with spatial expansion (official ``DecoderBlockWithExpansion``).

    ``queries [B, k, C]``, ``memory [B, 1+L, Cm]`` → ``[B, k, 1+L, C]``:
    self-attention among the queries (residual), then for every query q and memory token n
    ``out[q, n] = query_q + W·memory_n``, then ``mlp(norm3(out))`` (hidden = C, no residual).
    """

    def __init__(self, dim: int, memory_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.proj = nn.Linear(memory_dim, dim)
        self.norm3 = layer_norm(dim)
        self.mlp = Mlp(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        expanded = x.unsqueeze(2) + self.proj(memory).unsqueeze(1)  # [B, k, 1+L, C]
        return self.mlp(self.norm3(expanded))


def _records_weights(m: nn.Module) -> bool:
    # Our Attention and timm's (Attention, Beit's, …): a fused/explicit switch and the explicit
    # path's weights passing through ``attn_drop``.
    return hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module) and hasattr(m, "qkv")


@contextmanager
def explicit_attention(module: nn.Module | Iterable[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Record the attention weights of every self-attention layer inside ``module``.

    Within the block, each such layer (ours, or timm's ``Attention`` — anything with a
    ``fused_attn`` switch whose explicit path passes its weights through ``attn_drop``) runs its
    explicit path and appends ``[B, heads, N, N]`` to the yielded list, in call order (for an
    encoder: layer 0 first). ``module`` may be a list of modules (e.g. chosen blocks). Outputs
    equal the fused path's to float rounding. Weights keep their autograd graph, so gradient
    methods can use them; wrap in ``torch.no_grad()`` when not needed.

        with explicit_attention(model.blocks) as attn:
            model.forward_features(images)
        attn[-1]  # last encoder layer, [B, heads, 1+L, 1+L]
    """
    modules = [module] if isinstance(module, nn.Module) else list(module)
    layers = [m for mod in modules for m in mod.modules() if _records_weights(m)]
    store: list[torch.Tensor] = []
    previous = [m.fused_attn for m in layers]
    handles = [m.attn_drop.register_forward_hook(lambda _m, _i, out: store.append(out)) for m in layers]
    for m in layers:
        m.fused_attn = False
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
        for m, prev in zip(layers, previous):
            m.fused_attn = prev


def set_fused_attention(module: nn.Module, enabled: bool) -> None:
    """Switch every attention layer in ``module`` between fused and explicit kernels.

    Explicit kernels are what FLOP counters see (``FlopCounterMode`` does not count the CPU
    fused kernel), so benchmarks count FLOPs with fused attention off.
    """
    for m in module.modules():
        if isinstance(m, (Attention, CrossAttention)):
            m.fused_attn = enabled


# --------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embeddings, exactly as MAE's util/pos_embed.py computes them
# (float64 numpy, then float32), so loaded official models see bit-identical embeddings.


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """``[1, (1 if cls_token) + gh·gw, embed_dim]``; the cls position is all zeros."""
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    gh, gw = grid_size
    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # w first, as MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)
