"""Metrics of attention, instance-awareness, representation similarity and object discovery.

One family per module; every formula is written out in its function's docstring with the paper
it comes from. The conventions every attention metric shares (patch queries, patch keys
renormalised, prefix tokens dropped, per-image values, NaN, float64) are in
:mod:`analysis.metrics._layers`.

- :mod:`.attention` — attention distance, entropy, query–key NMI (pure functions);
- :mod:`.dino` — DINO's keep-the-top-mass threshold and the cls-map Jaccard (pure);
- :mod:`.instance` — instance-awareness against ground-truth instances, and its locality-corrected
  selectivity (pure);
- :mod:`.cka` — linear CKA; :func:`layer_cka` runs two encoders;
- :mod:`.discovery` — TokenCut and CorLoc; :func:`discover_objects` runs the encoder;
- :mod:`.stream` — the per-image values ``rmae analyze`` reports, computed layer by layer while the
  forward pass runs (each metric above is also a per-layer ``LayerMetric``).

Ground truth at patch resolution (ownership, foreground, boxes) lives in
:mod:`analysis.groundtruth`.
"""

from .attention import attention_entropy, attention_nmi, mean_attention_distance, patch_distances
from .cka import StreamingCKA, layer_cka, linear_cka
from .dino import cls_jaccard, keep_mass_threshold
from .discovery import TokenCut, box_iou, corloc, discover_objects, tokencut
from .instance import InstanceAwareness, instance_awareness, instance_selectivity

__all__ = [
    "InstanceAwareness",
    "StreamingCKA",
    "TokenCut",
    "attention_entropy",
    "attention_nmi",
    "box_iou",
    "cls_jaccard",
    "corloc",
    "discover_objects",
    "instance_awareness",
    "instance_selectivity",
    "keep_mass_threshold",
    "layer_cka",
    "linear_cka",
    "mean_attention_distance",
    "patch_distances",
    "tokencut",
]
