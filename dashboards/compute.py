"""The dashboard's render path, without Streamlit: images in, numbers and pictures out.

Everything here is a plain function on numpy arrays / models so it can be tested and timed
directly (``benchmarks/bench_dashboard.py``); ``dashboards.pages`` wraps the expensive ones in
``st.cache_resource`` / ``st.cache_data``. The maths comes from :mod:`analysis`
(attention maps, rollout, patch ownership, DINO thresholding, click prediction); this module
only arranges it for display.

Conventions: a *prepared* image is what one run sees — ``uint8 [S, S, 3]`` at the run's
``img_size`` (short side resized, centre crop, nothing cut off: ``crop_pct = 1``) and, when
ground truth exists, its instance map ``int32 [S, S]`` resized with nearest neighbours. A
*query* is a point in relative image coordinates ``(fy, fx) ∈ [0, 1)²`` so runs with different
grids query the same place; each run turns it into its own patch index.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

#: side of the pictures the dashboard shows (pixels); maps are upsampled to it
DISPLAY = 256
#: upload limits: bytes of the file, and decoded pixels (w·h)
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
QUERY_COLOR = (0, 255, 255)
CLICK_COLOR = (255, 64, 64)


# ------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class Prepared:
    image: np.ndarray  # uint8 [S, S, 3]
    instances: np.ndarray | None  # int32 [S, S], 0 = background
    digest: str

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def tensor(self) -> torch.Tensor:
        from rmae.data import to_tensor

        return to_tensor(self.image)[None]


def digest(*arrays: np.ndarray | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def prepare(image: np.ndarray, instances: np.ndarray | None, size: int) -> Prepared:
    """Source image (``uint8 [H, W, 3]``, any size) → what a run of ``img_size = size`` sees."""
    from rmae.data import JointCenterCrop

    maps = {"instances": instances.astype(np.int32)} if instances is not None else {}
    img, maps = JointCenterCrop(int(size), crop_pct=1.0)(image, maps)
    inst = maps.get("instances")
    return Prepared(img, inst, digest(img, inst))


def decode_upload(data: bytes, name: str = "upload") -> np.ndarray:
    """Uploaded bytes → ``uint8 [H, W, 3]`` with the byte and pixel limits enforced before any
    pixel is decoded (``rmae.data.load_image`` refuses bombs, truncation, non-images)."""
    import tempfile
    from pathlib import Path

    from rmae.data import load_image

    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"{name}: {len(data) / 2**20:.1f} MiB is more than the upload limit of "
                         f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB; downscale or re-encode it")
    suffix = Path(name).suffix.lower()[:8] if Path(name).suffix else ".img"
    with tempfile.TemporaryDirectory(prefix="rmae-upload-") as d:
        path = Path(d) / f"upload{suffix}"
        path.write_bytes(data)
        return load_image(path, max_pixels=MAX_UPLOAD_PIXELS)


def to_display(image: np.ndarray, size: int = DISPLAY, nearest: bool = False) -> np.ndarray:
    """Resize ``uint8 [h, w, 3]`` (or ``[h, w]``) to ``size × size`` for display."""
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


def draw_box(image: np.ndarray, box: tuple[int, int, int, int], color=QUERY_COLOR, width: int = 2) -> np.ndarray:
    """Outline ``(y0, x0, y1, x1)`` (exclusive ends) on a copy of ``image``."""
    out = image.copy()
    y0, x0, y1, x1 = (int(v) for v in box)
    H, W = out.shape[:2]
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    w = max(1, width)
    out[y0:min(y0 + w, y1), x0:x1] = color
    out[max(y1 - w, y0):y1, x0:x1] = color
    out[y0:y1, x0:min(x0 + w, x1)] = color
    out[y0:y1, max(x1 - w, x0):x1] = color
    return out


def patch_box(index: int, grid: tuple[int, int], size: int = DISPLAY) -> tuple[int, int, int, int]:
    """Display-space box of patch ``index`` on a ``grid`` shown at ``size`` pixels."""
    r, c = divmod(int(index), grid[1])
    sy, sx = size / grid[0], size / grid[1]
    return (round(r * sy), round(c * sx), round((r + 1) * sy), round((c + 1) * sx))


def point_to_patch(point: tuple[float, float], grid: tuple[int, int]) -> int:
    """Relative point ``(fy, fx)`` → patch index on ``grid``."""
    fy, fx = point
    r = min(max(int(math.floor(fy * grid[0])), 0), grid[0] - 1)
    c = min(max(int(math.floor(fx * grid[1])), 0), grid[1] - 1)
    return r * grid[1] + c


def patch_center(row: int, col: int, grid: tuple[int, int]) -> tuple[float, float]:
    return ((row + 0.5) / grid[0], (col + 0.5) / grid[1])


def click_to_point(value: dict | None) -> tuple[float, float] | None:
    """``streamlit_image_coordinates`` value (display pixels) → relative point, or None."""
    if not value or "x" not in value or "y" not in value:
        return None
    w = float(value.get("width") or DISPLAY)
    h = float(value.get("height") or DISPLAY)
    fy = min(max(float(value["y"]) / h, 0.0), 0.999999)
    fx = min(max(float(value["x"]) / w, 0.0), 0.999999)
    return fy, fx


@lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(values01: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    idx = np.clip(np.nan_to_num(values01) * 255, 0, 255).round().astype(np.uint8)
    return _lut(cmap)[idx]


def overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.6, size: int = DISPLAY,
            box: tuple[int, int, int, int] | None = None, cmap: str = "inferno") -> np.ndarray:
    """A ``[gh, gw]`` map (min–max normalised, nearest-upsampled so patches stay visible) blended
    over the image at ``size`` pixels, with an optional query box."""
    a = amap.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    a01 = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    reps = (math.ceil(size / a.shape[0]), math.ceil(size / a.shape[1]))
    heat = colorize(np.kron(a01, np.ones(reps))[:size, :size], cmap) if size % a.shape[0] == 0 and size % a.shape[1] == 0 \
        else to_display(colorize(a01, cmap), size, nearest=True)
    base = to_display(image, size).astype(np.float32)
    out = ((1 - alpha) * base + alpha * heat.astype(np.float32)).round().clip(0, 255).astype(np.uint8)
    return draw_box(out, box) if box is not None else out


def mask_image(prob: np.ndarray, size: int = DISPLAY) -> np.ndarray:
    """A probability / binary map ``[H, W]`` in [0, 1] as a grey ``uint8 [size, size, 3]``."""
    g = (np.clip(prob, 0, 1) * 255).round().astype(np.uint8)
    return to_display(np.repeat(g[..., None], 3, axis=2), size, nearest=True)


def tint(image: np.ndarray, mask: np.ndarray, color=(255, 64, 64), alpha: float = 0.5, size: int = DISPLAY) -> np.ndarray:
    """Image with ``mask [H, W] bool`` tinted, at display size."""
    base = to_display(image, size).astype(np.float32)
    m = to_display((mask.astype(np.uint8) * 255), size, nearest=True) > 127
    out = base.copy()
    out[m] = (1 - alpha) * base[m] + alpha * np.asarray(color, np.float32)
    return out.round().astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# models


def grid_of(model) -> tuple[int, int]:
    g = model.patch_embed.grid_size
    return int(g[0]), int(g[1])


def describe(model) -> dict:
    c = model.config
    return {"family": c.family, "model": getattr(c, "name", None) or c.family, "img_size": int(c.img_size),
            "patch_size": int(c.patch_size), "grid": grid_of(model), "depth": int(c.depth),
            "heads": int(c.num_heads), "regions": bool(c.has_region_branch), "pixels": bool(c.has_pixel_branch)}


# ------------------------------------------------------------------------------------------
# attention


@torch.no_grad()
def attention_stack(model, prepared: Prepared) -> np.ndarray:
    """Every layer's attention for one image: float32 ``[depth, heads, N, N]`` (N = 1 + L)."""
    from analysis.attention import AttentionExtractor

    attn = AttentionExtractor(model.eval())(prepared.tensor())
    return torch.stack([a[0] for a in attn]).float().numpy()


