"""Reconstructions as pictures: what a masked autoencoder fills in, in the paper's Fig. 3 panels.

Per image: masked image | pixel reconstruction | original and, for region models, masked
region | region reconstruction | original region (the first of the k regions). The visible
patches are pasted back, as MAE's visualisation does. Used by the trainer's figures, the
dashboard and the notebooks.
"""

from __future__ import annotations

import torch

from .data.transforms import denormalize
from .models import MaskedAutoencoderViT


@torch.no_grad()
def reconstruction_panels(model: MaskedAutoencoderViT, images: torch.Tensor, regions: torch.Tensor | None,
                          noise: torch.Tensor | None = None, mask_ratio: float | None = None) -> dict[str, torch.Tensor]:
    """Images [B, 3, H, W] (normalised) → dict of panels, each [B, C, H, W] in [0, 1]."""
    model.eval()
    out = model(images, regions=regions, noise=noise, mask_ratio=mask_ratio)
    p = model.patch_size
    # [B, L] → [B, 1, H, W], 1 where the patch was removed
    removed = model.unpatchify(out.mask.unsqueeze(-1).expand(-1, -1, p * p), channels=1)
    panels: dict[str, torch.Tensor] = {}
    original = denormalize(images).clamp(0, 1)
    if out.pred_pixel is not None:
        pred = out.pred_pixel
        if model.config.norm_pix_loss:  # undo per-patch normalisation with the true patch stats
            target = model.patchify(images)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        recon = denormalize(model.unpatchify(pred)).clamp(0, 1)
        panels["masked image"] = original * (1 - removed) + 0.5 * removed
        panels["pixel reconstruction"] = original * (1 - removed) + recon * removed
        panels["original"] = original
    if out.pred_region is not None and regions is not None:
        region = regions[:, :1].float()
        pred = torch.sigmoid(model.unpatchify(out.pred_region[:, 0], channels=1))
        panels["masked region"] = region * (1 - removed) + 0.5 * removed
        panels["region reconstruction"] = region * (1 - removed) + pred * removed
        panels["original region"] = region
    return panels
