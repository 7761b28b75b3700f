"""What the models compute for the pages, without Streamlit: images in, numbers and pictures out.

Plain functions on models and numpy arrays, tested and timed directly
(``benchmarks/bench_dashboard.py``); :mod:`dashboards.state` wraps the expensive ones in
Streamlit's caches. The maths comes from its owners — the encoder surface
(:mod:`analysis.encoder`), attention maps and rollout (:mod:`analysis.attention`), patch ownership
(:mod:`analysis.groundtruth`), DINO thresholding (:mod:`analysis.metrics`), click prediction and
its baselines (:mod:`analysis.interactive`), IoU (:mod:`rmae.evaluation`) and reconstructions
(:mod:`rmae.reconstruction`); this module only arranges it for display.

Geometry (grid, patch size, prefix tokens) is read from :func:`analysis.encoder.describe`, so any
ViT the encoder surface accepts works in the attention explorer; reconstruction and click
segmentation need our decoders. Inputs go to the model's device; results come back as numpy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from analysis.attention import aggregate_heads, cls_maps, patch_query_maps, rollout_maps
from analysis.encoder import EncoderInfo, attention_pass, model_device
from analysis.groundtruth import patch_ownership
from analysis.interactive import clicked_patches_mask, fh_baseline, predict_from_clicks, segments_under_clicks
from analysis.metrics import keep_mass_threshold
from rmae.data import FelzenszwalbSource
from rmae.evaluation import binary_iou
from rmae.reconstruction import reconstruction_panels

from .images import Prepared

#: the FH source of the click baseline, as ``analysis.interactive.interactive_curve`` uses it
FH_BASELINE_SCALES = (1000.0,)


# ------------------------------------------------------------------------------------------
# attention


@torch.no_grad()
def attention_stack(model: nn.Module, prepared: Prepared) -> np.ndarray:
    """Every layer's attention for one image: float32 ``[depth, heads, N, N]`` (N = P + L)."""
    _, rec = attention_pass(model, prepared.tensor())
    return torch.stack([w[0] for w in rec.weights]).float().cpu().numpy()


def head_choice(how: str | int) -> str | int:
    """A head selector of the explorer: ``"mean"``, ``"max"`` or a head index (int or digits)."""
    return int(how) if isinstance(how, int) or (isinstance(how, str) and how.isdigit()) else how


def attention_views(attn: np.ndarray, layer: int, how: str | int, query: int | None,
                    info: EncoderInfo) -> dict[str, np.ndarray]:
    """The three maps the explorer shows for one run, each ``[gh, gw]`` float32:

    - ``"patch query"``: attention from the query patch at ``layer`` (paper Fig. 6);
    - ``"CLS"``: CLS → patch attention at ``layer``;
    - ``"rollout"``: attention rollout through layers ``0..layer``, from the query patch
      (from CLS when ``query`` is None).

    ``attn``: :func:`attention_stack`; ``how``: ``"mean"``, ``"max"`` or a head index (also the
    rollout's head fusion).
    """
    how = head_choice(how)
    grid, prefix = info.grid, info.num_prefix_tokens
    a = torch.from_numpy(attn[layer])[None]  # [1, h, N, N]
    out = {}
    if query is not None:
        out["patch query"] = aggregate_heads(patch_query_maps(a, int(query), grid, num_prefix=prefix), how)[0].numpy()
    out["CLS"] = aggregate_heads(cls_maps(a, grid, num_prefix=prefix), how)[0].numpy()
    layers = [torch.from_numpy(attn[i])[None] for i in range(layer + 1)]
    out["rollout"] = rollout_maps(layers, grid, query=query, head_fusion=how, num_prefix=prefix)[0].numpy()
    return out


def query_row(attn: np.ndarray, layer: int, how: str | int, query: int, num_prefix: int = 1) -> np.ndarray:
    """The query's attention over patch keys ``[L]``: each head's row renormalised over patch
    keys (prefix keys dropped, as in :mod:`analysis.metrics`), heads aggregated, renormalised."""
    row = torch.from_numpy(attn[layer][:, num_prefix + int(query), num_prefix:]).double()  # [h, L]
    row = row / row.sum(-1, keepdim=True).clamp_min(1e-300)
    how = head_choice(how)
    agg = row[how] if isinstance(how, int) else (row.mean(0) if how == "mean" else row.max(0).values)
    return (agg / agg.sum().clamp_min(1e-300)).numpy()


def instance_stats(row: np.ndarray, instances: np.ndarray, patch: int, query: int,
                   keep_mass: float = 0.6, min_purity: float = 0.5) -> dict:
    """Instance-awareness of one query (the per-query terms of ``analysis.metrics.instance_awareness``).

    ``row [L]``: the query's attention over patch keys (sums to 1). Returns a dict with
    ``instance`` (the query patch's owner, 0 = background), ``purity``, ``valid`` (owner > 0 and
    purity ≥ ``min_purity``), ``mass`` / ``leak`` / ``background`` (sum to 1) and ``jaccard`` of
    the keep-60 %-mass map with the instance's patches.
    """
    owner, purity = patch_ownership(torch.from_numpy(np.ascontiguousarray(instances)).long(), patch)
    owner, purity = owner.reshape(-1).numpy(), purity.reshape(-1).numpy()
    q = int(query)
    inst = int(owner[q])
    same = (owner == inst) & (owner > 0)
    stats = {"instance": inst, "purity": float(purity[q]), "valid": bool(inst > 0 and purity[q] >= min_purity),
             "instance_patches": int(same.sum()), "patches": int(owner.size)}
    stats["mass"] = float(row[same].sum())
    stats["leak"] = float(row[(owner > 0) & ~same].sum())
    stats["background"] = float(row[owner == 0].sum())
    kept = keep_mass_threshold(torch.from_numpy(row), keep_mass).numpy()
    union = (kept | same).sum()
    stats["jaccard"] = float((kept & same).sum() / union) if union else float("nan")
    stats["kept_patches"] = int(kept.sum())
    return stats


