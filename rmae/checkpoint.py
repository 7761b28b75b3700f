"""Checkpoints: our safetensors format, and every foreign layout users hold, detected by content.

Our format: a ``.safetensors`` file of weights whose metadata carries the full model config
(``rmae_config``, JSON), so a single file rebuilds its model; run folders add ``config.yaml``.

:func:`load_model` accepts
- a run folder (``config.yaml`` + ``checkpoints/*.safetensors``, or ``model.safetensors``);
- our ``.safetensors`` (config in its metadata);
- an official MAE ``.pth``: ``{"model": sd}`` whole model (``mae_visualize_*``), encoder only
  (``mae_pretrain_*``), or a training ``checkpoint-N.pth`` with ``args`` (argparse.Namespace);
- an official R-MAE ``model_<update>.ckpt`` (``config`` dict beside the weights) or its bare
  final ``.pth`` state dict, keys possibly prefixed ``module.``;
- a timm ViT state dict (``.pth``/``.bin``/``.safetensors``);
- foreign encoders — DINO, DINOv2, iBOT, MoCo v3, DeiT, BEiT, MAE fine-tuned, Hugging Face
  ViTMAE — as timm models (:mod:`rmae.foreign`), and run folders of them.

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with one class
allow-listed (``argparse.Namespace``, what MAE's trainer saves), or safetensors. A file is
hostile until checked: only regular files are opened, the tensors that tell a config are checked
for rank and size before any arithmetic on their shapes, and the inferred config is range-checked
(:mod:`rmae.models.config`) before a weight is allocated — every failure is a one-line
:class:`CheckpointError` naming the file.

(Over 400 lines on purpose: detecting a layout, inferring its config and loading it share the
knowledge of every layout's key names; split, each part would need the others.)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .foreign.options import KINDS
from .io import atomic_write, is_regular_file, open_regular
from .models import MaskedAutoencoderViT, ModelConfig, build_model
from .models.config import HEADS_BY_WIDTH, model_keywords
from .settings import ConfigError
from .runfolder import RunFolder

FORMAT_KEY = "rmae_config"


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_model(model: MaskedAutoencoderViT, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save weights + config as one safetensors file (atomically). Returns the path."""
    meta = {"format": "rmae", FORMAT_KEY: json.dumps(model.config.to_dict())}
    meta.update(metadata or {})
    sd = _contiguous(model.state_dict())
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


# ------------------------------------------------------------------------------------------
# reading files


def _sniff(path: Path) -> str:
    """'safetensors' | 'torch-zip' | 'torch-legacy' by the file's first bytes."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be opened as a checkpoint ({e})") from None
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n + 8 <= size:
            return "safetensors"
        raise CheckpointError(f"{path}: safetensors header says {n} bytes but the file has {size}: "
                              "the file is truncated; copy or download it again")
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a torch.save file); "
                          "pass a .safetensors/.pth/.ckpt file or a run folder")


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = refused_class(e)
        if refused is None:  # damaged bytes, not a refused class
            raise CheckpointError(f"{path}: cannot be read as a torch checkpoint (not a torch.save file); the file is "
                                  "probably truncated or corrupt — copy or download it again") from None
        raise CheckpointError(
            f"{path}: refused — the file contains pickled objects other than tensors and plain "
            f"containers ({refused}). rmae never runs code from a checkpoint. "
            "If you trust the file, re-save just its weights: "
            "torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth')"
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways inside torch.load; all mean the same
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({type(e).__name__}: {_first_line(e)}); "
                              "the file is probably truncated or corrupt — copy or download it again") from None


def refused_class(e: pickle.UnpicklingError) -> str | None:
    """The class ``torch.load(weights_only=True)`` refused to unpickle (``GLOBAL posix.system``),
    or None when the error is damaged bytes rather than a refusal."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"GLOBAL {m.group(1)}" if m else None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({_first_line(e)}); the file is probably truncated "
                              "or corrupt — copy it again") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "module", "ema"):
            if key in obj and _is_state_dict(obj[key]):
                return obj[key]
    found = sorted(map(str, obj))[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no state dict found (top level holds {str(found)[:200]}); expected a non-empty "
                          "dict of names to tensors, or {'model': such a dict}")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


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


