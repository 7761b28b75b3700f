"""Reconstruction figures the trainer writes (the panels of :mod:`rmae.reconstruction`, one row
per image) as PNG files and TensorBoard images."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_write
from ..models import MaskedAutoencoderViT
from ..reconstruction import reconstruction_panels


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
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
