"""MAE, RAE and R-MAE in one readable module.

One class, :class:`MaskedAutoencoderViT`, with two optional branches on a shared ViT encoder:

- **pixel branch** (MAE, He et al. 2022): decoder on the visible tokens + mask tokens,
  MSE on (per-patch normalised) pixels of the removed patches;
- **region branch** (RAE, Nguyen et al. 2023, "R-MAE: Regions Meet Masked Autoencoders"):
  k binary region maps are encoded under *the same mask* as the image, a neck turns the
  pixel-encoder output into a memory, and a region decoder predicts every region's pixels;
  BCE on the removed patches. Three variants (paper §3.2): ``length`` (default), ``batch``,
  ``channel`` — see the ``_region_*`` methods for each one's tensor contract.

Families: ``mae`` = pixel branch, ``rae`` = region branch, ``rmae`` = both,
``loss = loss_pixel + region_loss_weight · loss_region``.

Parameter names equal the official MAE (``models_mae.py``) and R-MAE (``RegionQueryRMAE``)
names, so their state dicts load with no renaming, and the encoder's names equal timm's.

Shapes: B batch, L = (H/p)·(W/p) patches, l = visible patches, k regions, D encoder width,
p_E / p_D region encoder / decoder widths. Mask convention (MAE): ``mask [B, L]``, 0 is keep,
1 is remove.

Length (~440 lines): kept as one module on purpose, like the official ``models_mae.py``: the
encoder, both decoders and the three region variants share the masking and tensor contracts, and
reading them side by side is what makes the official-equivalence checkable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .surface import TimmEncoderSurface
from .layers import (
    Block,
    ExpansionDecoderBlock,
    PatchEmbed,
    QueryDecoderBlock,
    explicit_attention,
    layer_norm,
    sincos_pos_embed,
)


@dataclass
class MaskedAEOutput:
    """What a forward pass returns. Fields a family lacks are None.

    loss          scalar, ``loss_pixel + λ·loss_region`` (only the terms that exist)
    loss_pixel    scalar MSE over removed patches (None for RAE)
    loss_region   scalar BCE over removed patches (None for MAE)
    pred_pixel    [B, L, p·p·C] predicted patches (normalised space when norm_pix_loss)
    pred_region   [B, k, L, p·p] region logits
    mask          [B, L] float, 0 is keep, 1 is remove (the pixel branch's mask)
    region_mask   [B, L] the region branch's mask: the same permutation, so it equals ``mask``
                  unless a separate region mask ratio / visible count was asked for (None for MAE)
    """

    loss: torch.Tensor
    loss_pixel: torch.Tensor | None
    loss_region: torch.Tensor | None
    pred_pixel: torch.Tensor | None
    pred_region: torch.Tensor | None
    mask: torch.Tensor
    region_mask: torch.Tensor | None = None


def _fixed(t: torch.Tensor) -> nn.Parameter:
    # Fixed sin-cos tables are (frozen) Parameters, as in MAE and timm, so they live in the
    # state dict under the official names.
    return nn.Parameter(t, requires_grad=False)


def _unshuffle(tokens: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Visible tokens (no cls) + mask tokens, back in image order.

    tokens [B', l, C], mask_token [1, 1, C], ids_restore [B', L] → [B', L, C]
    """
    B, l, C = tokens.shape
    L = ids_restore.shape[1]
    full = torch.cat([tokens, mask_token.expand(B, L - l, -1)], dim=1)
    return torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, C))


