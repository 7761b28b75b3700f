"""What the attribution page computes, without Streamlit: a model and a prepared image in, numpy
out (tested directly; :mod:`dashboards.views.attribution` caches it). The two scores and their
maps are :mod:`analysis.attribution_views`'; this module arranges them for one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from analysis.attribution_views import Targets, attribution_maps, fit_targets, pool_of

from .images import Prepared

#: labelled data the probe head and the class means are fitted on (the probe's default training data
#: for up to 250 evaluation images, so a run that `rmae analyze` probed reads its feature cache)
PROBE_DATA = "scenes:train:500"


# ------------------------------------------------------------------------------------------
# attributions


def probe_targets(run: str | Path, model: nn.Module, data: str = PROBE_DATA, device: str = "cpu") -> Targets:
    """The two scores of a run folder: a linear head and class means fitted on ``data``'s features,
    read from (or written to) the run's feature cache — the same entry as the linear probe's."""
    from analysis.feature_cache import load_features

    pool = pool_of(model)
    feats = load_features(run, data, layer=-1, pool=pool, device=device, progress=False)
    labelled = feats.has_labels
    about = (f"linear head on the {pool} embedding, fitted on {len(feats)} labelled images of {feats.spec}" if labelled
             else f"{feats.spec} has no labels: similarity to its mean embedding")
    return fit_targets(feats.features, feats.labels if labelled else None, pool=pool, about=about,
                       class_names=feats.class_names)


@dataclass
class AttributionView:
    """One image's maps: ``maps[target][method]`` float32 ``[gh, gw]`` ≥ 0, what each target
    explains, and the explained score."""

    maps: dict[str, dict[str, np.ndarray]]
    explained: dict[str, str]
    scores: dict[str, float]


def attribution_view(model: nn.Module, prepared: Prepared, targets: Targets, ig_steps: int = 16) -> AttributionView:
    """IG, occlusion and Grad-CAM of both scores for one prepared image (its class: the head's
    prediction, as a dashboard image has no label)."""
    got = attribution_maps(model, prepared.tensor(), targets, None, ig_steps=ig_steps)
    return AttributionView({t: {m: a[0] for m, a in by.items()} for t, by in got.maps.items()},
                           {t: e[0] for t, e in got.explained.items()}, {t: float(s[0]) for t, s in got.scores.items()})
