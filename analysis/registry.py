"""The metrics vocabulary: every number ``rmae analyze`` reports, defined once.

Each :class:`Metric` says what it measures, its unit, which direction (if any) is better, whether
it has a value per layer, and where its null and ceiling lie. The report, its figures, the
dashboard and the notebooks read names, titles and directions from here; ``results.json`` keys
are these names (stable: other code relies on them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # the key in results.json
    title: str  # short human name (tables, figure titles)
    description: str  # one sentence: what is measured
    group: str  # attention | instance | localization | probe | interactive
    unit: str = ""
    better: int | None = None  # +1 higher is better, -1 lower is better, None descriptive only
    per_layer: bool = False
    null: str = ""  # where chance / a content-free model lies
    ceiling: str = ""  # what an oracle built from the ground truth scores


_ALL = [
    Metric("attention_distance", "Mean attention distance", "mean distance (px) from a patch query to the keys "
           "it attends, heads averaged", "attention", unit="px", per_layer=True,
           null="uniform attention: the mean pairwise patch distance", ceiling="—"),
    Metric("attention_entropy", "Attention entropy", "entropy (nats) of a patch query's attention over patch keys",
           "attention", unit="nats", per_layer=True, null="uniform attention: ln L", ceiling="0 (one key)"),
    Metric("attention_nmi", "Attention NMI (query ↔ key)", "normalised mutual information between query and key "
           "positions (low = every query attends alike: collapse)", "attention", per_layer=True,
           null="0 (all queries attend alike)", ceiling="1 (each query its own key)"),
    Metric("instance_mass", "Instance mass", "attention mass of an instance's patch queries on their own instance "
           "(descriptive: locality alone raises it)", "instance", unit="fraction", per_layer=True,
           null="uniform attention: the instance's patch share", ceiling="1 (attention exactly on the instance)"),
    Metric("instance_leak", "Instance leak", "attention mass leaked to other instances (descriptive)", "instance",
           unit="fraction", per_layer=True, null="uniform: the other instances' patch share", ceiling="0"),
    Metric("instance_jaccard", "Instance Jaccard (60 % mass)", "Jaccard of a query's 60 %-mass attention map with "
           "its instance (descriptive: locality alone raises it)", "instance", per_layer=True),
    Metric("instance_selectivity", "Instance selectivity", "own-instance attention mass beyond a distance-matched "
           "null that keeps each row's spatial profile but breaks its tie to the instance", "instance", better=+1,
           per_layer=True, null="≈ 0 for a content-free (position-only) encoder",
           ceiling="attention exactly on the query's instance (positive control)"),
    Metric("cls_jaccard", "CLS Jaccard (DINO protocol)", "DINO's protocol: each head's 60 %-mass CLS map at pixel "
           "resolution, best head per object, averaged over objects", "localization", better=+1, per_layer=True,
           null="a map on random patches of the same size", ceiling="1"),
    Metric("corloc", "CorLoc (TokenCut)", "TokenCut object discovery on last-layer keys: box IoU ≥ 0.5 with any "
           "object", "localization", better=+1, null="a centred box", ceiling="1"),
    Metric("linear_probe", "Linear probe", "linear probe accuracy (cls token, BatchNorm + Linear, MAE)", "probe",
           better=+1, null="the most frequent training class", ceiling="1"),
    Metric("knn", "k-NN", "weighted k-NN accuracy (cls token, k = 20, T = 0.07, DINO)", "probe", better=+1,
           null="the most frequent training class", ceiling="1"),
    Metric("attentive_probe", "Attentive probe", "attentive probe accuracy (learned-query cross-attention over patch "
           "tokens)", "probe", better=+1, null="the most frequent training class", ceiling="1"),
    Metric("dense_miou", "Dense probe mIoU", "dense per-patch linear probe, mIoU", "probe", better=+1,
           null="every pixel the most frequent category", ceiling="1"),
    Metric("interactive_iou", "Interactive IoU", "interactive segmentation IoU from clicked patches (region "
           "decoder), at the headline click count", "interactive", better=+1,
           null="the strongest baseline given the same information", ceiling="1"),
]

METRICS: dict[str, Metric] = {m.name: m for m in _ALL}
LAYER_METRICS: tuple[str, ...] = tuple(m.name for m in _ALL if m.per_layer)
#: probe name (``rmae probe --probe``) → results.json name
PROBE_KEYS: dict[str, str] = {"linear": "linear_probe", "knn": "knn", "attentive": "attentive_probe",
                              "dense": "dense_miou"}


def metric(name: str) -> Metric:
    """The registry entry of ``name``; an unknown name gets a descriptive placeholder (results
    written by other versions may carry metrics this one does not define)."""
    return METRICS.get(name) or Metric(name, name.replace("_", " "), name, "other")


def names(group: str | None = None) -> list[str]:
    return [m.name for m in _ALL if group is None or m.group == group]
