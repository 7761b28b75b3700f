"""What a checkpoint is, told by its content (key names, nesting, shapes) — never its file name.

``detect`` looks at what ``torch.load(weights_only=True)`` / safetensors returned and answers
with the encoder's weights (wrappers and prefixes removed, keys as the project saved them) and
its kind, or None for the files rmae's own model holds (ours, official MAE / R-MAE, a plain timm
ViT — :mod:`rmae.checkpoint`). The signatures, in the order they are tried:

- ``teacher`` / ``student`` dicts of ``backbone.*`` (DINO's, iBOT's and DINOv2's training
  checkpoints; DINOv2's heads are ``dino_head`` / ``ibot_head``, iBOT's file has ``ibot_loss``);
- ``state_dict`` of ``module.base_encoder.*`` (MoCo v3's training checkpoint);
- safetensors written by ``rmae export`` of a foreign run (``rmae_arch`` in its metadata);
- Hugging Face ViTMAE (``vit.embeddings.*`` / ``embeddings.patch_embeddings.*``);
- relative position tables or ``q_bias`` (BEiT; ``cls_pt_layers`` makes it BEiT v2);
- a 2-D ``mask_token`` (DINOv2 release, with or without ``register_tokens``);
- ``decoder_*`` / ``region_*`` → None (MAE / R-MAE, rmae's own model);
- ``dist_token`` (distilled DeiT); ``masked_embed`` (iBOT student);
- ``fc_norm`` without ``norm`` inside ``{"model": …}`` (MAE fine-tuned with global pooling);
- a position embedding equal to MoCo v3's sin-cos (MoCo v3 converted to DeiT's layout);
- MAE's sin-cos position embedding → None (MAE encoder release, an ``rmae export``);
- ``{"state_dict": plain ViT}`` without a head (iBOT's ``checkpoint_teacher.pth``);
- ``{"model": plain ViT with a classifier head}`` (DeiT);
- a bare plain ViT without a head and with a learned position embedding (DINO's release files).

What no signature can tell apart (a BEiT v2 fine-tuned file looks like a BEiT one; a DeiT like
an MAE fine-tuned with its cls token) is named by ``source=KIND``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .options import NAMES, ImportOptions


@dataclass
class Found:
    """An encoder's weights as the original project saved them, and what they are."""

    kind: str
    state_dict: dict[str, torch.Tensor]
    how: str  # e.g. "DINO training checkpoint (teacher)", for the import summary
    extra: dict[str, Any] = field(default_factory=dict)


