"""Model configuration: one dataclass that rebuilds any MAE / RAE / R-MAE model.

Registered names are ``{family}_vit_{size}_patch{p}``: family ``mae`` (pixel branch only),
``rae`` (region branch only), ``rmae`` (both); sizes tiny/small/base/large/huge. Every knob the
paper ablates is a field here, with the same name as the model keyword and the config key.

Every field is typed and range-checked when a config is made (:mod:`rmae.settings`'s
``setting`` ranges), before a single weight is allocated, so a hostile or mistyped value is a
:class:`~rmae.settings.ConfigError` naming the key — never a crash deep in torch or an
allocation of gigabytes. The bounds are generous for research yet keep a model buildable:

- ``img_size`` ≤ :data:`MAX_IMAGE_SIDE` per side, divisible by ``patch_size``, and at most
  :data:`MAX_PATCHES` patches (attention cost grows with their square);
- widths ≤ :data:`MAX_WIDTH` and divisible by 4 (sin-cos position tables) and by their heads;
  depths ≤ :data:`MAX_DEPTH`; ``num_regions`` ≤ :data:`MAX_REGIONS`;
- in total at most :data:`MAX_PARAMETERS` weights (:meth:`ModelConfig.num_parameters`, exact,
  computed from the config alone). Raise these constants if you truly need a bigger model.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any

from ..settings import ConfigError, coerce, fields_of, range_problem, setting

FAMILIES = ("mae", "rae", "rmae")
REGION_VARIANTS = ("length", "batch", "channel")

MAX_IMAGE_SIDE = 4096
MAX_PATCHES = 65_536
MAX_WIDTH = 16_384
MAX_DEPTH = 128
MAX_REGIONS = 256
MAX_PARAMETERS = 2_000_000_000  # 8 GB of fp32 weights (ViT-H MAE is 0.66e9)

# ViT sizes: (embed_dim, depth, encoder heads). Head counts are the official conventions
# (64-d heads; huge has 80-d heads), since no state dict records them.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
HEADS_BY_WIDTH = {dim: heads for dim, _, heads in VIT_SIZES.values()}

# Pixel-decoder defaults per size. base/large/huge follow MAE (512-d, 8 blocks, 16 heads);
# tiny/small use a lighter decoder so the decoder does not dwarf the encoder on a laptop.
DECODER_DEFAULTS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 4, 4),
    "small": (256, 4, 8),
    "base": (512, 8, 16),
    "large": (512, 8, 16),
    "huge": (512, 8, 16),
}
# Region-branch width per size: the paper's 128 at base and above; scaled down with the
# encoder for tiny (the official 128-d widths make a ViT-Tiny/8 step 1.6–1.8× MAE's).
REGION_DIM_DEFAULTS = {"tiny": 64, "small": 128, "base": 128, "large": 128, "huge": 128}

_NAME_RE = re.compile(r"^(mae|rae|rmae)_vit_(tiny|small|base|large|huge)_patch(\d+)$")


def _width(default: int, help: str) -> Any:
    return setting(default, help, low=4, high=MAX_WIDTH)


def _depth(default: int, help: str, low: int = 1) -> Any:
    return setting(default, help, low=low, high=MAX_DEPTH)


def _ratio(default: float | None, help: str) -> Any:
    return setting(default, help, low=0, high=1, high_open=True)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (saved in every checkpoint we write)."""

    family: str = setting("rmae", "mae | rae | rmae", choices=FAMILIES)
    # pixel encoder (a timm-compatible ViT with a cls token)
    img_size: int | tuple[int, int] = setting(224, "input side, or (H, W)", low=1, high=MAX_IMAGE_SIDE)
    patch_size: int = setting(16, "patch side in pixels", low=1, high=MAX_IMAGE_SIDE)
    in_chans: int = setting(3, "input channels", low=1, high=64)
    embed_dim: int = _width(768, "encoder width D")
    depth: int = _depth(12, "encoder blocks")
    num_heads: int = setting(12, "encoder attention heads", low=1, high=MAX_WIDTH)
    mlp_ratio: float = setting(4.0, "MLP hidden width / block width", low=0, low_open=True, high=64)
    # masking and pixel decoder (MAE)
    mask_ratio: float = _ratio(0.75, "fraction of patches removed")
    norm_pix_loss: bool = setting(True, "per-patch normalised pixel targets")
    decoder_dim: int = _width(512, "pixel-decoder width")
    decoder_depth: int = _depth(8, "pixel-decoder blocks (0 = a linear decoder)", low=0)
    decoder_heads: int = setting(16, "pixel-decoder heads", low=1, high=MAX_WIDTH)
    # region branch (RAE)
    num_regions: int = setting(8, "k regions per image (only channel's weights depend on it)",
                               low=1, high=MAX_REGIONS)
    region_variant: str = setting("length", "length | batch | channel", choices=REGION_VARIANTS)
    region_enc_dim: int = _width(128, "p_E, region-encoder width")
    region_enc_depth: int = _depth(1, "m_E, region-encoder blocks")
    region_dec_dim: int = _width(128, "p_D, region-decoder width")
    region_dec_depth: int = _depth(1, "m_D, region-decoder blocks")
    region_neck_depth: int = _depth(1, "m_N, neck blocks (paper 1; official config 8)", low=0)
    region_heads: int = setting(8, "heads of region encoder, neck and decoder (official: 8)", low=1, high=MAX_WIDTH)
    bg_loss_weight: float = setting(1.0, "w_b, weight of background pixels in the region BCE", low=0, high=1e6)
    region_loss_weight: float = setting(1.0, "λ in L = L_pixel + λ·L_region", low=0, high=1e6)
    region_mask_ratio: float | None = _ratio(None, "None: the pixel mask (paper); else the official region_mask_ratio")
    # fine-tuning
    drop_path_rate: float = _ratio(0.0, "stochastic depth")
    name: str = dataclasses.field(default="", compare=False)  # registered name it was built from, if any

    def __post_init__(self) -> None:
        self.validate()

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def has_pixel_branch(self) -> bool:
        return self.family in ("mae", "rmae")

    @property
    def has_region_branch(self) -> bool:
        return self.family in ("rae", "rmae")

    def validate(self) -> None:
        """Bring every field to its type and check its range, then the rules across fields;
        all problems are reported at once as one :class:`ConfigError`."""
        problems = []
        hints = typing.get_type_hints(type(self))
        for key, f in fields_of(type(self)).items():
            try:
                value = coerce(key, getattr(self, key), hints[key], "")
            except ConfigError as e:
                problems.append(str(e).lstrip(": "))
                continue
            setattr(self, key, value)
            problem = range_problem(key, value, f.metadata)
            if problem:
                problems.append(problem)
        if not problems:
            problems = self._cross_field_problems()
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def _cross_field_problems(self) -> list[str]:
        problems = []
        h, w = self.image_hw
        p = self.patch_size
        if h % p or w % p:
            problems.append(f"img_size={self.img_size} is not divisible by patch_size={p}")
        elif self.num_patches > MAX_PATCHES:
            problems.append(f"img_size={self.img_size} with patch_size={p} makes {self.num_patches} patches, more than "
                            f"{MAX_PATCHES}; use a larger patch_size or a smaller img_size")
        elif int(self.num_patches * (1 - self.mask_ratio)) < 1:
            problems.append(f"mask_ratio={self.mask_ratio} leaves no visible patch out of {self.num_patches}")
        for dim_key, heads_key in [("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads"),
                                   ("region_enc_dim", "region_heads"), ("region_dec_dim", "region_heads")]:
            dim, heads = getattr(self, dim_key), getattr(self, heads_key)
            if dim % heads:
                problems.append(f"{dim_key}={dim} is not divisible by {heads_key}={heads}")
            if dim % 4:
                problems.append(f"{dim_key}={dim} is not divisible by 4 (sin-cos position embedding)")
            if int(dim * self.mlp_ratio) < 1:
                problems.append(f"mlp_ratio={self.mlp_ratio} gives {dim_key}={dim} an empty MLP")
        if not problems and self.num_parameters() > MAX_PARAMETERS:
            problems.append(f"the model would have {self.num_parameters():,} parameters, more than "
                            f"{MAX_PARAMETERS:,} (rmae.models.config.MAX_PARAMETERS); use smaller widths or depths")
        return problems

    def num_parameters(self) -> int:
        """Exact number of weights (state-dict entries' elements) of the model this config
        builds, computed without building it."""
        L, p, C = self.num_patches, self.patch_size, self.in_chans
        D, r = self.embed_dim, self.mlp_ratio

        def linear(i: int, o: int) -> int:
            return i * o + o

        def attention(d: int) -> int:
            return linear(d, 3 * d) + linear(d, d)

        def mlp(d: int, hidden: int) -> int:
            return linear(d, hidden) + linear(hidden, d)

        def block(d: int) -> int:
            return 4 * d + attention(d) + mlp(d, int(d * r))

        def table(d: int) -> int:  # a fixed sin-cos table (cls position + L)
            return (1 + L) * d

        n = (C * p * p * D + D) + D + table(D) + self.depth * block(D) + 2 * D
        if self.has_pixel_branch:
            dd = self.decoder_dim
            n += linear(D, dd) + dd + table(dd) + self.decoder_depth * block(dd) + 2 * dd + linear(dd, p * p * C)
        if self.has_region_branch:
            pE, pD, k = self.region_enc_dim, self.region_dec_dim, self.num_regions
            region_in = k if self.region_variant == "channel" else 1
            n += linear(D, pD) + pD + table(pD) + self.region_neck_depth * block(pD) + 2 * pD
            n += (region_in * p * p * pE + pE) + table(pE) + self.region_enc_depth * block(pE)
            n += 2 * pE + linear(pE, pD)
            if self.region_variant == "length":
                cross = linear(pD, pD) + linear(pD, 2 * pD) + linear(pD, pD)
                query_block = 6 * pD + attention(pD) + cross + mlp(pD, int(pD * r))
                expansion_block = 4 * pD + attention(pD) + linear(pD, pD) + mlp(pD, pD)
                n += (self.region_dec_depth - 1) * query_block + expansion_block + linear(pD, p * p)
            else:
                n += pD + table(pD) + self.region_dec_depth * block(pD) + 2 * pD + linear(pD, p * p * region_in)
        return n

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """A config from its dict form (a checkpoint's metadata, a run's ``model_config``);
        unknown keys, wrong types and out-of-range values are a :class:`ConfigError`."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config is a mapping of keys to values, got {type(d).__name__}")
        known = fields_of(cls)
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def model_keywords() -> list[str]:
    """Names accepted as keyword overrides by :func:`config_from_name`."""
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("family", "name")]


def parse_model_name(name: str) -> tuple[str, str, int]:
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(
            f"unknown model {name!r}: names look like 'rmae_vit_tiny_patch8' "
            f"(family {'/'.join(FAMILIES)}, size {'/'.join(VIT_SIZES)}, any patch size); "
            f"see rmae.list_models()"
        )
    return m.group(1), m.group(2), int(m.group(3))


def config_from_name(name: str, **overrides: Any) -> ModelConfig:
    """Defaults of a registered name, then keyword overrides (unknown keywords are an error)."""
    family, size, patch = parse_model_name(name)
    dim, depth, heads = VIT_SIZES[size]
    dec_dim, dec_depth, dec_heads = DECODER_DEFAULTS[size]
    region_dim = REGION_DIM_DEFAULTS[size]
    base = dict(
        family=family, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        decoder_dim=dec_dim, decoder_depth=dec_depth, decoder_heads=dec_heads,
        region_enc_dim=region_dim, region_dec_dim=region_dim, region_heads=max(1, region_dim // 16),
        img_size=224, name=name,
    )
    bad = sorted(set(overrides) - set(model_keywords()))
    if bad:
        raise TypeError(f"unknown model keyword(s) {bad}; valid keywords: {model_keywords()}")
    base.update(overrides)
    return ModelConfig(**base)


def list_models() -> list[str]:
    names = []
    for family in FAMILIES:
        for size in VIT_SIZES:
            for patch in ((14,) if size == "huge" else (8, 16)):
                names.append(f"{family}_vit_{size}_patch{patch}")
    return names
