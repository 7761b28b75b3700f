"""rmae — MAE, RAE and R-MAE Vision Transformers: models, data, training, checkpoints.

    import rmae
    model = rmae.create_model("rmae_vit_tiny_patch8", img_size=64, num_regions=8)
    out = model(images, regions=regions, mask_ratio=0.75)   # out.loss, out.pred_region, out.mask
    model = rmae.load_model("runs/demo-rmae")                # or an official / timm checkpoint
    rmae.export_timm(model, "encoder.safetensors")
"""

from .checkpoint import CheckpointError, load_model, save_model
from .export import export_timm
from .models import (
    MaskedAEOutput,
    MaskedAutoencoderViT,
    ModelConfig,
    build_model,
    create_model,
    explicit_attention,
    list_models,
    model_keywords,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "MaskedAEOutput", "MaskedAutoencoderViT", "ModelConfig", "build_model", "create_model",
    "explicit_attention", "export_timm", "list_models", "load_model", "model_keywords", "save_model",
]
