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

Which key names mean which model (official MAE / R-MAE, timm ViTs) is :mod:`rmae.layouts`;
writing an encoder for timm is :mod:`rmae.export`; foreign encoders are :mod:`rmae.foreign`.
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
from safetensors.torch import load_file

from .errors import CheckpointError
from .io import is_regular_file, open_regular, save_state_dict
from .models import MaskedAutoencoderViT, ModelConfig, build_model
from .models.config import model_keywords
from .layouts import _IGNORABLE, _hints_from_file, describe_layout, infer_config
from .runfolder import RunFolder

FORMAT_KEY = "rmae_config"


def save_model(model: MaskedAutoencoderViT, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save weights + config as one safetensors file (atomically). Returns the path."""
    meta = {"format": "rmae", FORMAT_KEY: json.dumps(model.config.to_dict())}
    meta.update(metadata or {})
    return save_state_dict(model.state_dict(), path, meta, safetensors=True)


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
