"""Pre-training settings: :class:`TrainConfig`, presets shipped in ``rmae/presets/``, ``key=value``.

A config is flat YAML: the training keys below plus any model keyword (``img_size``,
``num_regions``, ``region_variant``, …; see ``rmae.model_keywords()``), e.g.::

    model: rmae_vit_tiny_patch8
    img_size: 64
    data: scenes:train
    batch_size: 64
    steps: 300

``rmae pretrain --config demo steps=100 region_variant=batch`` overrides keys; values are YAML
scalars (``true``, ``1e-4``, ``[0.9, 0.95]``), typed and range-checked by :mod:`rmae.settings`
— the machinery every subcommand uses.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from ..device import DeviceError, check_device_name
from ..models.config import ModelConfig, config_from_name, model_keywords, parse_model_name
from ..settings import ConfigError, build, coerce, parse_override, resolve_config, setting, unknown_keys_message

__all__ = ["ConfigError", "TRAIN_KEYS", "TrainConfig", "config_from_dict", "load_config", "parse_override", "validate"]


@dataclass
class TrainConfig:
    """Pre-training settings (model keywords live in ``model_args``)."""

    model: str = setting("rmae_vit_tiny_patch8", "registered model name (rmae models)")
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # model keywords, e.g. img_size
    data: str = setting("scenes:train", "data spec: scenes[:split][:N], photos, folder:PATH, coco:IMAGES:JSON")
    region_source: str = setting("fh", "fh | slic | gt | panoptic | labelmaps[:DIR] (ignored for mae_*)")
    region_cache: str = setting("default", 'region-map cache folder; "default" = $RMAE_CACHE or ~/.cache/rmae, "none" = off')
    batch_size: int = setting(64, "global batch per optimizer step (all processes and accumulation steps)",
                              low=1, high=1 << 20)
    accum_steps: int = setting(1, "gradient accumulation steps per optimizer step", low=1, high=4096)
    steps: int | None = setting(None, "optimizer steps (wins over epochs)", low=1, high=10**9)
    epochs: float | None = setting(None, "epochs over the data (when steps is not set)", low=0, low_open=True, high=1e6)
    base_lr: float = setting(1.5e-4, "lr = base_lr × batch_size / 256 (MAE); the paper uses 1e-4 for R-MAE",
                             low=0, low_open=True)
    min_lr: float = setting(0.0, "lr at the end of the cosine", low=0)
    warmup_steps: int = setting(0, "linear warmup steps", low=0, high=10**9)
    weight_decay: float = setting(0.05, "AdamW weight decay (none on norms, biases, tokens)", low=0, high=10)
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas", low=0, high=1, high_open=True)
    clip_grad: float | None = setting(None, "max global gradient norm (None = no clipping)", low=0, low_open=True)
    checkpoint_every: int = setting(100, "steps between checkpoints (one is also written at the end)", low=1)
    keep_checkpoints: int = setting(2, "newest checkpoints kept on disk", low=1, high=10**6)
    log_every: int = setting(10, "steps between metrics.jsonl / TensorBoard points", low=1)
    figure_every: int = setting(0, "steps between reconstruction figures (0 = only at the end)", low=0)
    seed: int = setting(0, "seed of weights, data order, augmentation and masks", low=0, high=2**63 - 1)
    num_workers: int = setting(2, "data-loader worker processes", low=0, high=256)
    device: str = setting("auto", "auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps")
    precision: str = setting("fp32", "fp32 | bf16 | fp16 autocast (fp16 adds a grad scaler)",
                             choices=("fp32", "bf16", "fp16"))
    compile: bool = setting(False, "torch.compile the model")
    scale: tuple[float, float] = setting((0.2, 1.0), "RandomResizedCrop area range (paper 0.2–1)",
                                         low=0, low_open=True, high=1)
    min_region_size: int = setting(0, "pixels; smaller segments are not sampled as regions", low=0)

    @property
    def image_size(self) -> int | tuple[int, int]:
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


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Split flat keys into training keys and model keywords (each typed and range-checked);
    unknown keys are an error that lists the valid ones."""
    train, model_args, unknown = {}, {}, []
    for key, value in values.items():
        if key in TRAIN_KEYS:
            train[key] = value
        elif key in model_keywords():
            model_args[key] = value
        elif key == "model_config":  # written by us for load_model; rebuilt from the keys above
            continue
        else:
            unknown.append(str(key))
    if unknown:
        raise ConfigError(unknown_keys_message(source, unknown, [*TRAIN_KEYS, *model_keywords()]))
    cfg = build(TrainConfig, train, source)
    try:
        parse_model_name(cfg.model)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    # Model keywords are typed against ModelConfig's fields (the same coercion as every setting).
    model_types = build_model_args(model_args, source)
    cfg.model_args = model_types
    return cfg


def build_model_args(values: dict[str, Any], source: str) -> dict[str, Any]:
    hints = typing.get_type_hints(ModelConfig)
    return {k: coerce(k, v, hints[k], source) for k, v in values.items()}


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML file or preset name (``demo``, ``small``, ``base``), then ``key=value`` overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source, loaded = resolve_config(path)
        values.update(loaded)
    for text in overrides or []:
        key, value = parse_override(text)
        values[key] = value
    source += " + overrides" if overrides else ""
    cfg = config_from_dict(values, source)
    validate(cfg, source)
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> None:
    """Checks across keys, and that the model the config describes can be built — before
    anything is allocated or a run folder is touched."""
    problems = []
    if cfg.batch_size % cfg.accum_steps:
        problems.append(f"batch_size {cfg.batch_size} must be divisible by accum_steps {cfg.accum_steps}")
    if cfg.steps is None and cfg.epochs is None:
        problems.append("set steps or epochs")
    if cfg.scale[0] > cfg.scale[1]:
        problems.append(f"scale {list(cfg.scale)} must be (low, high) with low <= high")
    if cfg.min_lr > cfg.base_lr * cfg.batch_size / 256:
        problems.append(f"min_lr {cfg.min_lr} is above the peak lr {cfg.base_lr * cfg.batch_size / 256:g}")
    try:
        check_device_name(cfg.device)
    except DeviceError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    try:
        mc = config_from_name(cfg.model, **cfg.model_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    if not 0.0 < mc.mask_ratio < 1.0:
        raise ConfigError(f"{source}: mask_ratio={mc.mask_ratio} leaves nothing to predict or nothing to see; "
                          "pre-training needs 0 < mask_ratio < 1 (MAE uses 0.75)")
    from ..data import DataError, parse_data_spec, parse_region_source

    try:  # the syntax of the data and region specs (their files are read when the run starts)
        spec = parse_data_spec(cfg.data)
        if mc.has_region_branch:
            parse_region_source(cfg.region_source, spec.root)
    except DataError as e:
        raise ConfigError(f"{source}: {e}") from None
