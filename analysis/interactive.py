"""Interactive segmentation with the region decoder (new: the paper shows it only as pictures).

Protocol. For an image and one ground-truth instance, the instance's binary map is the single
region; the whole image is visible to the pixel encoder (``mask_ratio = 0``) and only n
patches of the region are visible to the region encoder — the "clicks" (the official code's
``region_mask_ratio`` mechanism: same permutation, fewer visible region patches). The region
decoder predicts the full map; visible patches are pasted back (the user gave them), the rest
is thresholded at 0.5, and the IoU with the instance mask is measured.

Clicks are patches the instance owns (majority of the patch's pixels), taken in a random
order fixed per (seed, image, instance), so n = 1, 2, 4, … are nested sets and every model
sees the same clicks.

Every point of a curve is over the **same pairs**: the (image, instance) pairs whose instance
owns at least as many patches as the largest click count of the curve. Click counts are dropped
from the top while fewer than ``min_pairs`` pairs would remain (said in ``dropped``), so the
headline point — the largest click count kept — always stands on enough pairs.

Baselines get **exactly the model's information**: the image as the model's pixel encoder sees
it and the ground-truth pixels of every visible (clicked, and negative) patch, pasted in as the
model's prediction has them pasted in:
- ``paste_only``: the pasted pixels, background everywhere else;
- ``fh``: the pasted pixels, and each Felzenszwalb–Huttenlocher segment (the region source
  R-MAE is trained on) filled where it is unknown when most of its known pixels are the instance —
  segments propagate what the clicks revealed, nothing more.
The model's gain is reported over the strongest baseline at each click count.
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
                fh: FelzenszwalbSource | None = None) -> Tensor:
    """Clicked patches ∪ FH segments under each click's centre: image uint8 ``[H, W, 3]``, clicks
    ``[n]`` → bool ``[H, W]`` (CPU) — the quick picture the dashboard draws from clicks alone (no
    ground truth). The measured baselines are :func:`baseline_predictions`."""
    seg = (fh or FH_BASELINE).compute({"image": image})[0]
    return clicked_patches_mask(clicks, patch, grid).cpu() | segments_under_clicks(seg, clicks, patch, grid)


#: the FH segmentation the baselines use: one scale, the middle of the paper's (relative to size)
FH_BASELINE = FelzenszwalbSource(scales=(1000.0,))
BASELINES = ("paste_only", "fh")


def propagate_through_segments(segments: Tensor, known: Tensor, positive: Tensor) -> Tensor:
    """Fill every segment whose known pixels are mostly positive: segments int ``[H, W]``, known /
    positive bool ``[H, W]`` → bool ``[H, W]`` (unknown pixels of such segments, and the known
    positives). A segment with no known pixel stays background."""
    _, seg = torch.unique(segments, return_inverse=True)
    K = int(seg.max()) + 1
    n_known = torch.bincount(seg[known], minlength=K)
    n_pos = torch.bincount(seg[known & positive], minlength=K)
    fill = (n_known > 0) & (2 * n_pos > n_known)
    return torch.where(known, positive, fill[seg])


def baseline_predictions(image: np.ndarray, mask: Tensor, visible: Tensor, patch: int, grid: tuple[int, int],
                         fh: FelzenszwalbSource | None = None) -> dict[str, Tensor]:
    """The baselines of one pair (see module docstring): image uint8 ``[H, W, 3]`` as the model's
    pixel encoder saw it, mask bool ``[H, W]`` (the instance), visible ``[n]`` patch indices (clicks
    and negative clicks) → ``{name: bool [H, W]}``."""
    known = clicked_patches_mask(visible, patch, grid).cpu()
    positive = mask.cpu().bool() & known
    seg = torch.from_numpy(np.ascontiguousarray((fh or FH_BASELINE).compute({"image": image})[0]))
    return {"paste_only": positive, "fh": propagate_through_segments(seg, known, positive)}


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
    """IoU per (image, instance) pair and click count, on one fixed set of pairs:
    ``iou[name][n]`` is a list aligned with ``image_ids`` / ``instance_ids`` for every n in
    ``clicks`` (models and baselines alike). ``dropped`` maps a requested click count that was
    left out to why."""

    clicks: tuple[int, ...]
    image_ids: list[int] = field(default_factory=list)
    instance_ids: list[int] = field(default_factory=list)
    iou: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    baselines: tuple[str, ...] = ()
    dropped: dict[int, str] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return len(self.image_ids)

    def mean(self, name: str) -> dict[int, float]:
        return {n: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                for n, v in ((n, np.asarray(self.iou[name][n], dtype=float)) for n in self.clicks)}

    def table(self, name: str) -> np.ndarray:
        """``[pairs, clicks]`` IoUs of ``name``."""
        return np.asarray([self.iou[name][n] for n in self.clicks], dtype=float).T.reshape(self.n_pairs, len(self.clicks))

    def strongest_baseline(self) -> list[str]:
        """The baseline with the highest mean IoU at each click count (on the same pairs)."""
        return [max(self.baselines, key=lambda b: self.mean(b)[n]) for n in self.clicks] if self.baselines else []


def _click_order(owner: Tensor, inst_id: int, negatives: int, seed: int, index: int) -> tuple[Tensor, Tensor]:
    """(patches the instance owns in a random order, ``negatives`` patches outside it), fixed per
    (seed, image index, instance) by a CPU generator: the same on every machine and device."""
    state = np.random.SeedSequence([seed, index, inst_id]).generate_state(1)[0]
    g = torch.Generator(device="cpu").manual_seed(int(state))
    patches = torch.nonzero(owner == inst_id).flatten()
    outside = torch.nonzero(owner != inst_id).flatten()
    negs = outside[torch.randperm(len(outside), generator=g, device="cpu")][:negatives]
    return patches[torch.randperm(len(patches), generator=g, device="cpu")], negs


def _candidates(owner: Tensor, max_instances: int) -> list[list[tuple[int, int]]]:
    """Per image: (instance id, patches it owns) of its largest ``max_instances`` instances."""
    out = []
    for b in range(owner.shape[0]):
        ids, counts = torch.unique(owner[b][owner[b] > 0], return_counts=True)
        order = counts.argsort(descending=True)[:max_instances]
        out.append([(int(ids[j]), int(counts[j])) for j in order])
    return out


def choose_clicks(patch_counts: Sequence[int], clicks: Sequence[int], min_pairs: int, negatives: int = 0,
                  num_patches: int | None = None) -> tuple[tuple[int, ...], dict[int, str]]:
    """The click counts of the curve: the requested ones, dropping the largest while fewer than
    ``min_pairs`` instances own that many patches (the smallest is always kept). → (kept, dropped)."""
    wanted = tuple(sorted(set(int(n) for n in clicks)))
    counts = np.asarray(list(patch_counts), dtype=int)
    kept, dropped = list(wanted), {}
    while len(kept) > 1:
        n = kept[-1]
        enough = int((counts >= n).sum())
        if enough >= min_pairs:
            break
        dropped[n] = f"only {enough} instance(s) own ≥ {n} patches (fewer than {min_pairs} pairs)"
        kept.pop()
    return tuple(kept), dropped


def interactive_curve(models: dict[str, MaskedAutoencoderViT], batches: Iterable[dict],
                      clicks: Sequence[int] = DEFAULT_CLICKS, min_pairs: int = 30, max_instances: int = 3,
                      seed: int = 0, device: str | torch.device | None = None, baselines: bool = True,
                      negatives: int = 0, image: str = "all") -> InteractiveCurve:
    """IoU vs clicks for every model with a region branch, and the baselines, on the same fixed
    set of (image, instance) pairs and the same clicks (see module docstring). ``batches`` is a
    re-iterable loader yielding ``images`` [B,3,H,W] and ``instances`` [B,H,W] (e.g.
    ``rmae.data.evaluation_loader("scenes:val", …)``): it is read twice, once to count the
    instances' patches and choose the click counts, once to predict. At most ``max_instances``
    per image (largest first). Patch ownership is :func:`analysis.groundtruth.patch_labels`.

    ``negatives``: that many patches outside the instance are visible too (negative clicks,
    fixed per pair, the same for every n); the baselines see them too. ``image``: see
    :func:`predict_from_clicks` (the baselines see the image alike: greyed where the pixel
    encoder does not see it). Each model runs on its own device; ``device``, when given, is where
    the caller put them (a model elsewhere is an error). Bookkeeping stays on the CPU."""
    region_models = {k: m for k, m in models.items() if m.config.has_region_branch}
    if device is not None:
        want = torch.device(device)
        wrong = {k: str(d) for k, m in region_models.items()
                 if (d := model_device(m)).type != want.type or want.index not in (None, d.index)}
        if wrong:
            raise ValueError(f"interactive_curve(device={str(want)!r}) but models are elsewhere: {wrong}")
    ref = next(iter(models.values()))
    p, grid = ref.patch_size, tuple(ref.patch_embed.grid_size)
    L = grid[0] * grid[1]
    counts = []
    for batch in batches:
        if "instances" not in batch:
            raise ValueError("interactive segmentation needs ground-truth instances (e.g. --data scenes:val)")
        counts += [n for per_image in _candidates(patch_labels(batch["instances"].cpu(), p), max_instances)
                   for _, n in per_image if L - n >= negatives]
    kept, dropped = choose_clicks(counts, clicks, min_pairs)
    need = kept[-1]
    names = list(region_models) + (list(BASELINES) if baselines else [])
    curve = InteractiveCurve(kept, iou={name: {n: [] for n in kept} for name in names},
                             baselines=BASELINES if baselines else (), dropped=dropped)
    for batch in batches:
        images, inst = batch["images"].cpu(), batch["instances"].cpu()
        owner = patch_labels(inst, p)  # [B, L]
        pairs = []  # (b, instance id, click order, negative clicks): instances owning ≥ the largest n
        for b, per_image in enumerate(_candidates(owner, max_instances)):
            for inst_id, n_owned in per_image:
                if n_owned >= need and L - n_owned >= negatives:
                    pairs.append((b, inst_id, *_click_order(owner[b], inst_id, negatives, seed, int(batch["index"][b]))))
        if not pairs:
            continue
        b_idx = torch.tensor([b for b, *_ in pairs], device="cpu")
        masks = torch.stack([inst[b] == i for b, i, *_ in pairs])  # [P, H, W] bool
        curve.image_ids.extend(int(batch["index"][b]) for b, *_ in pairs)
        curve.instance_ids.extend(i for _, i, *_ in pairs)
        uint8 = (denormalize(images) * 255).round().byte().permute(0, 2, 3, 1).numpy() if baselines else None
        for n in kept:
            visible = torch.stack([torch.cat([order[:n], negs]) for _, _, order, negs in pairs])  # [P, n + negatives]
            for name, model in region_models.items():
                prob = predict_from_clicks(model, images[b_idx], masks, visible, image=image).cpu()
                curve.iou[name][n].extend(binary_iou(prob > 0.5, masks).tolist())
            if baselines:
                for k, (b, *_) in enumerate(pairs):
                    seen = uint8[b]
                    if image == "clicks":  # the pixel encoder saw only the visible patches: so do they
                        known = clicked_patches_mask(visible[k], p, grid).numpy()
                        seen = np.where(known[..., None], seen, np.uint8(128))
                    preds = baseline_predictions(seen, masks[k], visible[k], p, grid)
                    for name in BASELINES:
                        curve.iou[name][n].append(float(binary_iou(preds[name], masks[k])))
    return curve