class MaskedAutoencoderViT(TimmEncoderSurface, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        grid = c.grid_size
        self.patch_size = c.patch_size

        # ---- pixel encoder (timm VisionTransformer names) -----------------------------------
        self.patch_embed = PatchEmbed(c.image_hw, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = _fixed(sincos_pos_embed(c.embed_dim, grid))
        dpr = torch.linspace(0, c.drop_path_rate, c.depth).tolist()
        self.blocks = nn.ModuleList([Block(c.embed_dim, c.num_heads, c.mlp_ratio, dpr[i]) for i in range(c.depth)])
        self.norm = layer_norm(c.embed_dim)

        # ---- pixel decoder (MAE) ------------------------------------------------------------
        if c.has_pixel_branch:
            self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_dim))
            self.decoder_pos_embed = _fixed(sincos_pos_embed(c.decoder_dim, grid))
            self.decoder_blocks = nn.ModuleList(
                [Block(c.decoder_dim, c.decoder_heads, c.mlp_ratio) for _ in range(c.decoder_depth)]
            )
            self.decoder_norm = layer_norm(c.decoder_dim)
            self.decoder_pred = nn.Linear(c.decoder_dim, c.patch_size**2 * c.in_chans)

        # ---- region branch (RAE) ------------------------------------------------------------
        if c.has_region_branch:
            pE, pD, h = c.region_enc_dim, c.region_dec_dim, c.region_heads
            # neck: pixel-encoder output → memory [B, 1+L, p_D] (pixels → regions only)
            self.region_cross_embed = nn.Linear(c.embed_dim, pD)
            self.region_cross_mask_token = nn.Parameter(torch.zeros(1, 1, pD))
            self.region_cross_pos_embed = _fixed(sincos_pos_embed(pD, grid))
            self.region_cross_blocks = nn.ModuleList([Block(pD, h, c.mlp_ratio) for _ in range(c.region_neck_depth)])
            self.region_dec_norm = layer_norm(pD)
            # region encoder: maps → tokens, shared weights across regions (length, batch)
            region_in = c.num_regions if c.region_variant == "channel" else 1
            self.region_patch_embed = PatchEmbed(c.image_hw, c.patch_size, region_in, pE)
            self.region_pos_embed = _fixed(sincos_pos_embed(pE, grid))
            self.region_enc_blocks = nn.ModuleList([Block(pE, h, c.mlp_ratio) for _ in range(c.region_enc_depth)])
            self.region_proj = nn.Sequential(layer_norm(pE), nn.Linear(pE, pD))
            pp = c.patch_size**2
            if c.region_variant == "length":
                self.region_dec_blocks = nn.ModuleList(
                    [QueryDecoderBlock(pD, pD, h, c.mlp_ratio) for _ in range(c.region_dec_depth - 1)]
                    + [ExpansionDecoderBlock(pD, pD, h)]
                )
                self.region_pred = nn.Sequential(nn.GELU(), nn.Linear(pD, pp))
            else:  # batch / channel: an MAE-style decoder over all L positions
                self.region_dec_mask_token = nn.Parameter(torch.zeros(1, 1, pD))
                self.region_dec_pos_embed = _fixed(sincos_pos_embed(pD, grid))
                self.region_dec_blocks = nn.ModuleList([Block(pD, h, c.mlp_ratio) for _ in range(c.region_dec_depth)])
                out = pp * (c.num_regions if c.region_variant == "channel" else 1)
                self.region_pred = nn.Sequential(layer_norm(pD), nn.Linear(pD, out))

        self.initialize_weights()

    # ---------------------------------------------------------------------------------------
    # initialisation (MAE / official R-MAE recipe)

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, PatchEmbed):
                m.init_as_linear()
        for name, p in self.named_parameters():
            if name.endswith(("cls_token", "mask_token")):
                nn.init.normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that get no weight decay besides norms and biases (timm convention)."""
        return {n for n, _ in self.named_parameters() if n.endswith(("token", "pos_embed"))}

    # ---------------------------------------------------------------------------------------
    # patches and masks

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] → [B, L, p·p·C]`` (row-major patches, pixel order (py, px, c) as MAE)."""
        B, C, H, W = imgs.shape
        p = self.patch_size
        h, w = H // p, W // p
        x = imgs.reshape(B, C, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """``[B, L, p·p·C] → [B, C, H, W]`` (inverse of :meth:`patchify`)."""
        B, L, _ = x.shape
        p = self.patch_size
        C = channels or self.config.in_chans
        h, w = self.patch_embed.grid_size
        x = x.reshape(B, h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, h * p, w * p)

    def _permutation(self, batch: int, device: torch.device, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image random order by argsort of noise (MAE): noise [B, L] (uniform if None) →
        ids_shuffle, ids_restore [B, L]. Ascending: the smallest-noise patches are kept first."""
        L = self.num_patches
        if noise is None:
            noise = torch.rand(batch, L, device=device)
        elif noise.shape != (batch, L):
            raise ValueError(f"noise must have shape [B, L] = [{batch}, {L}], got {list(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(device), dim=1)
        return ids_shuffle, torch.argsort(ids_shuffle, dim=1)

    def _len_keep(self, mask_ratio: float, num_visible: int | None) -> int:
        L = self.num_patches
        len_keep = int(L * (1 - mask_ratio)) if num_visible is None else int(num_visible)
        if not 1 <= len_keep <= L:
            raise ValueError(f"{len_keep} visible patches out of {L}: need at least one and at most all")
        return len_keep

    @staticmethod
    def _keep(ids_shuffle: torch.Tensor, ids_restore: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``len_keep`` of the order are visible → ids_keep [B, l], mask [B, L] (0 is keep, 1 is remove)."""
        B, L = ids_shuffle.shape
        mask = torch.ones(B, L, device=ids_shuffle.device)
        mask[:, :len_keep] = 0
        return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore)

    # ---------------------------------------------------------------------------------------
    # pixel encoder

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if images.ndim != 4 or images.shape[1] != c.in_chans or tuple(images.shape[2:]) != c.image_hw:
            raise ValueError(
                f"images must be [B, {c.in_chans}, {c.image_hw[0]}, {c.image_hw[1]}] for this model "
                f"(img_size={c.img_size}), got {list(images.shape)}; resize the input or build the "
                f"model with img_size matching it"
            )

    def _embed(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, C, H, W] → cls + (visible) patch tokens with positions [B, 1+l, D]."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:, :]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, C, H, W], ids_keep [B, l] (None = all) → final-norm tokens [B, 1+l, D]."""
        x = self._embed(images, ids_keep)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_features(self, images: torch.Tensor, return_attention: bool = False):
        """Encoder on the whole, unmasked image: ``[B, 1+L, D]`` final-norm tokens.

        Equals timm's ``forward_features`` for the weights :func:`rmae.export_timm` writes.
        With ``return_attention=True`` also returns a list (one per layer) of attention weights
        ``[B, heads, 1+L, 1+L]`` computed explicitly (same features to float rounding).
        """
        self._check_images(images)
        if not return_attention:
            return self.forward_encoder(images)
        with explicit_attention(self.blocks) as attn:
            feats = self.forward_encoder(images)
        return feats, list(attn)

    # ---------------------------------------------------------------------------------------
    # pixel decoder

    def forward_pixel_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+l, D], ids_restore [B, L] → predicted patches [B, L, p·p·C]."""
        x = self.decoder_embed(latent)
        x = torch.cat([x[:, :1], _unshuffle(x[:, 1:], self.mask_token, ids_restore)], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def pixel_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch (on per-patch normalised targets if norm_pix_loss), mean over removed patches."""
        target = self.patchify(images.float())
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)  # 0, not NaN, when nothing is masked

    # ---------------------------------------------------------------------------------------
    # region branch

    def forward_neck(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Pixel-encoder output → region memory. latent [B, 1+l, D] → [B, 1+L, p_D]."""
        x = self.region_cross_embed(latent)
        x = torch.cat([x[:, :1], _unshuffle(x[:, 1:], self.region_cross_mask_token, ids_restore)], dim=1)
        x = x + self.region_cross_pos_embed
        for blk in self.region_cross_blocks:
            x = blk(x)
        return self.region_dec_norm(x)

    def _region_tokens(self, maps: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Visible region tokens. maps [B', c, H, W] ∈ {0,1}, ids_keep [B', l] → [B', l, p_E]."""
        index = ids_keep.unsqueeze(-1)
        if maps.shape[1] == 1:
            # A conv with kernel = stride = p is a linear map of each patch: embed only the l
            # visible patches of each map (the official code embeds all L, then gathers) — the
            # same numbers for a quarter of the work, which matters with k maps per image.
            patches = self.patchify(maps)  # [B', L, p·p], pixel order (py, px) = the conv weight's
            patches = torch.gather(patches, 1, index.expand(-1, -1, patches.shape[-1]))
            proj = self.region_patch_embed.proj
            x = F.linear(patches - 0.5, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)
            pos = self.region_pos_embed[:, 1:, :].expand(maps.shape[0], -1, -1)
            x = x + torch.gather(pos, 1, index.expand(-1, -1, x.shape[-1]))
        else:  # channel variant: k maps as channels of one image
            x = self.region_patch_embed(maps - 0.5) + self.region_pos_embed[:, 1:, :]
            x = torch.gather(x, 1, index.expand(-1, -1, x.shape[-1]))
        for blk in self.region_enc_blocks:
            x = blk(x)
        return x

    def _region_length(self, regions: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                       memory: torch.Tensor) -> torch.Tensor:
        """Length variant (paper default): each region is one query.

        regions [B, k, H, W] → tokens of each map's visible patches (shared mask, shared
        weights) → mean-pool → queries [B, k, p_D] → query blocks → spatial expansion against
        the memory [B, 1+L, p_D] → logits [B, k, L, p·p]. Cost is flat in k up to the
        expansion (k × (1+L) tokens through a p_D → p_D MLP).
        """
        B, k = regions.shape[:2]
        tokens = self._region_tokens(regions.reshape(B * k, 1, *regions.shape[2:]),
                                     ids_keep.repeat_interleave(k, dim=0))  # [B·k, l, p_E]
        queries = self.region_proj(tokens.mean(dim=1).reshape(B, k, -1))  # [B, k, p_D]
        for blk in self.region_dec_blocks:
            queries = blk(queries, memory)  # last block expands to [B, k, 1+L, p_D]
        return self.region_pred(queries)[:, :, 1:]

    def _decode_region_tokens(self, tokens: torch.Tensor, ids_restore: torch.Tensor,
                              memory: torch.Tensor) -> torch.Tensor:
        """MAE-style region decoder (batch and channel variants).

        tokens [B', l, p_E] visible region tokens, ids_restore [B', L], memory [B', L, p_D]
        (neck output without cls) → per-position decoder output [B', L, out].
        Pixel information enters by adding the memory at every position.
        """
        x = _unshuffle(self.region_proj(tokens), self.region_dec_mask_token, ids_restore)
        x = x + self.region_dec_pos_embed[:, 1:, :] + memory
        for blk in self.region_dec_blocks:
            x = blk(x)
        return self.region_pred(x)

    def _region_batch(self, regions: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                      memory: torch.Tensor) -> torch.Tensor:
        """Batch variant (R-CNN-like): every region map is its own encoder–decoder pass.

        regions [B, k, H, W] → B·k sequences of visible tokens [B·k, l, p_E] → decoder over all
        L positions of each region (+ the memory [B, 1+L, p_D] repeated per region) →
        logits [B, k, L, p·p]. Cost grows linearly with k.
        """
        B, k = regions.shape[:2]
        ids_keep_k = ids_keep.repeat_interleave(k, dim=0)
        tokens = self._region_tokens(regions.reshape(B * k, 1, *regions.shape[2:]), ids_keep_k)
        out = self._decode_region_tokens(tokens, ids_restore.repeat_interleave(k, dim=0),
                                         memory[:, 1:].repeat_interleave(k, dim=0))
        return out.reshape(B, k, self.num_patches, -1)

    def _region_channel(self, regions: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                        memory: torch.Tensor) -> torch.Tensor:
        """Channel variant: the k maps are the channels of one "image".

        regions [B, k, H, W] → one token sequence [B, l, p_E] → decoder over L positions
        (+ memory) → [B, L, k·p·p] → logits [B, k, L, p·p]. Cheapest, but k is fixed by the
        weights and the output is not permutation-equivariant in the regions.
        """
        B, k = regions.shape[:2]
        if k != self.config.num_regions:
            raise ValueError(
                f"the channel variant was built for num_regions={self.config.num_regions} maps, got {k}; "
                f"sample {self.config.num_regions} regions or rebuild with num_regions={k}"
            )
        tokens = self._region_tokens(regions, ids_keep)
        out = self._decode_region_tokens(tokens, ids_restore, memory[:, 1:])  # [B, L, k·p·p]
        return out.reshape(B, self.num_patches, k, -1).transpose(1, 2)

    def forward_region_decoder(self, regions: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                               memory: torch.Tensor) -> torch.Tensor:
        """regions [B, k, H, W] float {0,1} → region logits [B, k, L, p·p]."""
        variant = {"length": self._region_length, "batch": self._region_batch, "channel": self._region_channel}
        return variant[self.config.region_variant](regions, ids_keep, ids_restore, memory)

    def region_loss(self, regions: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BCE-with-logits per pixel (background weighted by w_b), mean over the patch's pixels,
        mean over the k regions, mean over removed patches. regions [B, k, H, W], pred [B, k, L, p·p]."""
        B, k = regions.shape[:2]
        target = self.patchify(regions.reshape(B * k, 1, *regions.shape[2:]).float()).reshape(B, k, -1, self.patch_size**2)
        loss = F.binary_cross_entropy_with_logits(pred.float(), target, reduction="none")
        if self.config.bg_loss_weight != 1.0:
            loss = loss * torch.where(target == 0, self.config.bg_loss_weight, target)
        per_patch = loss.mean(dim=-1).mean(dim=1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)

    # ---------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, regions: torch.Tensor | None = None, mask_ratio: float | None = None,
                noise: torch.Tensor | None = None, num_visible: int | None = None,
                region_mask_ratio: float | None = None, num_visible_regions: int | None = None) -> MaskedAEOutput:
        """images [B, C, H, W]; regions [B, k, H, W] binary (required for rae/rmae, ignored
        for mae); noise [B, L] fixes the mask (argsort ascending, first kept);
        ``num_visible`` overrides the number of kept patches. See :class:`MaskedAEOutput`.

        The region branch uses the same permutation; by default the same number of visible
        patches too (the paper). ``region_mask_ratio`` / ``num_visible_regions`` (or the config's
        ``region_mask_ratio``) keep a different number — the official code's
        ``region_mask_ratio``; e.g. interactive segmentation shows the whole image
        (``mask_ratio=0``) and a few region patches (``num_visible_regions=n``)."""
        c = self.config
        self._check_images(images)
        B = images.shape[0]
        ids_shuffle, ids_restore = self._permutation(B, images.device, noise)
        ids_keep, mask = self._keep(ids_shuffle, ids_restore,
                                    self._len_keep(c.mask_ratio if mask_ratio is None else mask_ratio, num_visible))
        latent = self.forward_encoder(images, ids_keep)

        pred_pixel = loss_pixel = pred_region = loss_region = region_mask = None
        if c.has_pixel_branch:
            pred_pixel = self.forward_pixel_decoder(latent, ids_restore)
            loss_pixel = self.pixel_loss(images, pred_pixel, mask)
        if c.has_region_branch:
            if regions is None:
                raise ValueError(f"a {c.family} model needs regions [B, k, H, W] (binary maps) in forward()")
            if regions.ndim != 4 or regions.shape[0] != B or tuple(regions.shape[2:]) != c.image_hw:
                raise ValueError(f"regions must be [B={B}, k, {c.image_hw[0]}, {c.image_hw[1]}], got {list(regions.shape)}")
            regions = regions.to(dtype=images.dtype)
            region_ratio = region_mask_ratio if region_mask_ratio is not None else c.region_mask_ratio
            if region_ratio is None and num_visible_regions is None:
                region_keep, region_mask = ids_keep, mask
            else:
                n = self._len_keep(region_ratio if region_ratio is not None else 0.0, num_visible_regions)
                region_keep, region_mask = self._keep(ids_shuffle, ids_restore, n)
            memory = self.forward_neck(latent, ids_restore)
            pred_region = self.forward_region_decoder(regions, region_keep, ids_restore, memory)
            loss_region = self.region_loss(regions, pred_region, region_mask)

        if loss_pixel is not None and loss_region is not None:
            loss = loss_pixel + c.region_loss_weight * loss_region
        elif loss_pixel is not None:
            loss = loss_pixel
        else:
            loss = c.region_loss_weight * loss_region
        return MaskedAEOutput(loss, loss_pixel, loss_region, pred_pixel, pred_region, mask, region_mask)
