"""The one way into an encoder: timm's ``VisionTransformer`` surface plus the attention recorder.

Our models (:class:`rmae.MaskedAutoencoderViT`) and timm ViTs — including foreign checkpoints
imported as run folders (DINO, DINOv2 with registers, DeiT with a distillation token, BEiT…) —
offer the same surface: ``forward_features``, ``forward_intermediates``, ``num_prefix_tokens``,
``patch_embed.grid_size`` / ``patch_size`` / ``img_size``, ``blocks[i].attn``. Everything in
``analysis`` reaches an encoder through this module, so both go down one code path and any number
of prefix tokens (cls, registers, distillation token) is handled here, once.

Token layout: ``[B, N, D]`` with ``N = P + L``: the ``P = num_prefix_tokens`` prefix tokens
first (cls at index 0 when the model has one), then the ``L = gh·gw`` patches in row-major order.

Attention weights come from :func:`rmae.explicit_attention` (the explicit path of each layer,
recorded at its ``attn_drop``: exact, including relative position biases and q/k norms) — for
layers that lack that hook point they are recomputed from ``qkv`` in a pre-hook.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from rmae.device import autocast
from rmae.models import explicit_attention


# ------------------------------------------------------------------------------------------
# geometry


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


def grid_size(model: nn.Module) -> tuple[int, int]:
    """``(gh, gw)`` patch grid of the model's input size."""
    return _pair(model.patch_embed.grid_size)


def patch_size(model: nn.Module) -> int:
    """Side of a (square) patch in pixels."""
    ph, pw = _pair(model.patch_embed.patch_size)
    if ph != pw:
        raise ValueError(f"non-square patches {ph}×{pw} are not supported by the analyses")
    return ph


def input_size(model: nn.Module) -> tuple[int, int]:
    """``(H, W)`` the model takes."""
    return _pair(model.patch_embed.img_size)


def num_prefix_tokens(model: nn.Module) -> int:
    """cls + registers + distillation tokens in front of the patch tokens."""
    return int(getattr(model, "num_prefix_tokens", 1))


def has_cls_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


@dataclass(frozen=True)
class EncoderInfo:
    """What an analysis needs to know about an encoder, read from the surface."""

    family: str  # mae | rae | rmae for ours; source_kind (dino, dinov2, …) for a foreign encoder; else "vit"
    name: str
    input_size: tuple[int, int]
    patch_size: int
    grid: tuple[int, int]
    depth: int
    heads: int
    embed_dim: int
    num_prefix_tokens: int
    has_cls: bool
    has_region_decoder: bool = False
    has_pixel_decoder: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def describe(model: nn.Module) -> EncoderInfo:
    cfg = getattr(model, "config", None)
    # ours: the config's family; a foreign encoder (rmae.foreign): the project it came from (dinov2…)
    family = getattr(cfg, "family", None) or getattr(model, "family", None) or getattr(model, "source_kind", None) \
        or "vit"
    name = getattr(cfg, "name", None) or getattr(model, "default_cfg", {}).get("architecture") \
        or getattr(model, "source_kind", None) or family
    return EncoderInfo(
        family=str(family), name=str(name), input_size=input_size(model), patch_size=patch_size(model),
        grid=grid_size(model), depth=len(model.blocks), heads=int(model.blocks[0].attn.num_heads),
        embed_dim=int(getattr(model, "embed_dim", None) or getattr(cfg, "embed_dim", 0)),
        num_prefix_tokens=num_prefix_tokens(model), has_cls=has_cls_token(model),
        has_region_decoder=bool(getattr(cfg, "has_region_branch", False)),
        has_pixel_decoder=bool(getattr(cfg, "has_pixel_branch", False)))


def load_encoder(path_or_model: Any, device: str | torch.device | None = None) -> nn.Module:
    """A run folder / checkpoint path (→ ``rmae.load_model``) or a model, in eval mode, on ``device``."""
    import rmae

    model = path_or_model if isinstance(path_or_model, nn.Module) else rmae.load_model(path_or_model)
    model = model.eval()
    return model.to(device) if device is not None else model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's weights: every tensor an analysis makes goes there."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------
# tokens


