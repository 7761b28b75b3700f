"""Probes of frozen encoders: linear, weighted k-NN, attentive and dense (per-patch → mIoU).

    from analysis.probes import ProbeConfig, run_probe
    r = run_probe("runs/mae", ProbeConfig(probe="linear", data="scenes:train:2000", eval_data="scenes:val:500"))
    r["value"], r["best_lr"], r["grid"]      # eval accuracy, chosen lr, {lr: held-out accuracy}

Probes (:data:`RESULT_KEYS` maps them to the names results.json uses):

- ``linear`` → ``linear_probe``: MAE's linear probe (BatchNorm(affine=False) + Linear; or
  scikit-learn's LogisticRegression with ``solver="sklearn"``).
- ``knn`` → ``knn``: DINO's weighted k-NN (k = 20, T = 0.07).
- ``attentive`` → ``attentive_probe``: an AIM-style attentive probe — learned queries
  cross-attend over the patch tokens; it differs from AIM's head by a value bias and a LayerNorm
  before the Linear.
- ``dense`` → ``dense_miou``: a per-patch linear classifier, upsampled to pixels, scored by mIoU.

Every trained probe trains one head per learning rate in one pass and picks the lr on held-out
training data (:mod:`.fit`). Scores are fractions in [0, 1]; results also carry ``chance``, the
score of always predicting the most frequent training class (or patch category).

Rooms: :mod:`.config` (ProbeConfig, defaults, ProbeError), :mod:`.heads` (grids of heads),
:mod:`.fit` (training and selection), :mod:`.classify` (linear, k-NN, attentive),
:mod:`.dense` (dense probe, mIoU), :mod:`.result` (ProbeResult, chance), :mod:`.run`
(run folders: features, probe, JSON), :mod:`.cli` (``rmae probe``).
"""

from ..registry import PROBE_KEYS as RESULT_KEYS
from .classify import attentive_probe, knn_probe, knn_scores, linear_probe
from .config import PROBES, ProbeConfig, ProbeError
from .dense import dense_probe
from .result import ProbeResult
from .run import default_eval_data, result_path, run_probe

__all__ = ["PROBES", "RESULT_KEYS", "ProbeConfig", "ProbeError", "ProbeResult", "attentive_probe",
           "default_eval_data", "dense_probe", "knn_probe", "knn_scores", "linear_probe", "result_path",
           "run_probe"]
