"""Hugging Face ``ViTMAEModel`` / ``ViTMAEForPreTraining`` weights as timm's ``VisionTransformer``.

timm has no converter for Hugging Face's ViT layout, so this is the one hand-written mapping:
``save_pretrained`` files (and transformers < 5 state dicts) name a block
``encoder.layer.{i}.attention.attention.{query,key,value}`` / ``attention.output.dense`` /
``intermediate.dense`` / ``output.dense`` / ``layernorm_before`` / ``layernorm_after``;
transformers ≥ 5 state dicts name it ``layers.{i}.attention.{q,k,v,o}_proj`` /
``mlp.fc1`` / ``mlp.fc2``. ``ViTMAEForPreTraining`` nests the encoder under ``vit.``; its
pixel decoder (``decoder.*``) is dropped. Separate q/k/v projections become timm's fused ``qkv``
(rows q, k, v). The encoder's LayerNorm eps is 1e-12 (``ViTMAEConfig``'s default) unless a
``config.json`` beside the weights says otherwise; the head count comes from it too.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .detect import Found
from .options import ImportOptions
from .timm_arch import SIZE_BY_WIDTH, Imported, TimmArch, grid_of, mlp_ratio, num_heads, pick_name

#: block-level names (transformers < 5 and ≥ 5) → timm's
_BLOCK = {"attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
          "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
          "layernorm_before": "norm1", "layernorm_after": "norm2"}
_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
        "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def to_timm(sd: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(timm state dict, number of pixel-decoder tensors dropped)."""
    enc = {k[4:] if k.startswith("vit.") else k: v for k, v in sd.items() if not k.startswith("decoder.")}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in enc.items():
        if k in _TOP:
            out[_TOP[k]] = v
        elif (m := _LAYER.match(k)) and m.group(2) in _QKV:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[_QKV[m.group(2)]] = v
        elif m and m.group(2) in _BLOCK:
            out[f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"] = v
        elif k != "embeddings.mask_token":
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{path}: Hugging Face ViT keys this converter does not know: {unknown[:6]}")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{path}: layer {i} has {sorted(parts)} of query/key/value {kind}s, not all three")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, sum(k.startswith("decoder.") for k in sd)


def convert(found: Found, options: ImportOptions, path: Path) -> Imported:
    sd, n_decoder = to_timm(found.state_dict, path)
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError(f"{path}: a Hugging Face ViT state dict without patch or position embeddings")
    cfg = found.extra.get("hf_config", {})
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    g = grid_of(sd["pos_embed"], p, 1, path)
    given = options.num_heads or (cfg.get("num_attention_heads") if isinstance(cfg.get("num_attention_heads"), int) else None)
    heads = num_heads(D, given, path, f"a Hugging Face ViTMAE of width {D}, patch {p}")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path}: config.json says hidden_act={act!r}; only GELU ViTs are supported")
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    kwargs = dict(img_size=g * p, patch_size=p, in_chans=C, embed_dim=D, depth=n_blocks, num_heads=heads,
                  mlp_ratio=mlp_ratio(sd["blocks.0.mlp.fc1.weight"].shape[0], D), num_classes=0,
                  qkv_bias="blocks.0.attn.qkv.bias" in sd)
    eps = cfg.get("layer_norm_eps", 1e-12)
    size = SIZE_BY_WIDTH.get(D, "base")
    name = options.arch or pick_name(f"vit_{size}_patch{p}_224", f"vit_{size}_patch16_224", "vit_base_patch16_224")
    arch = TimmArch("hf-vitmae", name, kwargs, (g * p, g * p), {"pos_embed": "bicubic"}, float(eps))
    notes = [f"dropped the pixel decoder ({n_decoder} tensors)"] if n_decoder else []
    return Imported(arch, sd, notes)
