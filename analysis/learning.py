"""Did a run learn what the metrics look for? Three checks against their nulls.

A comparison of attention or instance-awareness between two models means little if neither has
learned any structure yet (at a short budget R-MAE's attention is still uniform). For a run:

- **attention**: last-layer attention entropy of patch queries (mean over heads and images)
  against ``ln L``, the entropy of uniform attention;
- **pixels**: the final pixel loss against the loss of predicting every patch by its own mean
  (in the loss's own target space: per-patch normalised when ``norm_pix_loss``) — measured on the
  training data, since flat regions make that null far below 1 on synthetic scenes;
- **regions**: the final region loss against the best constant predictor, the binary entropy
  ``H(p)`` of the region pixels' foreground rate ``p`` (measured on the run's own region maps).

"Clearly below" is ``≤ LEARNED_FRACTION`` (0.9) of the null. ``rmae study`` reports these for
every configuration; the ``study`` preset's budget was chosen so that every family passes all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

LEARNED_FRACTION = 0.9


@dataclass
class LearningCheck:
    run: str
    attention_entropy: float | None = None
    uniform_entropy: float | None = None
    pixel_loss: float | None = None
    pixel_null: float | None = None
    region_loss: float | None = None
    region_null: float | None = None
    learned: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _final(rows: list[dict], key: str, last: int = 3) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return float(np.mean(vals[-last:])) if vals else None


@torch.no_grad()
def _nulls(model, cfg, n_images: int) -> tuple[float | None, float | None]:
    """(loss of predicting each patch by its mean, best-constant region loss) on the run's data."""
    from rmae.train.trainer import build_train_dataset
    from rmae.data import RegionLoader

    ds = build_train_dataset(cfg, model, train=True)
    loader = RegionLoader(ds, batch_size=min(64, n_images), shuffle=True, drop_last=False, seed=cfg.seed)
    sq, n_patches, fg, n_pix = 0.0, 0, 0.0, 0
    seen = 0
    for batch in loader:
        target = model.patchify(batch["images"].float())
        if model.config.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        sq += float(((target - target.mean(-1, keepdim=True)) ** 2).mean(-1).sum())
        n_patches += target.shape[0] * target.shape[1]
        if "regions" in batch:
            fg += float(batch["regions"].sum())
            n_pix += batch["regions"].numel()
        seen += batch["images"].shape[0]
        if seen >= n_images:
            break
    pixel_null = sq / n_patches if model.config.has_pixel_branch and n_patches else None
    region_null = None
    if n_pix:
        p = fg / n_pix
        region_null = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0
    return pixel_null, region_null


def learning_check(run: str | Path, n_images: int = 256, eval_data: str = "scenes:val:64",
                   entropy: float | None = None) -> LearningCheck:
    """The three checks of run folder ``run`` (see module docstring). ``entropy``: the last-layer
    attention entropy when an analysis already measured it (else it is measured on ``eval_data``)."""
    import rmae
    from rmae.runfolder import RunFolder
    from rmae.train.trainer import config_of_run

    folder = RunFolder(run)
    rows, _ = folder.read_metrics()
    model = rmae.load_model(run).eval()
    out = LearningCheck(str(run), pixel_loss=_final(rows, "loss_pixel"), region_loss=_final(rows, "loss_region"))
    out.uniform_entropy = math.log(model.num_patches)
    if entropy is None:
        from rmae.data import evaluation_loader

        from .analyze import attention_metrics

        vals = attention_metrics({"run": model}, evaluation_loader(eval_data, model.config.image_hw, batch_size=32))
        entropy = float(np.nanmean(vals["run"]["attention_entropy"][:, -1]))
    out.attention_entropy = entropy
    try:
        cfg = config_of_run(run)
    except rmae.CheckpointError:
        cfg = None
    if cfg is not None:
        out.pixel_null, out.region_null = _nulls(model, cfg, n_images)
    checks = {"attention": (out.attention_entropy, out.uniform_entropy), "pixels": (out.pixel_loss, out.pixel_null),
              "regions": (out.region_loss, out.region_null)}
    out.learned = {k: bool(v <= LEARNED_FRACTION * null) for k, (v, null) in checks.items()
                   if v is not None and null is not None}
    return out
