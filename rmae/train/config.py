"""Training configuration: a dataclass, YAML presets under ``configs/``, ``key=value`` overrides.

A config file is flat YAML. Its keys are the training keys below plus any model keyword
(``img_size``, ``num_regions``, ``region_variant``, …; see ``rmae.model_keywords()``), e.g.::

    model: rmae_vit_tiny_patch8
    img_size: 64
    data: scenes:train
    batch_size: 64
    steps: 300

``rmae pretrain --config configs/demo.yaml steps=100 region_variant=batch`` overrides keys;
values are parsed as YAML scalars (``true``, ``1e-4``, ``[0.9, 0.95]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..models.config import model_keywords, parse_model_name

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names it and says how to fix it."""


@dataclass
class TrainConfig:
    """Pre-training settings (model keywords live in ``model_args``)."""

    model: str = "rmae_vit_tiny_patch8"  # registered name (rmae.list_models())
    model_args: dict[str, Any] = field(default_factory=dict)  # model keywords, e.g. img_size
    data: str = "scenes:train"  # data spec: scenes[:split], photos, folder:PATH, coco:IMAGES:JSON
    region_source: str = "fh"  # fh | slic | gt | panoptic | labelmaps[:DIR] (ignored for mae_*)
    region_cache: str = "default"  # folder for cached region maps; "default" = $RMAE_CACHE or ~/.cache/rmae
    batch_size: int = 64  # global batch per optimizer step (all processes, all accumulation steps)
    accum_steps: int = 1  # gradient accumulation: micro-batch = batch_size / (world size × accum_steps)
    steps: int | None = None  # optimizer steps; wins over epochs
    epochs: float | None = None
    base_lr: float = 1.5e-4  # lr = base_lr × batch_size / 256 (MAE); the paper uses 1e-4 for R-MAE
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None  # max global grad norm; None = no clipping
    checkpoint_every: int = 100  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl lines
    figure_every: int = 0  # steps between reconstruction figures (0 = only at the end)
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    compile: bool = False  # torch.compile the model
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale (paper)
    min_region_size: int = 0  # pixels; smaller segments are not sampled as regions

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.scale = tuple(self.scale)

    @property
    def image_size(self) -> int:
        size = self.model_args.get("img_size", 224)
        return size if isinstance(size, int) else tuple(size)

    @property
    def family(self) -> str:
        return parse_model_name(self.model)[0]

    def to_flat_dict(self) -> dict[str, Any]:
        """The YAML form: training keys and model keywords side by side."""
        d = dataclasses.asdict(self)
        d.pop("model_args")
        d.update(self.model_args)
        d["betas"], d["scale"] = list(self.betas), list(self.scale)
        return d


TRAIN_KEYS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model_args"]


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value (e.g. steps=100, region_variant=batch)")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """YAML reads ``1e-3`` as a string and ``5`` where a float is meant; bring values to the
    field's type (``float``, ``int``, ``bool``, ``X | None``, ``tuple``), or say which key is wrong."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None and (type(None) in typing.get_args(hint)):
        return None
    candidates = args if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    for t in candidates:
        origin = typing.get_origin(t) or t
        try:
            if origin is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                    return value.lower() in ("true", "yes", "1")
                continue
            if origin is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                return float(value)
            if origin is int and (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())) \
                    and not isinstance(value, bool):
                return int(value)
            if origin is tuple and isinstance(value, (list, tuple)):
                inner = typing.get_args(t)
                convert = inner[0] if inner and isinstance(inner[0], type) else (lambda v: v)
                return tuple(convert(v) for v in value)
            if origin is str and isinstance(value, str):
                return value
            if origin is dict and isinstance(value, dict):
                return value
        except (TypeError, ValueError):
            continue
    raise ConfigError(f"{source}: {key}={value!r} is not a valid {hint}")


def _coerce_fields(values: dict[str, Any], cls: type, source: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {k: _coerce(k, v, hints[k], source) for k, v in values.items()}


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Split flat keys into training keys and model keywords; unknown keys are an error."""
    train, model_args, unknown = {}, {}, []
    for key, value in values.items():
        if key in TRAIN_KEYS:
            train[key] = value
        elif key in model_keywords():
            model_args[key] = value
        elif key == "model_config":  # written by us for load_model; rebuilt from the keys above
            continue
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}. Training keys: {TRAIN_KEYS}. "
                          f"Model keywords: {model_keywords()}")
    try:
        parse_model_name(train.get("model", TrainConfig.model))
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    from ..models.config import ModelConfig

    train = _coerce_fields(train, TrainConfig, source)
    model_args = _coerce_fields(model_args, ModelConfig, source)
    try:
        return TrainConfig(model_args=model_args, **train)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def resolve_config_path(path: str | Path) -> Path:
    """A path, or a preset name (``demo`` → ``configs/demo.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    preset = PRESET_DIR / f"{path}.yaml"
    if preset.is_file() and "/" not in str(path):  # a bare name is a preset, even beside a folder of that name
        return preset
    presets = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {path}: no such file; give a YAML path or a preset name ({', '.join(presets)})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_config_path(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of keys to values, got {type(loaded).__name__}")
        values.update(loaded or {})
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = value
    cfg = config_from_dict(values, source + (" + overrides" if overrides else ""))
    validate(cfg, source)
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> None:
    problems = []
    if cfg.batch_size < 1:
        problems.append("batch_size must be >= 1")
    if cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
        problems.append(f"batch_size {cfg.batch_size} must be divisible by accum_steps {cfg.accum_steps}")
    if cfg.steps is None and cfg.epochs is None:
        problems.append("set steps or epochs")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"precision must be fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.checkpoint_every < 1 or cfg.log_every < 1:
        problems.append("checkpoint_every and log_every must be >= 1")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
