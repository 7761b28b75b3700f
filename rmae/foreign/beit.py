"""BEiT and BEiT v2 (``microsoft/unilm``) as timm's ``Beit``.

Pre-training files (``beit_base_patch16_224_pt22k.pth``, ``beitv2_base_patch16_224_pt1k.pth``)
hold ``{"model": …}`` with a shared relative position table (``rel_pos_bias.*``), LayerScale
``gamma_1`` / ``gamma_2``, separate ``q_bias`` / ``v_bias``, and pre-training heads this encoder
does not use: ``mask_token``, ``lm_head``, and for BEiT v2 the ``cls_pt_layers`` that pre-train
the cls token. Fine-tuned files have a table per block and ``fc_norm`` (mean pooling) with a
classifier ``head``. timm's ``beit.checkpoint_filter_fn`` brings them over (dropping the
``relative_position_index`` buffers it rebuilds).

Another image size resamples the relative position tables as BEiT's fine-tuning loader does
(:func:`rmae.foreign.resample.beit_rel_pos_table`) and an absolute position embedding, if any,
bicubically as that loader does.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import CheckpointError
from .detect import Found
from .options import ImportOptions
from .timm_arch import SIZE_BY_WIDTH, Imported, TimmArch, convert_with_timm, count_blocks, grid_of, mlp_ratio
from .timm_arch import num_heads, pick_name

PRETRAINING_ONLY = ("mask_token", "lm_head.", "cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")


def convert(found: Found, options: ImportOptions, path: Path) -> Imported:
    dropped = sorted({k.split(".")[0] for k in found.state_dict if k.startswith(PRETRAINING_ONLY)})
    sd = {k: v for k, v in found.state_dict.items() if not k.startswith(PRETRAINING_ONLY)}
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise CheckpointError(f"{path}: not a BEiT encoder (keys start {sorted(sd)[:4]}); check source=")
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    per_block = "blocks.0.attn.relative_position_bias_table" in sd
    table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
    if "pos_embed" in sd:
        g = grid_of(sd["pos_embed"], p, 1, path)
    elif table is not None:
        side = math.isqrt(table.shape[0] - 3)  # (2·window − 1)² offsets + 3 cls entries
        g = (side + 1) // 2
    else:
        raise CheckpointError(f"{path}: a BEiT encoder with neither position embedding nor relative position "
                              "table; its grid is unknown — pass img_size=")
    heads = options.num_heads or (int(table.shape[1]) if table is not None else None)
    heads = num_heads(D, heads, path, f"a BEiT ViT of width {D}, patch {p}")
    kwargs = dict(img_size=g * p, patch_size=p, in_chans=C, embed_dim=D, depth=count_blocks(sd), num_heads=heads,
                  mlp_ratio=mlp_ratio(sd["blocks.0.mlp.fc1.weight"].shape[0], D), qkv_bias="blocks.0.attn.q_bias" in sd,
                  use_abs_pos_emb="pos_embed" in sd, use_rel_pos_bias=per_block, use_shared_rel_pos_bias=shared,
                  init_values=0.1 if "blocks.0.gamma_1" in sd else None, global_pool="avg",
                  use_fc_norm="fc_norm.weight" in sd, num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0)
    size = SIZE_BY_WIDTH.get(D, "base")
    stem = "beitv2" if found.kind == "beit-v2" else "beit"
    name = options.arch or pick_name(f"{stem}_{size}_patch16_224", f"{stem}_base_patch16_224")
    arch = TimmArch(found.kind, name, kwargs, (g * p, g * p), {"pos_embed": "bicubic", "rel_pos": "beit"})
    notes = [f"dropped {', '.join(dropped)} (pre-training only)"] if dropped else []
    return Imported(arch, convert_with_timm(sd, arch), notes)
