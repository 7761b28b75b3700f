"""Controls: reference encoders that show where each attention metric's null and ceiling lie.

``rmae analyze … --controls`` (``controls=true``) runs these through the same attention pass as the
runs, and the report shows them beside the runs, so a reader sees what a content-free or local
model scores and what a perfect one scores before reading any difference:

- ``control:content-free`` — the reference run's encoder with its patch embedding zeroed: every
  image gives the same tokens (position only), so attention depends on position alone. An
  instance metric must put it at ≈ 0 (``instance_selectivity`` does; ``instance_mass`` does not).
- ``control:local`` — content-free *and* local: every layer attends a Gaussian window of σ = 1
  patch around the query (the attention a purely local model has). It maxes out locality-driven
  numbers while knowing nothing about instances.
- ``control:random-init`` — the reference architecture, freshly initialised (seeded): what
  training adds.
- ``control:oracle`` — the positive control: each patch query attends exactly (uniformly) the
  patches of its own instance, built from the ground truth it is shown (``observe``); the CLS
  token's heads each put 60 % of their attention on one object (largest first) and the rest
  thinner elsewhere, so DINO's 60 %-mass map is that object. Where an instance metric's ceiling is.

The synthetic controls (``local``, ``oracle``) implement the encoder surface the analyses use
(``forward_features``, ``blocks[i].attn`` with ``fused_attn``/``attn_drop``/``qkv``,
``patch_embed`` geometry, ``num_prefix_tokens``), so they go down the same code path as any ViT.
They have no decoder and no trained features: probes, CKA and interactive segmentation skip them.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from .encoder import describe, grid_size, input_size, model_device, patch_size
from .groundtruth import patch_ownership

CONTROL_PREFIX = "control:"


class _FixedAttention(nn.Module):
    """Attention whose weights come from ``source(batch, device) → [B, h, N, N]``, not from q·k.

    Keeps the attention surface: ``qkv`` (identity on q, k, v — so recorded keys are the input
    tokens), the ``fused_attn`` switch and the ``attn_drop`` hook point the recorder listens at."""

    def __init__(self, dim: int, num_heads: int, source) -> None:
        super().__init__()
        self.num_heads, self.scale, self.fused_attn = num_heads, 1.0, True
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([torch.eye(dim)] * 3))
        self.attn_drop = nn.Identity()
        self._source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        v = self.qkv(x)[..., 2 * C:].reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)
        w = self.attn_drop(self._source(B, x.device))
        return (w @ v).transpose(1, 2).reshape(B, N, C)


class _Block(nn.Module):
    def __init__(self, attn: _FixedAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


class SyntheticControl(nn.Module):
    """A ViT-shaped encoder whose attention is given (see module docstring). Tokens are the
    position (``local``) or the instance identity (``oracle``) one-hot coded: content-free or
    ground truth, never the image."""

    num_prefix_tokens = 1

    def __init__(self, kind: str, reference: nn.Module, heads: int = 8) -> None:
        super().__init__()
        info = describe(reference)
        self.kind = kind
        gh, gw = grid_size(reference)
        self.L = gh * gw
        self.embed_dim = dim = heads * math.ceil((self.L + 1) / heads)
        self.patch_embed = SimpleNamespace(grid_size=(gh, gw), patch_size=patch_size(reference),
                                           img_size=input_size(reference))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim), requires_grad=False)
        self.config = SimpleNamespace(family="control", name=f"{CONTROL_PREFIX}{kind}", has_region_branch=False,
                                      has_pixel_branch=False, embed_dim=dim)
        self.blocks = nn.ModuleList([_Block(_FixedAttention(dim, heads, self._weights)) for _ in range(info.depth)])
        self.norm = nn.Identity()
        self._owner: torch.Tensor | None = None  # [B, L] instance owner per patch (oracle)
        r, c = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
        pos = torch.stack([r, c], -1).reshape(-1, 2)
        self.register_buffer("_window", torch.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / 2.0).float(),
                             persistent=False)  # Gaussian, σ = 1 patch

    # -- ground truth (the oracle only) --------------------------------------------------------

    def observe(self, batch: dict) -> None:
        """Shown the batch before its forward pass: the oracle takes the instance layout."""
        if self.kind == "oracle" and batch.get("instances") is not None:
            owner, _ = patch_ownership(batch["instances"].cpu(), self.patch_embed.patch_size)
            self._owner = owner.reshape(owner.shape[0], -1)

    # -- the surface ---------------------------------------------------------------------------

    def _tokens(self, B: int, device: torch.device) -> torch.Tensor:
        N, D = self.L + 1, self.embed_dim
        if self.kind == "oracle" and self._owner is not None:
            ids = torch.cat([torch.full((B, 1), -1, dtype=torch.long), self._owner[:B]], 1)  # cls apart
            codes = torch.unique(ids, return_inverse=True)[1]  # identity one-hot: same instance, same token
            return torch.nn.functional.one_hot(codes, D).float().to(device)
        return torch.eye(N, D, device=device).expand(B, N, D)  # position one-hot: content-free

    def _weights(self, B: int, device: torch.device) -> torch.Tensor:
        H, L = self.blocks[0].attn.num_heads, self.L
        w = torch.zeros(B, H, L + 1, L + 1)
        w[:, :, 0, 1:] = 1.0 / L  # cls: uniform over patches, unless the oracle knows objects
        if self.kind == "local":
            w[:, :, 1:, 1:] = (self._window / self._window.sum(-1, keepdim=True)).cpu()
        else:
            if self._owner is None:
                raise RuntimeError("the oracle control needs ground-truth instances (data with instance masks)")
            own = self._owner[:B]
            same = (own[:, :, None] == own[:, None, :]).float()  # [B, L, L], background attends background
            w[:, :, 1:, 1:] = (same / same.sum(-1, keepdim=True))[:, None]
            for b in range(B):
                ids, counts = torch.unique(own[b][own[b] > 0], return_counts=True)
                order = ids[counts.argsort(descending=True)]
                for h in range(H):
                    target = (own[b] == order[h]) if h < len(order) else (own[b] > 0)
                    if target.any() and not target.all():
                        # 60 % on the object, 40 % spread thinner over the rest: DINO's 60 %-mass
                        # threshold then keeps exactly the object (all-on-object would keep 60 % of it)
                        w[b, h, 0, 1:] = 0.6 * target.float() / target.sum() + 0.4 * (~target).float() / (~target).sum()
        return w.to(device)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self._tokens(images.shape[0], images.device)
        for blk in self.blocks:
            x = blk(x)
        return x


def content_free(reference: nn.Module) -> nn.Module:
    """The reference encoder with its patch embedding zeroed: position-only tokens."""
    model = copy.deepcopy(reference).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
    return model


def random_init(reference: nn.Module, seed: int = 0) -> nn.Module:
    """The reference architecture, re-initialised with its own recipe (seeded)."""
    model = copy.deepcopy(reference)
    init = getattr(model, "initialize_weights", None) or getattr(model, "init_weights", None)
    if init is None:
        raise ValueError(f"{type(model).__name__} has no weight initialiser (initialize_weights / init_weights)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init()
    return model.eval()


def build_controls(reference: nn.Module, seed: int = 0) -> dict[str, nn.Module]:
    """The four controls for ``reference`` (see module docstring), on its device, eval mode."""
    device = model_device(reference)
    controls = {
        f"{CONTROL_PREFIX}content-free": content_free(reference),
        f"{CONTROL_PREFIX}local": SyntheticControl("local", reference),
        f"{CONTROL_PREFIX}random-init": random_init(reference, seed),
        f"{CONTROL_PREFIX}oracle": SyntheticControl("oracle", reference),
    }
    return {n: m.to(device).eval() for n, m in controls.items()}
