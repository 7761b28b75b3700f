"""A recorded timm architecture: what a run folder of a foreign encoder rebuilds from.

``config.yaml`` of such a run holds (besides ``source_kind`` and ``imported_from``)::

    arch:
      timm: vit_small_patch14_reg4_dinov2        # timm model name (class and builder defaults)
      kwargs: {img_size: 518, patch_size: 14, embed_dim: 384, depth: 12, num_heads: 6, ...}
      img_size: [224, 224]                       # the size the run is analysed at
      resample: {pos_embed: dinov2, offset: 0.0, antialias: true}
      layer_norm_eps: null                       # LayerNorm eps when timm's default is not the original's

``kwargs`` describe the weights as stored (``model.safetensors``, timm's layout, position
embeddings at their native grid); ``img_size`` is where the model runs. :func:`build` resamples
the position embeddings (and BEiT's relative position tables) from the native grid to that size
by the original project's own rule (:mod:`rmae.foreign.resample`), so a run analysed at another
size computes what the original model computes there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError
from . import resample

#: The input normalisation a source was trained with, where it is not ImageNet's mean/std (which
#: every rmae loader applies): BEiT (v1) used mean = std = 0.5 (unilm's BEiT recipes without
#: ``--imagenet_default_mean_and_std``; timm's ``beit_*`` configs). BEiT v2 and the others use ImageNet's.
TRAINED_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "beit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}

#: Head counts by width where the state dict cannot tell (official conventions: 64-d heads;
#: DINOv2's giant is 1536-d with 24 heads). Families that differ (MoCo v3's ViT-S has 12) say so.
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}
SIZE_BY_WIDTH = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1536: "giant"}


@dataclass
class TimmArch:
    """Everything that rebuilds a foreign encoder as a timm model (see module docstring)."""

    kind: str  # source kind: dino | dinov2 | ibot | moco-v3 | deit | deit-distilled | beit | beit-v2 | …
    timm: str
    kwargs: dict[str, Any]
    img_size: tuple[int, int]
    resample: dict[str, Any]
    layer_norm_eps: float | None = None

    @property
    def native_size(self) -> tuple[int, int]:
        return _pair(self.kwargs["img_size"])

    @property
    def patch(self) -> int:
        return _pair(self.kwargs["patch_size"])[0]

    def to_config(self) -> dict[str, Any]:
        return {"timm": self.timm, "kwargs": _plain(self.kwargs), "img_size": list(self.img_size),
                "resample": dict(self.resample), "layer_norm_eps": self.layer_norm_eps}

    @classmethod
    def from_config(cls, kind: Any, doc: Any, where: str) -> "TimmArch":
        """The ``arch`` mapping of a run's config.yaml; a malformed one is a :class:`CheckpointError`."""
        if not isinstance(doc, dict) or not isinstance(doc.get("timm"), str) or not isinstance(doc.get("kwargs"), dict) \
                or not isinstance(doc.get("resample"), dict) or not isinstance(kind, str):
            raise CheckpointError(f"{where}: arch must be a mapping with timm (a name), kwargs and resample (mappings), "
                                  "and source_kind a name; re-import the checkpoint with `rmae import`")
        kwargs = dict(doc["kwargs"])
        for key in ("img_size", "patch_size"):
            if key not in kwargs:
                raise CheckpointError(f"{where}: arch.kwargs lacks {key}; re-import the checkpoint with `rmae import`")
        try:
            size = _pair(doc.get("img_size") or kwargs["img_size"])
            eps = doc.get("layer_norm_eps")
            eps = float(eps) if eps is not None else None
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: arch.img_size must be an integer or [height, width]") from None
        return cls(kind, doc["timm"], kwargs, size, dict(doc["resample"]), eps)


