"""Encoders in timm's ``VisionTransformer`` layout: DINO, iBOT, MoCo v3, DeiT (also distilled),
MAE fine-tuned with global pooling, and any timm ViT named by ``arch=``.

Their keys are timm's already (these projects built on timm's ViT); timm's own
``checkpoint_filter_fn`` (``vision_transformer.py``, ``deit.py``) brings over the rest (iBOT's
``gamma_1`` LayerScale). What differs between them is the head count convention, the prefix
tokens and how the position embedding follows another image size (:mod:`.resample`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .detect import Found
from .options import NAMES, ImportOptions
from .timm_arch import SIZE_BY_WIDTH, Imported, TimmArch, convert_with_timm, count_blocks, grid_of, mlp_ratio, num_heads, pick_name

#: MoCo v3's ViTs have 12 heads at width 384 and 768 (``vits.py``), 16 at 1024.
MOCO_HEADS = {384: 12, 768: 12, 1024: 16}
RESAMPLE = {"dino": {"pos_embed": "dino", "offset": 0.1}, "ibot": {"pos_embed": "dino", "offset": 0.1},
            "moco-v3": {"pos_embed": "sincos"}, "deit": {"pos_embed": "bicubic"},
            "deit-distilled": {"pos_embed": "bicubic"}, "mae-finetuned": {"pos_embed": "bicubic"},
            "timm": {"pos_embed": "timm"}}


def convert(found: Found, options: ImportOptions, path: Path) -> Imported:
    sd = dict(found.state_dict)
    notes = []
    if sd.pop("masked_embed", None) is not None:  # iBOT's masked-image-modelling token: training only
        notes.append("dropped masked_embed (iBOT's mask token, used in training only)")
    if found.kind == "timm" and options.arch is None:
        raise CheckpointError(f"{path}: source=timm needs arch=TIMM_NAME (the timm architecture of these weights)")
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise CheckpointError(f"{path}: not a ViT in timm's layout (keys start {sorted(sd)[:4]}), so it cannot be read "
                              f"as {NAMES[found.kind]}; check source=")
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    looks = f"a {NAMES[found.kind]} ViT of width {D}, patch {p}"
    prefix = 2 if found.kind == "deit-distilled" else 1
    g = grid_of(sd["pos_embed"], p, prefix, path)
    if found.kind == "moco-v3" and options.num_heads is None and D in MOCO_HEADS:
        heads = MOCO_HEADS[D]
    elif found.kind == "timm" and options.num_heads is None:
        heads = None  # the architecture's own
    else:
        heads = num_heads(D, options.num_heads, path, looks)
    head_rows = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    kwargs = dict(img_size=g * p, patch_size=p, in_chans=C, embed_dim=D, depth=count_blocks(sd), num_heads=heads,
                  mlp_ratio=mlp_ratio(sd["blocks.0.mlp.fc1.weight"].shape[0], D), num_classes=head_rows,
                  qkv_bias="blocks.0.attn.qkv.bias" in sd)
    if heads is None:
        kwargs.pop("num_heads")
    if any(".gamma_1" in k or ".ls1." in k for k in sd):
        kwargs["init_values"] = 1.0  # LayerScale present (its value comes from the weights)
    if "fc_norm.weight" in sd:
        kwargs.update(global_pool="avg", fc_norm=True)
    size = SIZE_BY_WIDTH.get(D, "base")
    if found.kind == "deit-distilled":
        name = options.arch or pick_name(f"deit_{size}_distilled_patch16_224", "deit_base_distilled_patch16_224")
    else:
        name = options.arch or pick_name(f"vit_{size}_patch{p}_224", f"vit_{size}_patch16_224", "vit_base_patch16_224")
    rule = dict(RESAMPLE[found.kind])
    if found.kind == "moco-v3" and not _moco_sincos(sd["pos_embed"], g):
        rule = {"pos_embed": "bicubic"}
        notes.append("its position embedding is not MoCo v3's sin-cos: other sizes resample it bicubically")
    arch = TimmArch(found.kind, name, kwargs, (g * p, g * p), rule)
    return Imported(arch, convert_with_timm(sd, arch, adapt_layer_scale=True), notes)


def _moco_sincos(pos: torch.Tensor, g: int) -> bool:
    from .resample import mocov3_sincos

    return bool(torch.allclose(pos.float(), mocov3_sincos((g, g), pos.shape[-1]), atol=1e-5))

