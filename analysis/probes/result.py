"""What a probe returns (:class:`ProbeResult`), what it is compared with (chance), and the label
checks every classification probe makes before it trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..registry import PROBE_KEYS
from .config import ProbeError


@dataclass
class ProbeResult:
    """Outcome of one probe on in-memory features.

    ``value``: eval score of the chosen head (accuracy or mIoU, in [0, 1]); ``grid``: held-out
    score per grid value (lr, or C for sklearn), keys formatted with ``%g``; ``best_lr``: chosen
    lr (None for k-NN and sklearn, which record ``k``/``best_C`` in ``extra``); ``chance``: the
    score of always predicting the most frequent training class (or patch category).
    """

    probe: str
    metric: str
    value: float
    best_lr: float | None
    grid: dict[str, float]
    chance: float
    n_train: int
    n_eval: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "key": PROBE_KEYS[self.probe], "metric": self.metric,
                "value": self.value, "best_lr": self.best_lr, "grid": self.grid,
                "chance": self.chance, "n_train": self.n_train, "n_eval": self.n_eval, **self.extra}


def check_labels(y: torch.Tensor, what: str) -> None:
    """A classification probe needs a label ≥ 0 for every image."""
    if y.numel() == 0 or bool((y < 0).any()):
        raise ProbeError(f"the {what} data have no image labels for every image; a classification "
                         "probe needs labelled data (scenes, or folder:PATH with one sub-folder per class)")


def count_labels(*tensors: torch.Tensor | None, at_least: int = 0) -> int:
    """1 + the largest label in ``tensors`` (at least ``at_least``)."""
    m = at_least
    for t in tensors:
        if t is not None and t.numel():
            m = max(m, int(t.max()) + 1)
    return m


def majority_chance(train_y: torch.Tensor, eval_y: torch.Tensor) -> float:
    """Accuracy on ``eval_y`` of always answering the most frequent class of ``train_y``."""
    return float((eval_y == torch.bincount(train_y).argmax()).double().mean())