def _agg(how: str | int):
    return int(how) if isinstance(how, int) or (isinstance(how, str) and how.isdigit()) else how


def attention_views(attn: np.ndarray, layer: int, how: str | int, query: int | None,
                    grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """The three maps the explorer shows for one run, each ``[gh, gw]`` float32:

    - ``"patch query"``: attention from the query patch at ``layer`` (paper Fig. 6);
    - ``"CLS"``: CLS → patch attention at ``layer``;
    - ``"rollout"``: attention rollout through layers ``0..layer``, from the query patch
      (from CLS when ``query`` is None).

    ``how``: ``"mean"``, ``"max"`` or a head index (also the rollout's head fusion).
    """
    from analysis.attention import aggregate_heads, cls_maps, patch_query_maps, rollout_maps

    how = _agg(how)
    a = torch.from_numpy(attn[layer])[None]  # [1, h, N, N]
    out = {}
    if query is not None:
        out["patch query"] = aggregate_heads(patch_query_maps(a, int(query), grid), how)[0].numpy()
    out["CLS"] = aggregate_heads(cls_maps(a, grid), how)[0].numpy()
    layers = [torch.from_numpy(attn[i])[None] for i in range(layer + 1)]
    out["rollout"] = rollout_maps(layers, grid, query=query, head_fusion=how)[0].numpy()
    return out


def query_row(attn: np.ndarray, layer: int, how: str | int, query: int) -> np.ndarray:
    """The query's attention over patch keys, each head renormalised over patch keys (cls key
    dropped, as in :mod:`analysis.metrics`), then heads aggregated and renormalised: ``[L]``."""
    row = torch.from_numpy(attn[layer][:, 1 + int(query), 1:]).double()  # [h, L]
    row = row / row.sum(-1, keepdim=True).clamp_min(1e-300)
    how = _agg(how)
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
    from analysis.metrics import keep_mass_threshold, patch_ownership

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
# regions, reconstruction, clicks


def fh_segments(image: np.ndarray) -> np.ndarray:
    """Felzenszwalb–Huttenlocher segments of an image (the middle of the paper's scales) ``[H, W]``."""
    from rmae.data import FelzenszwalbSource

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
    of the same grid, so runs are compared on the same visible patches."""
    return torch.rand(1, num_patches, generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def reconstruct(model, prepared: Prepared, regions: np.ndarray | None, mask_ratio: float, seed: int) -> dict[str, np.ndarray]:
    """``rmae.reconstruction.reconstruction_panels`` for one image → ``{name: uint8 [S, S, 3]}``."""
    from rmae.reconstruction import reconstruction_panels

    regions_t = torch.from_numpy(regions)[None] if (regions is not None and model.config.has_region_branch) else None
    panels = reconstruction_panels(model.eval(), prepared.tensor(), regions_t, noise=mask_noise(model.num_patches, seed),
                                   mask_ratio=float(mask_ratio))
    out = {}
    for name, p in panels.items():
        img = (p[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        out[name] = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
    return out


def target_for_clicks(prepared: Prepared, clicks: list[int], patch: int, grid: tuple[int, int]
                      ) -> tuple[np.ndarray, int | None, str]:
    """The region the clicks select: with ground truth, the instance owning the first clicked
    patch (→ mask, instance id, "ground truth"); without, the FH segments under the clicks."""
    if prepared.instances is not None:
        from analysis.interactive import patch_ownership as owners

        own = owners(torch.from_numpy(prepared.instances)[None].long(), patch)[0].numpy()
        inst = int(own[clicks[0]])
        if inst > 0:
            return prepared.instances == inst, inst, "ground truth"
        return np.zeros(prepared.instances.shape, bool), 0, "ground truth (background)"
    seg = fh_segments(prepared.image)
    mask = np.zeros(seg.shape, bool)
    for q in clicks:
        r, c = divmod(int(q), grid[1])
        mask |= seg == seg[r * patch + patch // 2, c * patch + patch // 2]
    return mask, None, "FH segments under the clicks"


@torch.no_grad()
def segment_from_clicks(model, prepared: Prepared, region: np.ndarray, clicks: list[int]) -> np.ndarray:
    """``analysis.interactive.predict_from_clicks`` for one image → probabilities ``[S, S]``."""
    from analysis.interactive import predict_from_clicks

    prob = predict_from_clicks(model.eval(), prepared.tensor(), torch.from_numpy(region)[None],
                               torch.tensor([list(clicks)], dtype=torch.long))
    return prob[0].numpy()


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    from analysis.interactive import iou as _iou

    return float(_iou(torch.from_numpy(pred.astype(bool))[None], torch.from_numpy(target.astype(bool))[None])[0])


def baselines(prepared: Prepared, clicks: list[int], patch: int, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """The interactive-segmentation baselines of ``analysis.interactive`` on the same clicks."""
    from analysis.interactive import fh_baseline
    from rmae.data import FelzenszwalbSource

    clicked = np.zeros(prepared.image.shape[:2], bool)
    for q in clicks:
        r, c = divmod(int(q), grid[1])
        clicked[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = True
    fh = fh_baseline(prepared.image, list(clicks), patch, grid, FelzenszwalbSource(scales=(1000.0,)))
    return {"clicked": clicked, "fh": fh}
