"""Model configuration: one dataclass that rebuilds any MAE / RAE / R-MAE model.

Registered names are ``{family}_vit_{size}_patch{p}``: family ``mae`` (pixel branch only),
``rae`` (region branch only), ``rmae`` (both); sizes tiny/small/base/large/huge. Every knob the
paper ablates is a field here, with the same name as the model keyword and the config key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("mae", "rae", "rmae")
REGION_VARIANTS = ("length", "batch", "channel")

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


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model (saved in every checkpoint we write)."""

    family: str = "rmae"  # mae | rae | rmae
    # pixel encoder (a timm-compatible ViT with a cls token)
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # masking and pixel decoder (MAE)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    # region branch (RAE)
    num_regions: int = 8  # k; only the channel variant's weights depend on it
    region_variant: str = "length"
    region_enc_dim: int = 128  # p_E
    region_enc_depth: int = 1  # m_E
    region_dec_dim: int = 128  # p_D
    region_dec_depth: int = 1  # m_D
    region_neck_depth: int = 1  # m_N (paper 1; official config 8)
    region_heads: int = 8  # heads of region encoder, neck and decoder (official: 8)
    bg_loss_weight: float = 1.0  # w_b, weight of background pixels in the region BCE
    region_loss_weight: float = 1.0  # λ in L = L_pixel + λ·L_region
    region_mask_ratio: float | None = None  # None: the pixel mask (paper); else the official region_mask_ratio
    # fine-tuning
    drop_path_rate: float = 0.0
    name: str = field(default="", compare=False)  # registered name it was built from, if any

    def __post_init__(self) -> None:
        if isinstance(self.img_size, list):
            self.img_size = tuple(self.img_size)
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
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.region_variant not in REGION_VARIANTS:
            problems.append(f"region_variant must be one of {REGION_VARIANTS}, got {self.region_variant!r}")
        h, w = self.image_hw
        if h % self.patch_size or w % self.patch_size:
            problems.append(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            problems.append(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for dim, heads, what in [
            (self.embed_dim, self.num_heads, "embed_dim/num_heads"),
            (self.decoder_dim, self.decoder_heads, "decoder_dim/decoder_heads"),
            (self.region_enc_dim, self.region_heads, "region_enc_dim/region_heads"),
            (self.region_dec_dim, self.region_heads, "region_dec_dim/region_heads"),
        ]:
            if dim % heads:
                problems.append(f"{what}: {dim} is not divisible by {heads}")
        if self.num_regions < 1:
            problems.append(f"num_regions must be >= 1, got {self.num_regions}")
        if self.region_dec_depth < 1 or self.region_enc_depth < 1:
            problems.append("region_enc_depth and region_dec_depth must be >= 1")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
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
