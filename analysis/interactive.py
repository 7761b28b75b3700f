"""Interactive segmentation with the region decoder (new: the paper shows it only as pictures).

Protocol. For an image and one ground-truth instance, the instance's binary map is the single
region; the whole image is visible to the pixel encoder (``mask_ratio = 0``) and only n
patches of the region are visible to the region encoder — the "clicks" (the official code's
``region_mask_ratio`` mechanism: same permutation, fewer visible region patches). The region
decoder predicts the full map; visible patches are pasted back (the user gave them), the rest
is thresholded at 0.5, and the IoU with the instance mask is measured.

Clicks are patches the instance owns (majority of the patch's pixels), taken in a random
order fixed per (seed, image, instance), so n = 1, 2, 4, … are nested sets and every model
sees the same clicks. Baselines on the same clicks:
- ``clicked``: the clicked patches alone (what the user already gave);
- ``fh``: the clicked patches plus every Felzenszwalb–Huttenlocher segment under a click
  centre (the region source R-MAE is trained on), on the same image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from rmae.data import denormalize
from rmae.data.regions import FelzenszwalbSource
from rmae.models import MaskedAutoencoderViT

DEFAULT_CLICKS = (1, 2, 4, 8, 16)


def patch_ownership(instances: torch.Tensor, patch: int) -> torch.Tensor:
    """Majority instance id per patch. instances [B, H, W] int → [B, L] int (0 = background)."""
    B, H, W = instances.shape
    gh, gw = H // patch, W // patch
    blocks = instances.reshape(B, gh, patch, gw, patch).permute(0, 1, 3, 2, 4).reshape(B, gh * gw, patch * patch)
    return torch.mode(blocks, dim=-1).values


def iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary IoU over the last two axes. [..., H, W] bool → [...]."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return inter / union.clamp(min=1)


def _patch_mask(indices: torch.Tensor, L: int) -> torch.Tensor:
    """[P, n] patch indices → [P, L] bool."""
    m = torch.zeros(indices.shape[0], L, dtype=torch.bool, device=indices.device)
    return m.scatter_(1, indices, True)


@torch.no_grad()
def predict_from_clicks(model: MaskedAutoencoderViT, images: torch.Tensor, masks: torch.Tensor,
                        clicks: torch.Tensor, paste: bool = True, image: str = "all") -> torch.Tensor:
    """Region probability maps from clicked patches.

    images [P, 3, H, W] (normalised), masks [P, H, W] {0,1} (the instance), clicks [P, n]
    patch indices → probabilities [P, H, W], with the clicked patches pasted in
    (``paste=False``: the decoder's own prediction everywhere, visible patches included).
    ``image="all"`` shows the pixel encoder the whole image; ``"clicks"`` shows it only the
    clicked patches — the shared mask the model was pre-trained with. ``clicks`` may hold
    negative clicks too (patches outside the instance): every listed patch is visible.
    """
    if image not in ("all", "clicks"):
        raise ValueError(f"image must be 'all' or 'clicks', got {image!r}")
    c = model.config
    if not c.has_region_branch:
        raise ValueError(f"a {c.family} model has no region decoder: interactive segmentation needs rae_* or rmae_*")
    P, n = clicks.shape
    L, p = model.num_patches, model.patch_size
    noise = 1.0 + torch.rand(P, L, generator=torch.Generator().manual_seed(0)).to(images.device)
    noise.scatter_(1, clicks, torch.arange(n, dtype=noise.dtype, device=images.device).expand(P, n) / (n + 1))
    regions = masks.float().unsqueeze(1)  # k = 1: one query per instance
    if c.region_variant == "channel":  # its k is fixed: the instance in channel 0, empty maps after it
        regions = torch.cat([regions, regions.new_zeros(P, c.num_regions - 1, *regions.shape[2:])], dim=1)
    model.eval()
    if image == "all":
        out = model(images, regions=regions, noise=noise, mask_ratio=0.0, num_visible_regions=n)
    else:
        out = model(images, regions=regions, noise=noise, num_visible=n)
    prob = torch.sigmoid(model.unpatchify(out.pred_region[:, 0].float(), channels=1))[:, 0]
    if not paste:
        return prob
    visible = model.unpatchify((1 - out.region_mask).unsqueeze(-1).expand(-1, -1, p * p), channels=1)[:, 0]
    return torch.where(visible > 0.5, masks.float(), prob)


def fh_baseline(image: np.ndarray, clicks: Sequence[int], patch: int, grid: tuple[int, int],
                fh: FelzenszwalbSource) -> np.ndarray:
    """Clicked patches ∪ FH segments under each click's centre. image uint8 [H, W, 3] → bool [H, W]."""
    seg = fh.compute({"image": image})[0]
    out = np.zeros(seg.shape, dtype=bool)
    for q in clicks:
        y, x = divmod(int(q), grid[1])
        out[y * patch:(y + 1) * patch, x * patch:(x + 1) * patch] = True
        out |= seg == seg[y * patch + patch // 2, x * patch + patch // 2]
    return out


@dataclass
class InteractiveCurve:
    """IoU per (image, instance) pair and click count. ``iou[name][n]`` is a list aligned with
    ``image_ids`` (NaN where the instance has fewer than n patches)."""

    clicks: tuple[int, ...]
    image_ids: list[int] = field(default_factory=list)
    iou: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def mean(self, name: str) -> dict[int, float]:
        return {n: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                for n, v in ((n, np.asarray(self.iou[name][n], dtype=float)) for n in self.clicks)}


def interactive_curve(models: dict[str, MaskedAutoencoderViT], batches: Iterable[dict],
                      clicks: Sequence[int] = DEFAULT_CLICKS, min_patches: int = 2, max_instances: int = 3,
                      seed: int = 0, device: str | torch.device = "cpu", baselines: bool = True,
                      negatives: int = 0, image: str = "all") -> InteractiveCurve:
    """IoU vs clicks for every model with a region branch, and the baselines, on the same
    (image, instance, clicks). ``batches`` yield ``images`` [B,3,H,W] and ``instances`` [B,H,W]
    (an eval loader, e.g. ``scenes:val``); instances owning fewer than ``min_patches`` patches
    are skipped, at most ``max_instances`` per image (largest first).

    ``negatives``: that many patches outside the instance are visible too (negative clicks,
    fixed per pair, the same for every n). Pre-training reveals random patches inside and
    outside each region, so a region seen only through positive patches looks like one that
    covers everything; negative clicks tell the decoder where the region is not.
    ``image``: see :func:`predict_from_clicks`."""
    region_models = {k: m for k, m in models.items() if m.config.has_region_branch}
    ref = next(iter(models.values()))
    p, grid, L = ref.patch_size, ref.patch_embed.grid_size, ref.num_patches
    clicks = tuple(sorted(set(int(n) for n in clicks)))
    curve = InteractiveCurve(clicks)
    names = list(region_models) + (["clicked", "fh"] if baselines else [])
    curve.iou = {name: {n: [] for n in clicks} for name in names}
    fh = FelzenszwalbSource(scales=(1000.0,))
    for batch in batches:
        if "instances" not in batch:
            raise ValueError("interactive segmentation needs ground-truth instances (e.g. --data scenes:val)")
        images, inst = batch["images"], batch["instances"]
        owner = patch_ownership(inst, p)  # [B, L]
        pairs = []  # (b, instance id, click order)
        for b in range(images.shape[0]):
            ids, counts = torch.unique(owner[b][owner[b] > 0], return_counts=True)
            order = counts.argsort(descending=True)
            for j in order[:max_instances]:
                if counts[j] < min_patches:
                    continue
                inst_id = int(ids[j])
                patches = torch.nonzero(owner[b] == inst_id).flatten()
                g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(batch["index"][b]), inst_id]).generate_state(1)[0]))
                outside = torch.nonzero(owner[b] != inst_id).flatten()
                negs = outside[torch.randperm(len(outside), generator=g)][:negatives]
                pairs.append((b, inst_id, patches[torch.randperm(len(patches), generator=g)], negs))
        if not pairs:
            continue
        b_idx = torch.tensor([b for b, _, _, _ in pairs])
        masks = torch.stack([inst[b] == i for b, i, _, _ in pairs])  # [P, H, W] bool
        curve.image_ids.extend(int(batch["index"][b]) for b, _, _, _ in pairs)
        uint8 = (denormalize(images) * 255).round().byte().permute(0, 2, 3, 1).numpy() if baselines else None
        for n in clicks:
            ok = [k for k, (_, _, order, negs) in enumerate(pairs)
                  if len(order) >= n and len(negs) == negatives]  # pairs with n patches (and the negatives)
            scores = {name: torch.full((len(pairs),), float("nan")) for name in curve.iou}
            if ok:
                sel = torch.tensor(ok)
                chosen = torch.stack([pairs[k][2][:n] for k in ok])  # [P', n], nested in n
                visible = torch.stack([torch.cat([pairs[k][2][:n], pairs[k][3]]) for k in ok])  # + negatives
                for name, model in region_models.items():
                    prob = predict_from_clicks(model, images[b_idx[sel]].to(device), masks[sel].to(device),
                                               visible.to(device), image=image).cpu()
                    scores[name][sel] = iou(prob > 0.5, masks[sel])
                if baselines:
                    clicked = F.interpolate(_patch_mask(chosen, L).float().reshape(-1, 1, *grid), scale_factor=p)[:, 0] > 0.5
                    scores["clicked"][sel] = iou(clicked, masks[sel])
                    scores["fh"][sel] = torch.tensor([
                        iou(torch.from_numpy(fh_baseline(uint8[pairs[k][0]], chosen[j].tolist(), p, grid, fh)), masks[k]).item()
                        for j, k in enumerate(ok)])
            for name in curve.iou:
                curve.iou[name][n].extend(scores[name].tolist())
    return curve