def pool_tokens(tokens: torch.Tensor, pool: str = "cls", num_prefix: int = 1) -> torch.Tensor:
    """``[B, N, D]`` → ``[B, D]``: ``"cls"`` (token 0) or ``"mean"`` (mean of the patch tokens,
    prefix tokens excluded, as MAE's global-pool head and timm's ``avg`` pooling)."""
    if pool == "cls":
        if num_prefix < 1:
            raise ValueError("this encoder has no cls token: use pool 'mean'")
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, num_prefix:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


def normalize_layer(layer: int, depth: int) -> int:
    """A block index in ``[-depth, depth)`` → ``0..depth-1``, or ValueError."""
    if not -depth <= int(layer) < depth:
        raise ValueError(f"layer {layer} is out of range for an encoder of {depth} blocks "
                         f"(use 0..{depth - 1}, or -1 for the last)")
    return int(layer) % depth


def block_tokens(model: nn.Module, images: torch.Tensor, layers: Sequence[int], *,
                 final_norm_on_last: bool = True) -> list[torch.Tensor]:
    """Output tokens ``[B, N, D]`` (prefix tokens included) of blocks ``layers`` for whole images,
    via ``forward_intermediates``. The last block is followed by the encoder's final norm (so it
    equals ``forward_features``) when ``final_norm_on_last``; other blocks give their raw residual
    stream (no norm), the convention of layer-wise probing and CKA studies."""
    depth = len(model.blocks)
    idx = [normalize_layer(i, depth) for i in layers]
    wanted = sorted(set(idx))
    outs = model.forward_intermediates(images, indices=wanted, return_prefix_tokens=True, output_fmt="NLC",
                                       intermediates_only=True, stop_early=True)
    by_layer = {}
    for i, item in zip(wanted, outs):
        patches, prefix = item if isinstance(item, tuple) else (item, None)
        x = patches if prefix is None else torch.cat([prefix, patches], dim=1)
        if final_norm_on_last and i == depth - 1:
            x = model.norm(x)
        by_layer[i] = x
    return [by_layer[i] for i in idx]


# ------------------------------------------------------------------------------------------
# attention


@dataclass
class Recording:
    """What one forward pass under :func:`recording` captured, per selected layer (ascending).

    ``weights[i]``: ``[B, heads, N, N]`` attention of layer ``layers[i]`` (rows = queries, sum 1);
    ``keys[i]``: ``[B, N, D]`` that layer's keys (heads concatenated, after ``k_norm``) when asked.
    With a ``reduce`` callback only the kept layers' weights are here (``layers`` names them).
    """

    layers: list[int]
    weights: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)


#: ``reduce(layer, weights [B, heads, N, N])``: called as soon as a layer's attention has run
Reduce = Callable[[int, torch.Tensor], None]


