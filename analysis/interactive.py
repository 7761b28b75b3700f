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

from analysis.encoder import model_device
from analysis.groundtruth import patch_labels
from rmae.data import denormalize
from rmae.data.regions import FelzenszwalbSource
from rmae.evaluation import binary_iou
from rmae.models import MaskedAutoencoderViT

Tensor = torch.Tensor
Clicks = Tensor | Sequence[int]

DEFAULT_CLICKS = (1, 2, 4, 8, 16)


# ------------------------------------------------------------------------------------------
# clicks in pixels, and the FH baseline (the one owner; the dashboard uses these too)


def _click_tensor(clicks: Clicks, grid: tuple[int, int], device: torch.device | str) -> Tensor:
    """Clicks as an int64 tensor of patch indices ``[..., n]`` on ``device``, checked against the grid."""
    c = torch.as_tensor(clicks, dtype=torch.long, device=device)
    L = int(grid[0]) * int(grid[1])
    if c.numel() and (c.min() < 0 or c.max() >= L):
        raise ValueError(f"clicks must be patch indices in 0..{L - 1} of the {grid[0]}×{grid[1]} grid, "
                         f"got {c.min().item()}..{c.max().item()}")
    return c


def clicked_patches_mask(clicks: Clicks, patch: int, grid: tuple[int, int]) -> Tensor:
    """The pixels of the clicked patches: clicks ``[..., n]`` (a list, or e.g. ``[P, n]``) patch
    indices → bool ``[..., H, W]`` with ``H = gh·patch``, ``W = gw·patch``; on the clicks' device
    (the CPU for a list)."""
    c = _click_tensor(clicks, grid, clicks.device if isinstance(clicks, Tensor) else "cpu")
    gh, gw = int(grid[0]), int(grid[1])
    m = torch.zeros(*c.shape[:-1], gh * gw, dtype=torch.bool, device=c.device).scatter_(-1, c, True)
    m = m.reshape(*c.shape[:-1], gh, gw)
    return m.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)