@dataclass
class Imported:
    """A foreign checkpoint converted to timm's layout: its architecture and native weights."""

    arch: TimmArch
    state_dict: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)  # what the conversion dropped, for the import summary
    how: str = ""  # what the file was recognised as, e.g. "DINO training checkpoint (teacher)"
    source: str = ""  # the file the weights came from (named in errors)


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (list, tuple)):
        if len(x) != 2:
            raise ValueError(f"expected [height, width], got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def _plain(x: Any) -> Any:
    """YAML-safe copy (tuples → lists)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def num_heads(width: int, given: int | None, path: Any, looks_like: str) -> int:
    """``given`` if any, else the convention for ``width``; else a clear error asking for it."""
    if given is not None:
        if width % int(given):
            raise CheckpointError(f"{path}: num_heads={given} does not divide the encoder width {width}")
        return int(given)
    if width in HEADS_BY_WIDTH:
        return HEADS_BY_WIDTH[width]
    raise CheckpointError(f"{path}: {looks_like}; width {width} is not a standard ViT size, so its head count is "
                          "unknown; pass num_heads=N")


def grid_of(pos_embed: torch.Tensor, patch: int, prefix: int, path: Any) -> int:
    """Side of the square patch grid a position embedding ``[1, prefix + g·g, D]`` was trained at."""
    n = pos_embed.shape[1] - prefix
    g = math.isqrt(max(n, 0))
    if g * g != n:
        raise CheckpointError(f"{path}: its position embedding has {n} patch positions, not a square grid; "
                              "pass img_size=(H, W) of the grid it was trained at")
    return g


def count_blocks(sd: dict[str, torch.Tensor], prefix: str = "blocks") -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def mlp_ratio(hidden: int, width: int) -> float:
    """The ratio timm turns back into ``hidden`` (``int(width · ratio)``), exact where it can be."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def pick_name(*candidates: str) -> str:
    """The first registered timm model name (its builder supplies what kwargs do not say)."""
    import timm

    for name in candidates:
        if timm.is_model(name):
            return name
    raise ValueError(f"none of {candidates} is a timm model")


def _create(arch: TimmArch, size: tuple[int, int]) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch.timm, pretrained=False, **{**arch.kwargs, "img_size": size})
    except RuntimeError as e:  # timm's "Unknown model" (a misspelt arch=)
        raise CheckpointError(f"arch={arch.timm}: {e}; see timm.list_models('vit_*')") from None
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"timm's {arch.timm} cannot be built with {_plain(arch.kwargs)} ({e}); "
                              "pass arch=TIMM_NAME of the architecture these weights belong to") from None


def convert_with_timm(sd: dict[str, torch.Tensor], arch: TimmArch, **filter_kwargs: Any) -> dict[str, torch.Tensor]:
    """``sd`` in timm's layout by the architecture module's own ``checkpoint_filter_fn``, with a
    model of the native size (built on the meta device: shapes only) so nothing is resampled here."""
    import importlib
    import inspect

    with torch.device("meta"):
        model = _create(arch, arch.native_size)
    module = importlib.import_module(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None:
        return dict(sd)
    accepted = set(inspect.signature(fn).parameters)
    return fn(dict(sd), model, **{k: v for k, v in filter_kwargs.items() if k in accepted})


def build(imported: Imported, img_size: Any = None) -> nn.Module:
    """The timm model of ``imported`` at ``img_size`` (default: the arch's), eval mode, on the CPU.

    Weights are assigned, not copied: parameters share storage with ``imported.state_dict``
    (float32: :func:`rmae.foreign.from_object` widens half-precision files) except the
    resampled position tables.
    """
    arch = imported.arch
    size = _pair(img_size) if img_size is not None else arch.img_size
    where = f"{imported.source}: " if imported.source else ""
    if size[0] % arch.patch or size[1] % arch.patch:
        raise CheckpointError(f"{where}img_size {size} is not a multiple of the patch size {arch.patch} of this "
                              f"{arch.kind} encoder; choose e.g. img_size={max(1, size[0] // arch.patch) * arch.patch}")
    sd = resample.to_size(imported.state_dict, arch.resample, arch.native_size, size, arch.patch)
    with torch.device("cpu"):
        model = _create(arch, size)
    if arch.layer_norm_eps is not None:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = arch.layer_norm_eps
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k}: weights {list(sd[k].shape)} vs {arch.timm} {list(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{where}the {arch.kind} weights do not fit timm's {arch.timm}({_plain(arch.kwargs)}): "
            + "; ".join(filter(None, [f"missing {missing[:6]}" if missing else "",
                                      f"unexpected {unexpected[:6]}" if unexpected else "", *shapes[:4]]))
            + " — pass arch=TIMM_NAME (and num_heads=N) of the architecture these weights belong to")
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    _feed_trained_normalization(model, arch.kind)
    model.source_kind = arch.kind
    model.timm_arch = TimmArch(arch.kind, arch.timm, arch.kwargs, size, arch.resample, arch.layer_norm_eps)
    model.imported = imported
    return model


def _feed_trained_normalization(model: nn.Module, kind: str) -> None:
    """Make an encoder trained on another input normalisation see what it was trained on.

    rmae's images are ImageNet-normalised; a pre-hook on ``patch_embed`` (the first module every
    forward path applies to the images) maps them to the source's normalisation:
    ``x' = (x · std_in + mean_in − mean) / std``. The weights are untouched, so ``rmae export``
    still writes the original ones. ``model.input_normalization`` says what the encoder expects."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = TRAINED_NORMALIZATION.get(kind, (IMAGENET_MEAN, IMAGENET_STD))
    model.input_normalization = {"mean": list(mean), "std": list(std)}
    if (tuple(mean), tuple(std)) == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)):
        return
    scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
    shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)

    def renormalize(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * scale.to(x).view(1, -1, 1, 1) + shift.to(x).view(1, -1, 1, 1), *args[1:])

    model.patch_embed.register_forward_pre_hook(renormalize)
