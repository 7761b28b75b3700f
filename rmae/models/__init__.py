"""Model registry: ``create_model(name, **keywords)`` for MAE / RAE / R-MAE ViTs."""

from __future__ import annotations

from typing import Any

from .config import FAMILIES, REGION_VARIANTS, VIT_SIZES, ModelConfig, config_from_name, list_models, model_keywords
from .layers import explicit_attention, set_fused_attention
from .rmae import MaskedAEOutput, MaskedAutoencoderViT


def create_model(name: str, **keywords: Any) -> MaskedAutoencoderViT:
    """Build a registered model, e.g. ``create_model("rmae_vit_tiny_patch8", img_size=64)``.

    Keywords are the model keywords (``img_size``, ``mask_ratio``, ``norm_pix_loss``,
    ``decoder_dim``, ``num_regions``, ``region_variant``, …; see ``model_keywords()``).
    """
    return MaskedAutoencoderViT(config_from_name(name, **keywords))


def build_model(config: ModelConfig | dict) -> MaskedAutoencoderViT:
    """Build from a full :class:`ModelConfig` (or its dict form, as saved in checkpoints)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return MaskedAutoencoderViT(config)


__all__ = [
    "FAMILIES", "REGION_VARIANTS", "VIT_SIZES", "ModelConfig", "MaskedAEOutput", "MaskedAutoencoderViT",
    "build_model", "create_model", "explicit_attention", "list_models", "model_keywords", "set_fused_attention",
]
