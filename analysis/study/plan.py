"""What a study trains: configurations (families × grid axes) × seeds, one run folder each.

    studies/NAME/
      study.json                 the plan: preset, families, grid, seeds, settings (a rerun must match)
      runs/<label>-s<seed>/      one run folder per (configuration, seed)
      analysis/<label>-s<seed>/  `rmae analyze` of each run on the same images (results.json, per_image.npz)
      results.json, report.md    across seeds (see analysis.study.aggregate)

A configuration is a family (``mae``, ``rae``, ``rmae``, or ``scratch`` — the MAE encoder at
initialisation, the from-scratch reference of the dense probe) plus one value of each ``--grid``
axis. Axes that a family does not use (region settings for ``mae``/``scratch``) are left out of
its label, so ``--grid region_source=fh,gt`` makes one MAE configuration, not two identical ones.
An axis can be given to one family: ``--grid rmae:region_source=fh,gt`` sweeps R-MAE's region
source while RAE keeps the preset's (the paper's comparison: MAE, R-MAE on FH and on ground-truth
regions, RAE alone).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmae.settings import ConfigError, parse_override

FAMILIES = ("mae", "rae", "rmae", "scratch")
#: settings only the region branch reads: they do not make a new MAE configuration
REGION_ONLY_KEYS = frozenset({
    "region_source", "region_cache", "num_regions", "region_variant", "region_enc_dim", "region_enc_depth",
    "region_dec_dim", "region_dec_depth", "region_neck_depth", "region_heads", "bg_loss_weight",
    "region_loss_weight", "region_mask_ratio", "min_region_size"})


@dataclass(frozen=True)
class Configuration:
    family: str
    axes: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.family + "".join(f"-{k}={_fmt(v)}" for k, v in self.axes)

    @property
    def has_regions(self) -> bool:
        return self.family in ("rae", "rmae")

    def overrides(self) -> dict[str, Any]:
        return dict(self.axes)


@dataclass(frozen=True)
class PlannedRun:
    configuration: Configuration
    seed: int
    folder: Path
    analysis: Path = field(compare=False, default=Path())

    @property
    def name(self) -> str:
        return f"{self.configuration.label}-s{self.seed}"


def _fmt(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def split_axis(key: str) -> tuple[str | None, str]:
    """A grid key → (the family it is limited to, or None for all; the setting)."""
    family, sep, setting = key.rpartition(":")
    return (family, setting) if sep else (None, key)


def parse_grid(words: list[str] | None) -> dict[str, list[Any]]:
    """``["num_regions=1,8", "rmae:region_source=fh,gt"]`` → ``{"num_regions": [1, 8],
    "rmae:region_source": ["fh", "gt"]}`` (YAML scalars; a ``FAMILY:`` prefix limits an axis to
    that family)."""
    grid: dict[str, list[Any]] = {}
    for word in words or []:
        key, raw = parse_override(word)
        family, setting = split_axis(key)
        if family is not None and family not in FAMILIES:
            raise ConfigError(f"--grid {word}: {family!r} is not a family; limit an axis to one of "
                              f"{', '.join(FAMILIES)} (e.g. --grid rmae:{setting}=a,b)")
        text = word.partition("=")[2]
        values = [parse_override(f"{setting}={v.strip()}")[1] for v in text.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--grid {word}: give at least one value, e.g. --grid {key}=a,b")
        clash = [k for k in grid if split_axis(k)[1] == setting and None in (family, split_axis(k)[0])]
        if key in grid or clash:
            raise ConfigError(f"--grid {setting} is given twice; list every value once: --grid {key}=a,b")
        if len(set(map(str, values))) != len(values):
            raise ConfigError(f"--grid {word}: a value is repeated")
        grid[key] = values
    return grid


def configurations(families: list[str], grid: dict[str, list[Any]]) -> list[Configuration]:
    """families × the product of the grid axes, without duplicates (see module docstring)."""
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ConfigError(f"families: {', '.join(bad) or 'none given'}; choose from {', '.join(FAMILIES)}")
    out: list[Configuration] = []
    keys = list(grid)
    for family in dict.fromkeys(families):
        uses = [k for k in keys if split_axis(k)[0] in (None, family)
                and (family in ("rae", "rmae") or split_axis(k)[1] not in REGION_ONLY_KEYS)]
        for values in itertools.product(*(grid[k] for k in uses)):
            c = Configuration(family, tuple((split_axis(k)[1], v) for k, v in zip(uses, values)))
            if c not in out:
                out.append(c)
    return out


def plan(root: Path, families: list[str], grid: dict[str, list[Any]], seeds: int, first_seed: int = 0) -> list[PlannedRun]:
    """Every (configuration, seed) with its run folder and analysis folder under ``root``."""
    if seeds < 1:
        raise ConfigError(f"seeds={seeds}: a study needs at least 1 seed (2 or more to compare methods)")
    runs = []
    for c in configurations(families, grid):
        for s in range(first_seed, first_seed + seeds):
            name = f"{c.label}-s{s}"
            runs.append(PlannedRun(c, s, root / "runs" / name, root / "analysis" / name))
    return runs
