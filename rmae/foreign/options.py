"""The settings of importing a foreign encoder (``rmae import FILE --out RUN key=value``)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..settings import build, setting

#: What a foreign file can be (``source_kind`` of its run). ``timm``: any timm-layout state dict,
#: built as the architecture named by ``arch=``.
KINDS = ("dino", "dinov2", "ibot", "moco-v3", "deit", "deit-distilled", "beit", "beit-v2", "mae-finetuned",
         "hf-vitmae", "timm")
#: Human names of the kinds, for messages.
NAMES = {"dino": "DINO", "dinov2": "DINOv2", "ibot": "iBOT", "moco-v3": "MoCo v3", "deit": "DeiT",
         "deit-distilled": "distilled DeiT", "beit": "BEiT", "beit-v2": "BEiT v2",
         "mae-finetuned": "MAE fine-tuned (global pool)", "hf-vitmae": "Hugging Face ViTMAE", "timm": "timm ViT"}


@dataclass
class ImportOptions:
    img_size: int | tuple[int, int] | None = setting(
        None, "image size the encoder runs at; position embeddings are resampled by the original project's rule "
              "(default: the size they were trained at)", low=1)
    num_heads: int | None = setting(None, "attention heads, for widths whose convention is unknown", low=1)
    arch: str | None = setting(None, "timm architecture to build the weights as (default: chosen from the weights)")
    source: str | None = setting(None, f"what the file is, when its content cannot tell: {', '.join(KINDS)}",
                                 choices=KINDS)
    checkpoint_key: str | None = setting(
        None, "part of a training checkpoint: teacher (default) or student for DINO / iBOT / DINOv2, "
              "base_encoder (default) or momentum_encoder for MoCo v3")
    interpolate_offset: float | None = setting(
        None, "DINOv2 interpolate_offset of the original model (default 0.1; 0 with registers)", low=0)
    interpolate_antialias: bool | None = setting(
        None, "DINOv2 interpolate_antialias of the original model (default off; on with registers)")


OPTION_KEYS = tuple(f.name for f in fields(ImportOptions))


def import_options(values: dict[str, Any], source: str) -> ImportOptions:
    return build(ImportOptions, values, source)
