"""Checkpoint layouts of the foreign projects, written from their sources (key names, nesting,
shapes) with random values, and their position-resampling calls, transcribed — shared by
``test_foreign.py`` and ``test_foreign_surface.py``. Nothing here imports ``rmae.foreign``: these
are the references it is tested against.
"""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import torch
import torch.nn.functional as F

D, DEPTH, HEADS = 48, 2, 3

# ------------------------------------------------------------------------------------------
# layouts, as each project saves them


def values(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for a key → shape layout; LayerNorm weights near 1, index buffers integer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("relative_position_index"):
            out[k] = torch.zeros(shape, dtype=torch.long)  # a buffer the loaders rebuild
        elif "." in k and k.split(".")[-2].rstrip("12").endswith("norm"):
            out[k] = (1 + 0.1 * torch.randn(shape, generator=g)) if k.endswith("weight") else 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.2 * torch.randn(shape, generator=g)
    return out


def block(style: str, window: int = 0) -> dict[str, tuple]:
    """One transformer block: timm / DINO / DeiT / MoCo / iBOT names; DINOv2 adds ``ls1/ls2``;
    BEiT has ``q_bias``/``v_bias``, ``gamma_1/gamma_2`` and maybe its own relative table."""
    b = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.proj.weight": (D, D),
         "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,), "mlp.fc1.weight": (4 * D, D),
         "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,)}
    if style == "beit":
        b.update({"attn.q_bias": (D,), "attn.v_bias": (D,), "gamma_1": (D,), "gamma_2": (D,)})
        if window:
            b.update(rel_table("attn.", window))
    else:
        b["attn.qkv.bias"] = (3 * D,)
    if style == "dinov2":
        b.update({"ls1.gamma": (D,), "ls2.gamma": (D,)})
    return b


def rel_table(prefix: str, window: int) -> dict[str, tuple]:
    return {f"{prefix}relative_position_bias_table": ((2 * window - 1) ** 2 + 3, HEADS),
            f"{prefix}relative_position_index": (window * window + 1, window * window + 1)}


def encoder(patch: int, grid: int, *, prefix: int = 1, style: str = "timm", pos: bool = True, final: str = "norm",
             classes: int = 0, extra: dict[str, tuple] | None = None, window: int = 0) -> dict[str, tuple]:
    shapes = {"cls_token": (1, 1, D), "patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,)}
    if pos:
        shapes["pos_embed"] = (1, prefix + grid * grid, D)
    for i in range(DEPTH):
        shapes.update({f"blocks.{i}.{k}": s for k, s in block(style, window).items()})
    shapes.update({f"{final}.weight": (D,), f"{final}.bias": (D,)})
    if classes:
        shapes.update({"head.weight": (classes, D), "head.bias": (classes,)})
    shapes.update(extra or {})
    return shapes


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def dino_head(seed: int) -> dict[str, torch.Tensor]:
    """DINOHead: MLP 48 → 32 → 32 → 16, weight-normed last layer to 64 prototypes."""
    return values({"mlp.0.weight": (32, D), "mlp.0.bias": (32,), "mlp.2.weight": (32, 32), "mlp.2.bias": (32,),
                    "mlp.4.weight": (16, 32), "mlp.4.bias": (16,), "last_layer.weight_g": (64, 1),
                    "last_layer.weight_v": (64, 16)}, seed)


def mocov3_sincos(h: int, w: int, dim: int) -> torch.Tensor:
    """MoCo v3 ``build_2d_sincos_position_embedding`` (vits.py), transcribed."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), emb], dim=1)


# ------------------------------------------------------------------------------------------
# the original projects' position resampling, transcribed


def interp_scale(pos: torch.Tensor, g: int, offset: float, antialias: bool = False) -> torch.Tensor:
    """DINO / iBOT / DINOv2 ``interpolate_pos_encoding`` (cls first, square trained grid)."""
    M = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(grid, scale_factor=((g + offset) / M, (g + offset) / M), mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(g, g), mode="bicubic", antialias=antialias)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], dim=1)


def interp_size(pos: torch.Tensor, g: int, extra: int = 1) -> torch.Tensor:
    """DeiT's / MAE's / BEiT's fine-tuning loaders and Hugging Face: bicubic to ``size=``."""
    M = math.isqrt(pos.shape[1] - extra)
    grid = pos[:, extra:].reshape(-1, M, M, pos.shape[-1]).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :extra], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def beit_table(table: torch.Tensor, w0: int, w1: int) -> torch.Tensor:
    """BEiT ``run_class_finetuning.py``: geometric offsets, cubic interpolation (here SciPy's
    ``RegularGridInterpolator``: the same interpolating spline as the removed ``interp2d``)."""
    from scipy.interpolate import RegularGridInterpolator

    src, dst = 2 * w0 - 1, 2 * w1 - 1
    body, tail = table[:-3], table[-3:]
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    x = np.array([-d for d in reversed(dis)] + [0.0] + dis)
    t = dst // 2.0
    dx = np.clip(np.arange(-t, t + 0.1, 1.0), x[0], x[-1])  # FITPACK's evaluation clamps to the fitted range
    yy, xx = np.meshgrid(dx, dx, indexing="ij")
    cols = []
    for h in range(table.shape[1]):
        f = RegularGridInterpolator((x, x), body[:, h].reshape(src, src).double().numpy(), method="cubic")
        cols.append(torch.tensor(f(np.stack([yy, xx], -1).reshape(-1, 2)), dtype=torch.float32)[:, None])
    return torch.cat([torch.cat(cols, 1), tail], 0)


# ------------------------------------------------------------------------------------------
# the command

#: Runs rmae commands (``rmae.cli.main``, the console script's entry point) for each argument list
#: in one fresh interpreter — the process boundary of the command without paying its start-up
#: (torch + timm imports) sixteen times; prints one JSON line of (exit status, stdout, stderr).
_DRIVER = """
import contextlib, io, json, sys
from rmae.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def run_commands(argvs: list[list[str]], python: str, env: dict[str, str]) -> list[tuple[int, str, str]]:
    """``rmae.cli.main(argv)`` for each argv in one fresh interpreter → [(exit status, stdout, stderr)]."""
    r = subprocess.run([python, "-c", _DRIVER, json.dumps(argvs)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return [tuple(x) for x in json.loads(r.stdout.strip().splitlines()[-1])]