def read_object(path: str | os.PathLike) -> tuple[Any, dict[str, str], str]:
    """Read any supported file → (what it holds, safetensors metadata, "safetensors" | "torch").
    A safetensors file holds a state dict; a torch file whatever plain containers it pickled."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder without weights; pass a checkpoint file or a run folder")
    if not is_regular_file(path):
        raise CheckpointError(f"{path}: not a regular file (a device, pipe or socket); pass a checkpoint file")
    fmt = _sniff(path)
    if fmt == "safetensors":
        sd, meta = _load_safetensors(path)
        return sd, meta, fmt
    return _torch_load(path), {}, "torch"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read any supported file → (state dict without wrapper prefixes, config-or-hints, format).

    The second item is the full saved config (a dict with a ``family`` key) for our files,
    or hints recovered from foreign files.
    """
    return _interpret(*read_object(path), Path(path))


def _interpret(obj: Any, meta: dict[str, str], fmt: str, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    if fmt == "safetensors":
        sd = obj
        if FORMAT_KEY in meta:
            try:
                cfg = json.loads(meta[FORMAT_KEY])
            except (ValueError, TypeError):
                cfg = None
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{path}: its {FORMAT_KEY} metadata is not a JSON object (the file was edited or "
                                      "damaged); re-export it, or load the weights with an explicit model")
            return _strip_prefixes(sd), cfg, "rmae"
        return _strip_prefixes(sd), {}, "safetensors"
    return _strip_prefixes(_find_state_dict(obj, path)), _hints_from_file(obj), "torch"


def load_model(path: str | os.PathLike, strict: bool = True, **overrides: Any) -> MaskedAutoencoderViT:
    """Load any supported checkpoint (see module docstring) into a model, detected by content.

    ``overrides`` are model keywords the file cannot tell (``norm_pix_loss=False``,
    ``num_regions=16``, ``num_heads=…``). The returned model has ``.source`` (the file read)
    and ``.source_kind`` (what it was detected as). Raises :class:`CheckpointError`.

    Foreign encoders (:mod:`rmae.foreign`: DINO, DINOv2, iBOT, MoCo v3, DeiT, BEiT, MAE
    fine-tuned, Hugging Face ViTMAE) and run folders of them come back as timm models (eval mode,
    CPU); their settings are :class:`rmae.foreign.ImportOptions` (``img_size``, ``arch``, …).
    """
    from . import foreign

    path = Path(path)
    bad = sorted(set(overrides) - set(model_keywords()) - set(foreign.OPTION_KEYS))
    if bad:
        raise TypeError(f"unknown model keyword(s) {bad}; valid: {model_keywords()} and, for foreign encoders, "
                        f"{list(foreign.OPTION_KEYS)}")
    folder_config = None
    if path.is_dir():
        run = RunFolder(path)
        # -- foreign encoders (rmae.foreign): a run folder recording a timm architecture ----------
        if foreign.is_timm_run(run):
            return foreign.load_run(run, overrides)
        # ------------------------------------------------------------------------------------------
        folder_config = run.model_config()
        path = run.weights_path()
    obj, meta, fmt = read_object(path)
    # -- foreign encoders (rmae.foreign): DINO, DINOv2, iBOT, MoCo v3, DeiT, BEiT, HF ViTMAE, … ----
    if folder_config is None and FORMAT_KEY not in meta:
        imported = foreign.from_object(obj, meta, path, overrides)
        if imported is not None:
            model = foreign.build(imported, overrides.get("img_size"))
            model.source = str(path)
            return model
    unfit = sorted(k for k in overrides if k not in model_keywords())
    if unfit:
        raise CheckpointError(f"{path}: {', '.join(unfit)} apply to foreign encoders; this file is rmae's own, "
                              "an official MAE / R-MAE or a plain timm ViT (leave them out)")
    # ------------------------------------------------------------------------------------------
    sd, info, fmt = _interpret(obj, meta, fmt, path)

    if fmt == "rmae" or folder_config is not None:
        cfg_dict = dict(folder_config or info)
        cfg_dict.update(overrides)
        try:
            config = ModelConfig.from_dict(cfg_dict)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its saved config does not build a model ({e}); re-export it, or load "
                                  "the weights with an explicit model") from None
        kind = "rmae"
    else:
        config, kind = infer_config(sd, path, {**info, **overrides})

    with torch.device("cpu"):  # weights are read on the CPU; the caller moves the model where it runs
        model = build_model(config)
    _load_weights(model, sd, path, kind, strict)
    model.source, model.source_kind = str(path), kind
    return model