# ------------------------------------------------------------------------------------------
# regions and reconstruction (our decoders)


def fh_segments(image: np.ndarray) -> np.ndarray:
    """Felzenszwalb–Huttenlocher segments of an image (the middle of the paper's scales) ``[H, W]``."""
    seg = FelzenszwalbSource().compute({"image": image})
    return seg[len(seg) // 2]


def region_list(labels: np.ndarray, max_regions: int = 32) -> list[tuple[int, int]]:
    """``(label, area)`` of the segments of a label map, largest first (0 is background for
    instance maps and is left out; FH labels start at 1)."""
    ids, counts = np.unique(labels, return_counts=True)
    keep = ids > 0
    ids, counts = ids[keep], counts[keep]
    order = np.argsort(-counts, kind="stable")
    return [(int(ids[i]), int(counts[i])) for i in order[:max_regions]]


def region_stack(labels: np.ndarray, first: int, k: int) -> np.ndarray:
    """``k`` binary maps ``float32 [k, H, W]``: segment ``first`` then the largest others,
    repeated when there are fewer than k (as the training sampler does)."""
    ids = [first] + [i for i, _ in region_list(labels, 4 * k) if i != first]
    ids = (ids * k)[:k]
    return np.stack([(labels == i) for i in ids]).astype(np.float32)


def mask_noise(num_patches: int, seed: int) -> torch.Tensor:
    """Masking noise ``[1, L]`` from a seed: the same seed masks the same patches in every run
    of the same grid, so runs are compared on the same visible patches. Drawn on the CPU (the
    same noise for a seed whatever the device); callers move it to the model."""
    return torch.rand(1, num_patches, generator=torch.Generator().manual_seed(int(seed)), device="cpu")


@torch.no_grad()
def reconstruct(model: nn.Module, prepared: Prepared, labels: np.ndarray | None, region_id: int,
                mask_ratio: float, seed: int) -> dict[str, np.ndarray]:
    """``rmae.reconstruction.reconstruction_panels`` for one image → ``{name: uint8 [H, W, 3]}``.

    ``labels``: a label map ``[H, W]`` at the prepared size; a model with a region decoder gets its
    ``num_regions`` maps from it, region ``region_id`` first (:func:`region_stack`), or empty maps
    when there are no labels (an image without regions)."""
    device = model_device(model)
    cfg = model.config
    regions = None
    if cfg.has_region_branch:
        stack = region_stack(labels, region_id, cfg.num_regions) if labels is not None \
            else np.zeros((cfg.num_regions, *prepared.size), np.float32)
        regions = torch.from_numpy(stack)[None].to(device)
    noise = mask_noise(model.num_patches, seed).to(device)
    panels = reconstruction_panels(model.eval(), prepared.tensor().to(device), regions, noise=noise,
                                   mask_ratio=float(mask_ratio))
    out = {}
    for name, p in panels.items():
        img = (p[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        out[name] = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
    return out


# ------------------------------------------------------------------------------------------
# clicks (interactive segmentation)


def target_for_clicks(prepared: Prepared, clicks: list[int], patch: int, grid: tuple[int, int]
                      ) -> tuple[np.ndarray, int | None, str]:
    """The region the clicks select: with ground truth, the instance owning the first clicked
    patch (→ mask, instance id, "ground truth"); without, the FH segments under the clicks."""
    if prepared.instances is not None:
        owner, _ = patch_ownership(torch.from_numpy(prepared.instances).long(), patch)
        inst = int(owner.reshape(-1)[clicks[0]])
        if inst > 0:
            return prepared.instances == inst, inst, "ground truth"
        return np.zeros(prepared.instances.shape, bool), 0, "ground truth (background)"
    mask = np.asarray(segments_under_clicks(fh_segments(prepared.image), list(clicks), patch, grid), dtype=bool)
    return mask, None, "FH segments under the clicks"


@torch.no_grad()
def segment_from_clicks(model: nn.Module, prepared: Prepared, region: np.ndarray, clicks: list[int]) -> np.ndarray:
    """``analysis.interactive.predict_from_clicks`` for one image → probabilities ``[H, W]``."""
    device = model_device(model)
    prob = predict_from_clicks(model.eval(), prepared.tensor().to(device), torch.from_numpy(region)[None].to(device),
                               torch.tensor([list(clicks)], dtype=torch.long, device=device))
    return prob[0].float().cpu().numpy()


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    return float(binary_iou(torch.from_numpy(pred.astype(bool)), torch.from_numpy(target.astype(bool))))


def baselines(prepared: Prepared, clicks: list[int], patch: int, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """The interactive-segmentation baselines of ``analysis.interactive`` on the same clicks:
    ``clicked`` (the clicked patches alone) and ``fh`` (plus the FH segments under them)."""
    clicked = np.asarray(clicked_patches_mask(list(clicks), patch, grid), dtype=bool)
    fh = fh_baseline(prepared.image, list(clicks), patch, grid, FelzenszwalbSource(scales=FH_BASELINE_SCALES))
    return {"clicked": clicked, "fh": np.asarray(fh, dtype=bool)}