def _recompute_weights(attn_mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Weights of a timm-style attention from its input ``x [B, N, C]`` (for layers without an
    ``attn_drop`` hook point): ``softmax(q_norm(q)·k_norm(k)ᵀ·scale)``."""
    B, N, _ = x.shape
    h = attn_mod.num_heads
    qkv = attn_mod.qkv(x).reshape(B, N, 3, h, -1).permute(2, 0, 3, 1, 4)
    q = getattr(attn_mod, "q_norm", nn.Identity())(qkv[0])
    k = getattr(attn_mod, "k_norm", nn.Identity())(qkv[1])
    return ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _biased_qkv(attn_mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``qkv [B, N, 3·D]`` of a BEiT-style attention (separate ``q_bias`` / ``v_bias``, none on k),
    which never calls its ``qkv`` module."""
    bias = torch.cat([attn_mod.q_bias, torch.zeros_like(attn_mod.v_bias), attn_mod.v_bias])
    return torch.nn.functional.linear(x, attn_mod.qkv.weight, bias)


def _key_hook(store: dict[int, torch.Tensor], i: int, attn: nn.Module) -> Callable[..., None]:
    heads, k_norm = int(attn.num_heads), getattr(attn, "k_norm", None)

    def hook(_m: nn.Module, _i: Any, qkv: torch.Tensor) -> None:
        B, N, three_d = qkv.shape
        k = qkv.reshape(B, N, 3, heads, three_d // (3 * heads))[:, :, 1]  # [B, N, heads, head_dim]
        if k_norm is not None and not isinstance(k_norm, nn.Identity):
            k = k_norm(k)  # normalises head_dim, as timm's [B, heads, N, head_dim] layout
        store[i] = k.reshape(B, N, -1)

    return hook


@contextlib.contextmanager
def recording(model: nn.Module, layers: Iterable[int] | None = None, keys: bool | Iterable[int] = False, *,
              reduce: Reduce | None = None, keep: Iterable[int] | None = None) -> Iterator[Recording]:
    """Within the block, one forward pass of ``model`` fills a :class:`Recording` of the chosen
    layers (default: all). Use one forward pass per ``with`` block.

    ``keys``: True records the keys of every chosen layer, a sequence of layers those layers'.
    ``reduce``: streaming — each chosen layer's weights go to ``reduce(layer, weights)`` as soon
    as that layer's attention has run (in layer order) and are then dropped, except the layers in
    ``keep`` (default none), which stay in the recording. Memory then holds one layer's weights
    at a time, however deep the model. Without ``reduce`` every chosen layer is kept.
    """
    depth = len(model.blocks)
    chosen = sorted({normalize_layer(i, depth) for i in layers}) if layers is not None else list(range(depth))
    key_layers = set(chosen) if keys is True else {normalize_layer(i, depth) for i in keys} if keys else set()
    kept = set(chosen) if reduce is None else {normalize_layer(i, depth) for i in keep or ()}
    rec = Recording([i for i in chosen if i in kept])
    by_layer: dict[int, torch.Tensor] = {}

    def take(i: int, w: torch.Tensor) -> None:
        if reduce is not None:
            reduce(i, w)
        if i in kept:
            by_layer[i] = w

    handles = []
    hookable = [i for i in chosen if hasattr(model.blocks[i].attn, "attn_drop") and hasattr(model.blocks[i].attn, "fused_attn")]
    for i in chosen:
        if i not in hookable:
            handles.append(model.blocks[i].attn.register_forward_pre_hook(
                lambda mod, args, i=i: take(i, _recompute_weights(mod, args[0]))))
    key_maps: dict[int, torch.Tensor] = {}
    for i in sorted(key_layers):
        attn = model.blocks[i].attn
        hook = _key_hook(key_maps, i, attn)
        if getattr(attn, "q_bias", None) is not None:  # BEiT-style: qkv weight applied by F.linear with q/v biases
            handles.append(attn.register_forward_pre_hook(
                lambda mod, args, hook=hook: hook(None, None, _biased_qkv(mod, args[0]))))
        else:
            handles.append(attn.qkv.register_forward_hook(hook))
    try:
        with explicit_attention([model.blocks[i] for i in hookable]) as store:
            # explicit_attention appends each layer's weights at its attn_drop; taking them when
            # the attention module returns hands them on while the layer is still the newest
            def taken(i: int) -> Callable[..., None]:
                def hook(*_: Any) -> None:
                    if not store:
                        raise RuntimeError(f"layer {i}'s attention ran without passing its weights through attn_drop; "
                                           "analysis.encoder cannot record this attention class")
                    take(i, store.pop())

                return hook

            handles += [model.blocks[i].attn.register_forward_hook(taken(i)) for i in hookable]
            yield rec
        rec.weights[:] = [by_layer[i] for i in rec.layers if i in by_layer]
        rec.keys[:] = [key_maps[i] for i in sorted(key_maps)]
    finally:
        for h in handles:
            h.remove()


def attention_pass(model: nn.Module, images: torch.Tensor, layers: Iterable[int] | None = None, *,
                   keys: bool | Iterable[int] = False, precision: str = "fp32", grad: bool = False,
                   reduce: Reduce | None = None, keep: Iterable[int] | None = None) -> tuple[torch.Tensor, Recording]:
    """One forward pass over whole images → (final-norm tokens ``[B, N, D]``, :class:`Recording`).

    ``images`` are moved to the model's device. ``precision="bf16"`` runs under autocast (matmuls
    in bf16, softmax in fp32) where exact weights are not needed; weights (also those handed to
    ``reduce``) are float32. ``keys``, ``reduce``, ``keep``: as in :func:`recording`.
    """
    images = images.to(model_device(model))
    exact = precision == "fp32"
    hand_on = reduce if exact or reduce is None else (lambda i, w: reduce(i, w.float()))
    with torch.set_grad_enabled(grad), autocast(images.device, precision), \
            recording(model, layers, keys, reduce=hand_on, keep=keep) as rec:
        tokens = model.forward_features(images)
    if not exact:
        rec.weights[:] = [w.float() for w in rec.weights]
        rec.keys[:] = [k.float() for k in rec.keys]
        tokens = tokens.float()
    return tokens, rec