def _load_weights(model: MaskedAutoencoderViT, sd: dict[str, torch.Tensor], path: Path, kind: str, strict: bool) -> None:
    own = model.state_dict()
    sd = dict(sd)
    dropped = [k for k in list(sd) if k in _IGNORABLE and k not in own]
    for k in dropped:
        sd.pop(k)
    if not model.config.has_pixel_branch:
        # RAE-only files written by other code may carry an unused pixel-decoder stem.
        for k in [k for k in sd if k.startswith(("decoder_", "mask_token")) and k not in own]:
            sd.pop(k)
    encoder_only = kind.startswith("ViT encoder only")
    expected = {k for k in own if not encoder_only or not k.startswith(("decoder_", "mask_token"))}
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if strict and (missing or unexpected or mismatched):
        parts = [f"{path}: does not fit the model built for it ({kind})"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        parts.extend(f"shape of {k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}" for k in mismatched[:8])
        parts.append(f"the file looks like: {describe_layout(sd)}")
        raise CheckpointError("; ".join(parts) + ". Pass the settings it cannot tell as keywords "
                              "(e.g. img_size=, num_regions=, region_variant=)")
    for k in mismatched:
        sd.pop(k)
    model.load_state_dict(sd, strict=False)
    if dropped:
        warnings.warn(f"{path}: ignored {', '.join(sorted(set(_IGNORABLE[k] or k for k in dropped)))} ({len(dropped)} keys)")


# ------------------------------------------------------------------------------------------
# timm export

_TIMM_SIZE = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def timm_spec(config: ModelConfig) -> tuple[str, dict[str, Any]]:
    """The timm model name and keywords that build this model's encoder (``num_classes=0``)."""
    size = _TIMM_SIZE.get(config.embed_dim)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=config.img_size if isinstance(config.img_size, int) else list(config.img_size), patch_size=config.patch_size,
                                  in_chans=config.in_chans)
    if size is None or HEADS_BY_WIDTH[config.embed_dim] != config.num_heads:
        name = "vit_base_patch16_224"
        kwargs.update(embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads)
    else:
        name = f"vit_{size}_patch{14 if size == 'huge' else 16}_224"
        if config.depth != {"tiny": 12, "small": 12, "base": 12, "large": 24, "huge": 32}[size]:
            kwargs["depth"] = config.depth
    if config.mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = config.mlp_ratio
    return name, kwargs


def encoder_state_dict(model: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def export_timm(model: MaskedAutoencoderViT, path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Write the encoder as a timm ``VisionTransformer`` state dict; returns (timm name, kwargs).

    ``.safetensors`` (default) records the timm name and keywords in its metadata; any other
    suffix is written with ``torch.save``. Load with::

        vit = timm.create_model(name, **kwargs)        # kwargs include num_classes=0
        vit.load_state_dict(safetensors.torch.load_file(path), strict=True)
    """
    name, kwargs = timm_spec(model.config)
    sd = _contiguous(encoder_state_dict(model))
    path = Path(path)
    if path.suffix == ".safetensors":
        meta = {"format": "timm", "timm_model": name, "timm_kwargs": json.dumps(kwargs)}
        atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    else:
        atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return name, kwargs
