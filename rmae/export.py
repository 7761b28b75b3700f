"""Writing a model's encoder as a timm ``VisionTransformer`` state dict (``rmae export``)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .io import save_state_dict
from .models import MaskedAutoencoderViT, ModelConfig
from .models.config import HEADS_BY_WIDTH


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
    meta = {"format": "timm", "timm_model": name, "timm_kwargs": json.dumps(kwargs)}
    save_state_dict(encoder_state_dict(model), path, meta)
    return name, kwargs
