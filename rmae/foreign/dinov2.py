"""DINOv2 (``facebookresearch/dinov2``), with and without registers, as timm's ``*_dinov2`` ViTs.

Release files (``dinov2_vits14_pretrain.pth``, ``…_reg4_pretrain.pth``) are bare state dicts with
a 2-D ``mask_token``, LayerScale ``ls1.gamma`` / ``ls2.gamma``, ``register_tokens`` for the
register models and SwiGLU ``mlp.w12`` / ``mlp.w3`` for the giant. Training checkpoints
(``teacher_checkpoint.pth``) nest the backbone under ``teacher`` and may split the blocks into
FSDP chunks (``blocks.<chunk>.<index>``, the index global). timm's ``_convert_dinov2`` (inside
``vision_transformer.checkpoint_filter_fn``) does the rest: registers become ``reg_token`` and
the cls position moves into ``cls_token`` (timm's ``no_embed_class`` layout, same arithmetic).

Position embeddings follow the image size as DINOv2's ``interpolate_pos_encoding`` does: the
hub builds the models without registers with ``interpolate_offset=0.1`` and no antialias, those
with registers with ``interpolate_offset=0`` and antialias — the file cannot tell, so these are
the defaults (``interpolate_offset=`` / ``interpolate_antialias=`` change them).
"""

from __future__ import annotations

import re
from pathlib import Path

from .detect import Found
from .options import ImportOptions
from .timm_arch import SIZE_BY_WIDTH, Imported, TimmArch, convert_with_timm, count_blocks, grid_of, mlp_ratio
from .timm_arch import num_heads, pick_name

_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def convert(found: Found, options: ImportOptions, path: Path) -> Imported:
    sd = {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in found.state_dict.items()}
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    registers = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    g = grid_of(sd["pos_embed"], p, 1, path)  # DINOv2 keeps the cls position in pos_embed
    heads = num_heads(D, options.num_heads, path, f"a DINOv2 ViT of width {D}, patch {p}")
    kwargs = dict(img_size=g * p, patch_size=p, in_chans=C, embed_dim=D, depth=count_blocks(sd), num_heads=heads,
                  mlp_ratio=mlp_ratio(hidden, D), init_values=1.0, num_classes=0)
    if registers:
        kwargs.update(reg_tokens=registers, no_embed_class=True)
    size = "giant" if swiglu else SIZE_BY_WIDTH.get(D, "small")
    reg = "_reg4" if registers else ""
    name = options.arch or pick_name(f"vit_{size}_patch14{reg}_dinov2", f"vit_small_patch14{reg}_dinov2")
    offset = options.interpolate_offset if options.interpolate_offset is not None else (0.0 if registers else 0.1)
    antialias = options.interpolate_antialias if options.interpolate_antialias is not None else bool(registers)
    rule = {"pos_embed": "dinov2", "offset": offset, "antialias": antialias}
    arch = TimmArch("dinov2", name, kwargs, (g * p, g * p), rule)
    return Imported(arch, convert_with_timm(sd, arch), ["dropped mask_token (used in training only)"])