def _is_state_dict(obj: Any) -> bool:
    # Keys must be names: a dict under number keys is nobody's state dict (and would break prefix tests).
    return isinstance(obj, dict) and len(obj) > 0 \
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _under(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def detect(obj: Any, meta: dict[str, str], path: Path, options: ImportOptions) -> Found | None:
    """The foreign encoder in ``obj`` (see module docstring), or None when rmae's own model holds it."""
    if isinstance(obj, dict) and any(_is_state_dict(obj.get(k)) for k in ("teacher", "student")):
        return _self_distillation(obj, path, options)
    if isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")) \
            and any(k.startswith(("module.base_encoder.", "base_encoder.")) for k in obj["state_dict"]):
        return _moco(obj, path, options)
    if options.checkpoint_key is not None:
        raise CheckpointError(f"{path}: checkpoint_key={options.checkpoint_key} applies to training checkpoints "
                              "(DINO / iBOT / DINOv2 teacher or student, MoCo v3 base or momentum encoder); this "
                              "file holds one encoder — leave checkpoint_key out")
    if "rmae_arch" in meta:
        return Found("timm", obj, "an `rmae export` of a foreign encoder", {"arch": meta["rmae_arch"]})
    sd, wrapper = _state_dict(obj)
    if sd is None:
        return None
    sd = _strip(sd)
    if options.source is not None:
        return Found(options.source, sd, f"{NAMES[options.source]} (source={options.source})", _hf_extra(sd, path))
    kind = _kind(sd, wrapper)
    if kind is None:
        return Found("timm", sd, f"a ViT state dict built as {options.arch}") if options.arch else None
    how = {"dino": "DINO release (bare state dict)", "ibot": "iBOT backbone", "deit": "DeiT ({'model': …} with a "
           "classifier head)", "moco-v3": "MoCo v3 ViT (sin-cos position embedding)"}.get(kind, NAMES[kind])
    return Found(kind, sd, how, _hf_extra(sd, path) if kind == "hf-vitmae" else {})


def _state_dict(obj: Any) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module", "model_state_dict", "ema"):
            if _is_state_dict(obj.get(key)):
                return obj[key], key
    return None, None


def _kind(sd: dict[str, torch.Tensor], wrapper: str | None) -> str | None:
    keys = set(sd)
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf-vitmae"
    if "patch_embed.proj.weight" not in keys:
        return None
    if any(k.endswith((".relative_position_bias_table", ".attn.q_bias")) for k in keys):
        return "beit-v2" if any(k.startswith("cls_pt_layers.") for k in keys) else "beit"
    if "mask_token" in keys and sd["mask_token"].ndim == 2:
        return "dinov2"
    if any(k.startswith(("decoder_", "region_")) for k in keys):
        return None  # MAE / R-MAE
    if "dist_token" in keys:
        return "deit-distilled"
    if "masked_embed" in keys:
        return "ibot"
    if "fc_norm.weight" in keys and "norm.weight" not in keys and wrapper == "model":
        return "mae-finetuned"
    pos = sd.get("pos_embed")
    if pos is None or "cls_token" not in keys or pos.ndim != 3:
        return None
    if _is_sincos(pos, "mocov3"):
        return "moco-v3"
    if _is_sincos(pos, "mae") or any(k.startswith(("fc_norm.", "reg_token")) or ".ls1." in k for k in keys):
        return None  # MAE's encoder (or an rmae export), or a timm ViT rmae's model refuses with its reasons
    head = "head.weight" in keys
    if wrapper == "state_dict" and not head:
        return "ibot"
    if wrapper == "model" and head:
        return "deit"
    if wrapper is None and not head:
        return "dino"
    return None


def _is_sincos(pos: torch.Tensor, which: str) -> bool:
    """Whether ``pos [1, 1 + g·g, D]`` is MoCo v3's or MAE's fixed sin-cos embedding."""
    import math

    n, dim = pos.shape[1] - 1, pos.shape[2]
    g = math.isqrt(n)
    if g * g != n or dim % 4:
        return False
    if which == "mocov3":
        from .resample import mocov3_sincos

        ref = mocov3_sincos((g, g), dim)
    else:
        from ..models.layers import sincos_pos_embed

        ref = sincos_pos_embed(dim, (g, g))
    return bool(torch.allclose(pos.float(), ref, atol=1e-5))


def _self_distillation(obj: dict, path: Path, options: ImportOptions) -> Found:
    """DINO / iBOT / DINOv2 training checkpoints: the backbone of ``teacher`` (or ``student``)."""
    branches = [k for k in ("teacher", "student") if _is_state_dict(obj.get(k))]
    key = options.checkpoint_key or "teacher"
    if key not in branches:
        raise CheckpointError(f"{path}: this training checkpoint has {' and '.join(branches)}, not {key!r}; "
                              f"pass checkpoint_key={branches[0]}")
    sd = _strip(obj[key])
    backbone = _under(sd, "backbone.")
    if not backbone:
        raise CheckpointError(f"{path}: its {key} has no backbone.* weights (keys start {sorted(sd)[:4]}); "
                              "expected a DINO / iBOT / DINOv2 training checkpoint")
    if options.source is not None:
        kind = options.source
    elif any(k.startswith(("dino_head.", "ibot_head.")) for k in sd) or "register_tokens" in backbone \
            or ("mask_token" in backbone and backbone["mask_token"].ndim == 2):
        kind = "dinov2"
    elif "ibot_loss" in obj or "masked_embed" in backbone:
        kind = "ibot"
    else:
        kind = "dino"
    return Found(kind, backbone, f"{NAMES[kind]} training checkpoint ({key})")


def _moco(obj: dict, path: Path, options: ImportOptions) -> Found:
    """MoCo v3's training checkpoint: ``base_encoder`` (or ``momentum_encoder``) without its
    projection head (MoCo puts an MLP projector where the classifier head was)."""
    key = options.checkpoint_key or "base_encoder"
    if key not in ("base_encoder", "momentum_encoder"):
        raise CheckpointError(f"{path}: a MoCo v3 checkpoint holds base_encoder and momentum_encoder, not {key!r}")
    sd = _under(_strip(obj["state_dict"]), f"{key}.")
    if "patch_embed.proj.0.weight" in sd:
        raise CheckpointError(f"{path}: a MoCo v3 ViT with a convolutional stem (vit_conv_*), which no timm "
                              "architecture holds; only the ViT-S/B/L with a patch embedding can be imported")
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"{path}: its MoCo v3 {key} is not a ViT (keys start {sorted(sd)[:4]}); "
                              "ResNet encoders are not analysed by rmae")
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    return Found(options.source or "moco-v3", sd, f"MoCo v3 training checkpoint ({key})", {"moco_arch": arch})


def _hf_extra(sd: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` saved beside the weights (``save_pretrained``): it records
    what the state dict cannot (heads, LayerNorm eps)."""
    from ..io import read_text

    cfg = path.parent / "config.json"
    if not any(k.startswith(("vit.embeddings.", "embeddings.")) for k in sd) or not cfg.is_file():
        return {}
    try:
        doc = json.loads(read_text(cfg, 1 << 20))
    except (OSError, ValueError):
        return {}
    return {"hf_config": doc} if isinstance(doc, dict) else {}
