"""What a probe run is asked to do: :class:`ProbeConfig`, its defaults, and :class:`ProbeError`.

One dataclass carries every setting of :func:`analysis.probes.run_probe`; ``rmae probe`` builds
it from ``--flags`` and ``key=value`` words with :mod:`rmae.settings` (typed, range-checked, the
same messages as every subcommand), ``rmae analyze`` and notebooks construct it directly::

    ProbeConfig(probe="linear", data="scenes:train:2000", eval_data="scenes:val:500", device="cpu")

Settings left at None take the probe's own default (``DEFAULT_*`` below).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from rmae.device import check_device_name
from rmae.errors import UserError
from rmae.settings import check_range, setting

from ..features import POOLINGS
from ..registry import PROBE_KEYS

PROBES: tuple[str, ...] = tuple(PROBE_KEYS)  # linear, knn, attentive, dense
#: probes that read the patch tokens (pool "tokens"); the others read one vector per image
TOKEN_PROBES = ("attentive", "dense")
DEFAULT_POOL = {"linear": "cls", "knn": "cls", "attentive": "tokens", "dense": "tokens"}
DEFAULT_LRS = {"sgd": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
               "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}
DEFAULT_OPTIMIZER = {"linear": "sgd", "attentive": "adamw", "dense": "sgd"}
DEFAULT_EPOCHS = {"linear": 100, "attentive": 50, "dense": 50}
DEFAULT_BATCH = {"linear": 256, "attentive": 128, "dense": 32}  # dense: images (× L patches)
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adamw": 0.05}  # MAE linprobe: none; AIM probe: AdamW 0.05
DEFAULT_C = (0.01, 0.1, 1.0, 10.0, 100.0)
OPTIMIZERS = ("sgd", "adamw")
SOLVERS = ("torch", "sklearn")
UPSAMPLING = ("bilinear", "nearest", "bicubic")


class ProbeError(UserError, ValueError):
    """A probe cannot run as asked (missing labels, bad setting); the message says what to do."""


def _defaults(table: dict[str, object]) -> str:
    return ", ".join(f"{k} {v}" for k, v in table.items())


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of one probe of one run folder (see the module docstring)."""

    probe: str = setting(help="linear | knn | attentive | dense (rmae probe takes several: linear,knn)",
                         choices=PROBES)
    data: str = setting(help="training data spec, e.g. scenes:train:2000")
    eval_data: str | None = setting(None, "eval data spec (default: scenes:val of at most as many images "
                                          "when data is scenes:train; other data need one)")
    layer: int = setting(-1, "encoder block, 0..depth-1 or negative from the end (-1: last, with the final norm)")
    pool: str | None = setting(None, "image vector of linear/knn: cls or mean (default cls); "
                                     "attentive/dense read patch tokens", choices=POOLINGS)
    solver: str = setting("torch", "linear only: torch, or sklearn = LogisticRegression over a grid of C",
                          choices=SOLVERS)
    epochs: int | None = setting(None, f"epochs over the cached features (default: {_defaults(DEFAULT_EPOCHS)})",
                                 low=1)
    lrs: tuple[float, ...] | None = setting(None, "learning-rate grid, e.g. 0.01,0.1,1 (default: sgd 1e-3…1, "
                                                  "adamw 1e-4…1e-2)", low=0, low_open=True)
    optimizer: str | None = setting(None, "sgd or adamw (default: sgd for linear/dense, adamw for attentive)",
                                    choices=OPTIMIZERS)
    weight_decay: float | None = setting(None, "default 0 (sgd), 0.05 (adamw)", low=0)
    batch_size: int | None = setting(None, f"training minibatch (default: {_defaults(DEFAULT_BATCH)}; "
                                           "dense counts images)", low=1)
    holdout: float = setting(0.2, "fraction of the training data that picks the lr", low=0, high=1,
                             low_open=True, high_open=True)
    patience: int = setting(10, "stop training once no head's held-out score improved for this many epochs "
                                "(each head keeps its best epoch; 0 = run every epoch)", low=0)
    k: int = setting(20, "k-NN: neighbours", low=1)
    temperature: float = setting(0.07, "k-NN: T in exp(sim / T)", low=0, low_open=True)
    Cs: tuple[float, ...] | None = setting(None, "sklearn: C grid (default 0.01,0.1,1,10,100)", low=0,
                                           low_open=True, flag="--C")
    attn_heads: int | None = setting(None, "attentive: attention heads (default D/64)", low=1)
    num_queries: int = setting(1, "attentive: learned queries", low=1, flag="--queries")
    upsample: str = setting("bilinear", "dense: how patch logits reach pixels", choices=UPSAMPLING)
    seed: int = setting(0, "probe seed: init, minibatches, held-out split", low=0)
    data_seed: int = setting(0, "seed of the generated scenes", low=0)
    crop_pct: float = setting(1.0, "centre-crop fraction before resizing", low=0, high=1, low_open=True)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps (auto: CUDA, else MPS, else CPU)")
    extract_batch_size: int = setting(64, "images per encoder batch while extracting features", low=1)
    num_workers: int = setting(0, "data-loader workers while extracting features", low=0, flag="--workers")
    threads: int | None = setting(None, "intra-op threads while training (default: 1 for small steps)", low=1)
    cache: bool = setting(True, "read and write the feature cache RUN/analysis/features/")

    def __post_init__(self) -> None:
        # Constructed directly (analyze, notebooks) or by rmae.settings.build: checked alike.
        if self.probe not in PROBES:
            raise ProbeError(f"unknown probe {self.probe!r}; choose one of {', '.join(PROBES)}")
        for f in dataclasses.fields(self):
            check_range(f.name, getattr(self, f.name), f.metadata, "probe settings")
        for name in ("lrs", "Cs"):
            values = getattr(self, name)
            if values is not None:
                if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                    raise ProbeError(f"{name} must be positive numbers, e.g. 0.01,0.1,1; got {values!r}")
                object.__setattr__(self, name, tuple(float(v) for v in values))
        check_device_name(self.device)
        if self.probe in TOKEN_PROBES and self.pool not in (None, "tokens"):
            raise ProbeError(f"the {self.probe} probe reads patch tokens: use pool 'tokens', not {self.pool!r}")
        if self.probe not in TOKEN_PROBES and self.pool == "tokens":
            raise ProbeError(f"the {self.probe} probe needs one vector per image: use pool 'cls' or 'mean'")
        if self.solver == "sklearn" and self.probe != "linear":
            raise ProbeError("solver 'sklearn' applies to the linear probe only")

    @property
    def resolved_pool(self) -> str:
        return self.pool or DEFAULT_POOL[self.probe]

    @property
    def resolved_optimizer(self) -> str:
        return self.optimizer or DEFAULT_OPTIMIZER.get(self.probe, "sgd")
