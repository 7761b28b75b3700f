"""Layouts: what the key names and shapes of a state dict say about the model that wrote it.

The official MAE (``models_mae.py``) and R-MAE (``RegionQueryRMAE``) layouts and plain timm ViTs
are read into our :class:`~rmae.models.ModelConfig`: depth, widths and the region branch from the
keys; head counts from the official conventions (no state dict records them); hints a training
checkpoint records beside its weights (MAE's ``args``, R-MAE's ``config``). Shapes are checked
for rank and size before any arithmetic on them, and the inferred config is range-checked before
a weight is allocated: a hostile file ends in one :class:`CheckpointError` line.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .foreign.options import KINDS
from .models import ModelConfig
from .models.config import HEADS_BY_WIDTH
from .settings import ConfigError


def _find_key(obj: Any, key: str, depth: int = 8) -> Any:
    """Depth-first search of nested dicts for a key (official configs nest model params some
    levels deep); at most ``depth`` levels, so a hostile file cannot make it recurse without end."""
    if isinstance(obj, dict) and depth > 0:
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key, depth - 1)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------------------------------
# layout detection and config inference


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"\.(\d{1,9})\.", k))}
    return max(idx) + 1 if idx else 0


# The tensors whose shapes tell a model's config, and their ranks.
_SHAPE_KEYS = {"patch_embed.proj.weight": 4, "pos_embed": 3, "blocks.0.mlp.fc1.weight": 2,
               "region_patch_embed.proj.weight": 4, "region_cross_embed.weight": 2, "decoder_embed.weight": 2,
               "head.weight": 2}


def _check_shapes(sd: dict[str, torch.Tensor], path: Path) -> None:
    """The config-telling tensors have their rank and no empty dimension; patches are square."""
    for key, rank in _SHAPE_KEYS.items():
        if key in sd and (sd[key].ndim != rank or 0 in sd[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {list(sd[key].shape)}, not a {rank}-d tensor of a ViT; "
                                  "the file is not an MAE / R-MAE / timm ViT checkpoint")
    for key in ("patch_embed.proj.weight", "region_patch_embed.proj.weight"):
        if key in sd and sd[key].shape[2] != sd[key].shape[3]:
            raise CheckpointError(f"{path}: {key} has non-square patches {list(sd[key].shape[2:])}; "
                                  "MAE / R-MAE / timm ViTs have square ones")


def describe_layout(sd: dict[str, torch.Tensor]) -> str:
    """A human description of what a state dict looks like (for error messages)."""
    if any(key in sd and sd[key].ndim != rank for key, rank in _SHAPE_KEYS.items()):
        return f"not a ViT state dict (tensors of unexpected rank; keys start {sorted(sd)[:5]})"
    if "patch_embed.proj.weight" not in sd:
        return f"not a ViT state dict (no patch_embed.proj.weight; keys start {sorted(sd)[:5]})"
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    n = sd["pos_embed"].shape[1] if "pos_embed" in sd else "?"
    parts = [f"ViT encoder width {D}, depth {_count(sd, 'blocks')}, patch {p}, {C} channels, {n} positions"]
    if "decoder_embed.weight" in sd:
        parts.append(f"MAE pixel decoder {sd['decoder_embed.weight'].shape[0]}-d × {_count(sd, 'decoder_blocks')}")
    if "region_patch_embed.proj.weight" in sd:
        parts.append(f"R-MAE region branch {sd['region_patch_embed.proj.weight'].shape[0]}-d, "
                     f"neck depth {_count(sd, 'region_cross_blocks')}, decoder depth {_count(sd, 'region_dec_blocks')}")
    if "head.weight" in sd:
        parts.append(f"classifier head {sd['head.weight'].shape[0]} classes")
    return "; ".join(parts)


# Keys a foreign file may carry that our models do not have, and why they can be dropped.
_IGNORABLE = {
    "head.weight": "classifier head", "head.bias": "classifier head",
    "fc_norm.weight": None, "fc_norm.bias": None,  # None: cannot be ignored, see _check_timm_features
}


def _check_timm_features(sd: dict[str, torch.Tensor], path: Path) -> None:
    unsupported = []
    if "cls_token" not in sd:
        unsupported.append("no class token")
    if "reg_token" in sd:
        unsupported.append("register tokens")
    if any(".ls1." in k or ".ls2." in k for k in sd):
        unsupported.append("LayerScale")
    if any(".q_norm." in k or ".k_norm." in k for k in sd):
        unsupported.append("q/k norm")
    if "fc_norm.weight" in sd and "norm.weight" not in sd:
        unsupported.append("global-average-pool head (fc_norm instead of norm)")
    if unsupported:
        raise CheckpointError(f"{path}: this ViT has {', '.join(unsupported)}, which MAE/R-MAE encoders do not, and "
                              f"its content does not tell which project made it; pass source=KIND ({', '.join(KINDS)}) "
                              f"or arch=TIMM_NAME (e.g. arch=vit_small_patch14_dinov2) to import it as a timm "
                              f"architecture. The file looks like: {describe_layout(sd)}")


def infer_config(sd: dict[str, torch.Tensor], path: Path, hints: dict[str, Any]) -> tuple[ModelConfig, str]:
    """Model config from key names and shapes (+ hints read from the file). Returns (config, kind)."""
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight")
    if any(k not in sd for k in needed):
        missing = [k for k in needed if k not in sd]
        raise CheckpointError(f"{path}: {describe_layout(sd)}; expected an MAE / R-MAE / timm ViT checkpoint "
                              f"(missing {', '.join(missing)})")
    _check_shapes(sd, path)
    _check_timm_features(sd, path)
    if "pos_embed" not in sd:
        raise CheckpointError(f"{path}: a ViT without an absolute position embedding ({describe_layout(sd)}); pass "
                              f"source=KIND ({', '.join(KINDS)}) or arch=TIMM_NAME to import it as a timm architecture")
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    cfg: dict[str, Any] = dict(embed_dim=D, in_chans=C, patch_size=p, depth=_count(sd, "blocks"),
                               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D)
    if D in HEADS_BY_WIDTH:
        cfg["num_heads"] = HEADS_BY_WIDTH[D]
    elif "num_heads" not in hints:
        raise CheckpointError(f"{path}: encoder width {D} is not a standard ViT size, so its head count is unknown; "
                              "pass it: load_model(path, num_heads=N)")
    n_pos = sd["pos_embed"].shape[1] - 1
    g = int(round(n_pos**0.5))
    if g * g == n_pos:
        cfg["img_size"] = g * p
    elif "img_size" not in hints:
        raise CheckpointError(f"{path}: {n_pos} positions is not a square grid; pass img_size=(H, W)")

    has_region = "region_patch_embed.proj.weight" in sd
    has_pixel_dec = "decoder_pred.weight" in sd
    if has_region and "region_cross_embed.weight" not in sd:
        raise CheckpointError(f"{path}: has a region encoder but no region_cross_embed.weight (the neck); "
                              "the R-MAE checkpoint is incomplete")
    if has_region:
        kind = "official R-MAE" if "region_proj.1.weight" in sd and "region_dec_mask_token" not in sd else "R-MAE"
        cfg["family"] = "rmae" if has_pixel_dec else "rae"
        pE, k_in = sd["region_patch_embed.proj.weight"].shape[:2]
        cfg.update(region_enc_dim=pE, region_dec_dim=sd["region_cross_embed.weight"].shape[0],
                   region_enc_depth=_count(sd, "region_enc_blocks"), region_neck_depth=_count(sd, "region_cross_blocks"),
                   region_dec_depth=_count(sd, "region_dec_blocks"), region_heads=8)
        if "region_dec_mask_token" in sd:
            cfg["region_variant"] = "channel" if k_in > 1 else "batch"
            if k_in > 1:
                cfg["num_regions"] = k_in
        else:
            cfg["region_variant"] = "length"
    elif "decoder_embed.weight" in sd:
        kind, cfg["family"] = "official MAE (whole model)", "mae"
    else:
        kind, cfg["family"] = "ViT encoder only (MAE encoder release or timm); decoder freshly initialised", "mae"
    if "decoder_embed.weight" in sd and has_pixel_dec:
        cfg.update(decoder_dim=sd["decoder_embed.weight"].shape[0], decoder_depth=_count(sd, "decoder_blocks"),
                   decoder_heads=16)
    cfg.update(hints)
    try:
        return ModelConfig(**cfg), kind
    except ConfigError as e:  # e.g. 300 blocks, or a hint of the wrong type
        raise CheckpointError(f"{path}: the model it describes cannot be built ({e})") from None


def _hints_from_file(obj: Any) -> dict[str, Any]:
    """Model settings a checkpoint records beside its weights (MAE args, R-MAE config)."""
    hints: dict[str, Any] = {}
    if not isinstance(obj, dict):
        return hints
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):  # official MAE training checkpoint
        a = vars(args)
        for ours, theirs in (("norm_pix_loss", "norm_pix_loss"), ("mask_ratio", "mask_ratio")):
            if theirs in a:
                hints[ours] = a[theirs]
    config = obj.get("config")
    if isinstance(config, dict):  # official R-MAE trainer checkpoint: model_config.rmae.mae_vit.params
        model_config = config.get("model_config", config)
        vit = _find_key(model_config, "mae_vit")
        params = vit.get("params", {}) if isinstance(vit, dict) else {}
        for ours, theirs in (("num_regions", "num_region"), ("norm_pix_loss", "norm_pix_loss"),
                             ("bg_loss_weight", "bg_loss_weight"), ("region_loss_weight", "region_loss_weight"),
                             ("region_heads", "region_dec_num_heads"), ("region_mask_ratio", "region_mask_ratio")):
            if params.get(theirs) is not None:
                hints[ours] = params[theirs]
        if hints.get("num_regions") == 0:  # the base config's placeholder, not a real k
            hints.pop("num_regions")
        mask_ratio = _find_key(model_config, "mask_ratio")
        if isinstance(mask_ratio, float):
            hints["mask_ratio"] = mask_ratio
        if hints.get("region_mask_ratio") == hints.get("mask_ratio", 0.75):
            hints.pop("region_mask_ratio", None)  # equal ratios: the shared mask, nothing to record
    return hints