def segments_under_clicks(segments: Tensor | np.ndarray, clicks: Clicks, patch: int, grid: tuple[int, int]) -> Tensor:
    """The union of the segments under each clicked patch's centre pixel ``(r·p + p//2, c·p + p//2)``:
    segments int ``[H, W]`` (a label map, e.g. Felzenszwalb–Huttenlocher), clicks ``[n]`` → bool
    ``[H, W]``, on the segments' device (the CPU for a numpy map)."""
    seg = segments if isinstance(segments, Tensor) else torch.from_numpy(np.ascontiguousarray(segments))
    c = _click_tensor(clicks, grid, seg.device).reshape(-1)
    rows, cols = c // int(grid[1]), c % int(grid[1])
    ids = seg[rows * patch + patch // 2, cols * patch + patch // 2]
    return torch.isin(seg, ids)


def fh_baseline(image: np.ndarray, clicks: Clicks, patch: int, grid: tuple[int, int],
                fh: FelzenszwalbSource) -> Tensor:
    """Clicked patches ∪ FH segments under each click's centre: image uint8 ``[H, W, 3]``, clicks
    ``[n]`` → bool ``[H, W]`` (CPU). The segments are the region source R-MAE is trained on."""
    seg = fh.compute({"image": image})[0]
    return clicked_patches_mask(clicks, patch, grid).cpu() | segments_under_clicks(seg, clicks, patch, grid)


# ------------------------------------------------------------------------------------------
# the region decoder from clicks


@torch.no_grad()
def predict_from_clicks(model: MaskedAutoencoderViT, images: Tensor, masks: Tensor,
                        clicks: Tensor, paste: bool = True, image: str = "all") -> Tensor:
    """Region probability maps from clicked patches.

    images [P, 3, H, W] (normalised), masks [P, H, W] {0,1} (the instance), clicks [P, n]
    patch indices → probabilities [P, H, W], with the clicked patches pasted in
    (``paste=False``: the decoder's own prediction everywhere, visible patches included).
    ``image="all"`` shows the pixel encoder the whole image; ``"clicks"`` shows it only the
    clicked patches — the shared mask the model was pre-trained with. ``clicks`` may hold
    negative clicks too (patches outside the instance): every listed patch is visible.
    Inputs go to the model's device; so does the result.
    """
    if image not in ("all", "clicks"):
        raise ValueError(f"image must be 'all' or 'clicks', got {image!r}")
    c = model.config
    if not c.has_region_branch:
        raise ValueError(f"a {c.family} model has no region decoder: interactive segmentation needs rae_* or rmae_*")
    dev = model_device(model)
    images, masks, clicks = images.to(dev), masks.to(dev), clicks.to(dev)
    P, n = clicks.shape
    L, p = model.num_patches, model.patch_size
    # the same noise on every device: drawn by a seeded CPU generator, then moved
    noise = 1.0 + torch.rand(P, L, generator=torch.Generator(device="cpu").manual_seed(0), device="cpu").to(dev)
    noise.scatter_(1, clicks, torch.arange(n, dtype=noise.dtype, device=dev).expand(P, n) / (n + 1))
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


# ------------------------------------------------------------------------------------------
# the curve: IoU against the number of clicks


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


def _click_order(owner: Tensor, inst_id: int, negatives: int, seed: int, index: int) -> tuple[Tensor, Tensor]:
    """(patches the instance owns in a random order, ``negatives`` patches outside it), fixed per
    (seed, image index, instance) by a CPU generator: the same on every machine and device."""
    state = np.random.SeedSequence([seed, index, inst_id]).generate_state(1)[0]
    g = torch.Generator(device="cpu").manual_seed(int(state))
    patches = torch.nonzero(owner == inst_id).flatten()
    outside = torch.nonzero(owner != inst_id).flatten()
    negs = outside[torch.randperm(len(outside), generator=g, device="cpu")][:negatives]
    return patches[torch.randperm(len(patches), generator=g, device="cpu")], negs


def interactive_curve(models: dict[str, MaskedAutoencoderViT], batches: Iterable[dict],
                      clicks: Sequence[int] = DEFAULT_CLICKS, min_patches: int = 2, max_instances: int = 3,
                      seed: int = 0, device: str | torch.device | None = None, baselines: bool = True,
                      negatives: int = 0, image: str = "all") -> InteractiveCurve:
    """IoU vs clicks for every model with a region branch, and the baselines, on the same
    (image, instance, clicks). ``batches`` yield ``images`` [B,3,H,W] and ``instances`` [B,H,W]
    (an eval loader, e.g. ``scenes:val``); instances owning fewer than ``min_patches`` patches
    are skipped, at most ``max_instances`` per image (largest first). Patch ownership is
    :func:`analysis.groundtruth.patch_labels` (majority vote, ties to the lower id).

    ``negatives``: that many patches outside the instance are visible too (negative clicks,
    fixed per pair, the same for every n). Pre-training reveals random patches inside and
    outside each region, so a region seen only through positive patches looks like one that
    covers everything; negative clicks tell the decoder where the region is not.
    ``image``: see :func:`predict_from_clicks`. Each model runs on its own device; ``device``,
    when given, is where the caller put them (a model elsewhere is an error).
    Bookkeeping (clicks, IoUs) stays on the CPU."""
    region_models = {k: m for k, m in models.items() if m.config.has_region_branch}
    if device is not None:
        want = torch.device(device)
        wrong = {k: str(d) for k, m in region_models.items()
                 if (d := model_device(m)).type != want.type or want.index not in (None, d.index)}
        if wrong:
            raise ValueError(f"interactive_curve(device={str(want)!r}) but models are elsewhere: {wrong}")
    ref = next(iter(models.values()))
    p, grid = ref.patch_size, tuple(ref.patch_embed.grid_size)
    clicks = tuple(sorted(set(int(n) for n in clicks)))
    curve = InteractiveCurve(clicks)
    names = list(region_models) + (["clicked", "fh"] if baselines else [])
    curve.iou = {name: {n: [] for n in clicks} for name in names}
    fh = FelzenszwalbSource(scales=(1000.0,))
    for batch in batches:
        if "instances" not in batch:
            raise ValueError("interactive segmentation needs ground-truth instances (e.g. --data scenes:val)")
        images, inst = batch["images"].cpu(), batch["instances"].cpu()
        owner = patch_labels(inst, p)  # [B, L]
        pairs = []  # (b, instance id, click order, negative clicks)
        for b in range(images.shape[0]):
            ids, counts = torch.unique(owner[b][owner[b] > 0], return_counts=True)
            order = counts.argsort(descending=True)
            for j in order[:max_instances]:
                if counts[j] < min_patches:
                    continue
                inst_id = int(ids[j])
                pairs.append((b, inst_id, *_click_order(owner[b], inst_id, negatives, seed, int(batch["index"][b]))))
        if not pairs:
            continue
        b_idx = torch.tensor([b for b, _, _, _ in pairs], device="cpu")
        masks = torch.stack([inst[b] == i for b, i, _, _ in pairs])  # [P, H, W] bool
        curve.image_ids.extend(int(batch["index"][b]) for b, _, _, _ in pairs)
        uint8 = (denormalize(images) * 255).round().byte().permute(0, 2, 3, 1).numpy() if baselines else None
        for n in clicks:
            ok = [k for k, (_, _, order, negs) in enumerate(pairs)
                  if len(order) >= n and len(negs) == negatives]  # pairs with n patches (and the negatives)
            scores = {name: torch.full((len(pairs),), float("nan"), device="cpu") for name in curve.iou}
            if ok:
                sel = torch.tensor(ok, device="cpu")
                chosen = torch.stack([pairs[k][2][:n] for k in ok])  # [P', n], nested in n
                visible = torch.stack([torch.cat([pairs[k][2][:n], pairs[k][3]]) for k in ok])  # + negatives
                for name, model in region_models.items():
                    prob = predict_from_clicks(model, images[b_idx[sel]], masks[sel], visible, image=image).cpu()
                    scores[name][sel] = binary_iou(prob > 0.5, masks[sel])
                if baselines:
                    scores["clicked"][sel] = binary_iou(clicked_patches_mask(chosen, p, grid), masks[sel])
                    scores["fh"][sel] = torch.stack([
                        binary_iou(fh_baseline(uint8[pairs[k][0]], chosen[j], p, grid, fh), masks[k])
                        for j, k in enumerate(ok)])
            for name in curve.iou:
                curve.iou[name][n].extend(scores[name].tolist())
    return curve
