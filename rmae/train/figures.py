"""Reconstruction figures in the paper's Fig. 3 layout.

Per image, one row: masked image | pixel reconstruction | original, and for region models
masked region | region reconstruction | original region (the first of the k regions).
Reconstructions paste the visible patches back in, as MAE's visualisation does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.transforms import denormalize
from ..models import MaskedAutoencoderViT


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


def save_reconstruction_figure(model: MaskedAutoencoderViT, images: torch.Tensor, regions: torch.Tensor | None,
                               path: str | Path, title: str = "", noise: torch.Tensor | None = None) -> Path:
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, nothing to close

    panels = reconstruction_panels(model, images, regions, noise)
    names = list(panels)
    B = images.shape[0]
    fig = Figure(figsize=(1.6 * len(names), 1.6 * B + 0.4))
    axes = fig.subplots(B, len(names), squeeze=False)
    for i in range(B):
        for j, name in enumerate(names):
            img = panels[name][i].permute(1, 2, 0).cpu().numpy()
            ax = axes[i, j]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
