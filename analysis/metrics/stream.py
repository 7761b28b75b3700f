"""The per-image attention metrics of ``rmae analyze``, computed layer by layer while the forward
pass runs, so no layer's ``[B, h, N, N]`` weights outlive the layer.

    metrics = ImageMetrics(info, instances)                    # one batch
    _, rec = attention_pass(model, images, keys=[-1], reduce=metrics, keep=[-1])
    metrics.finish(rec.keys[-1])                               # TokenCut on the last layer's keys
    metrics.values                                             # {name: [B] or [B, layers]}

Every layer goes through one chunked pass over its patch queries
(:func:`analysis.metrics._layers.reduce_layer`): the renormalised rows, their head mean and row
entropies are computed once and read by distance, entropy, NMI, instance-awareness and
selectivity alike; ground truth (patch ownership, the objects' pixel counts) is prepared once per
batch. With ``dtype=torch.float64`` the values equal those of the public one-metric functions on
the stacked layers; the default float32 rows are within float32 rounding of them.

Per-image values (names from :mod:`analysis.registry`): ``attention_distance``,
``attention_entropy``, ``attention_nmi`` ``[B, layers]`` (mean over heads); with instances
``instance_mass`` / ``instance_leak`` / ``instance_jaccard`` (head-mean maps),
``instance_selectivity``, ``cls_jaccard`` (with a cls token) ``[B, layers]`` and ``corloc`` ``[B]``.
"""

from __future__ import annotations

import torch

from analysis.encoder import EncoderInfo
from analysis.groundtruth import boxes_from_instances

from ._layers import LayerMetric, Tensor, reduce_layer
from .attention import NMI, Distance, Entropy
from .discovery import corloc, tokencut
from .dino import ClsJaccardLayer
from .instance import InstanceLayer, SelectivityLayer

__all__ = ["ImageMetrics"]

_INSTANCE = ("instance_mass", "instance_leak", None, "instance_jaccard")  # InstanceLayer's last axis


class ImageMetrics:
    """Reducer of one batch: call it with ``(layer, weights [B, h, N, N])`` for every layer in
    order (``analysis.encoder.recording(reduce=…)`` does), then :meth:`finish`.

    ``instances``: int ``[B, H, W]`` instance maps on the weights' device, or None (then only
    distance, entropy and NMI are computed). ``dtype``: the precision of the rows (float32: fast,
    within float32 rounding of the float64 values; see :mod:`analysis.metrics._layers`).
    """

    def __init__(self, info: EncoderInfo, instances: Tensor | None, dtype: torch.dtype = torch.float32) -> None:
        self.info, self.dtype = info, dtype
        self.layers: dict[str, LayerMetric] = {"attention_distance": Distance(info.grid, info.patch_size, "mean"),
                                               "attention_entropy": Entropy(), "attention_nmi": NMI()}
        self.instances = instances
        if instances is not None:
            p = info.patch_size
            self.layers["instance"] = InstanceLayer(instances, p)
            self.layers["instance_selectivity"] = SelectivityLayer(instances, p)
            if info.has_cls:
                self.layers["cls_jaccard"] = ClsJaccardLayer(instances, p, num_prefix=info.num_prefix_tokens)
        self._per_layer: dict[str, list[Tensor]] = {k: [] for k in self.layers}
        self.values: dict[str, Tensor] = {}

    def __call__(self, layer: int, weights: Tensor) -> None:
        L = self.info.grid[0] * self.info.grid[1]
        results = reduce_layer(weights, self.info.num_prefix_tokens, list(self.layers.values()), L, dtype=self.dtype)
        for key, value in zip(self.layers, results):
            self._per_layer[key].append(value)

    def finish(self, last_keys: Tensor | None = None) -> dict[str, Tensor]:
        """Stack the layers → :attr:`values`; with instances, ``last_keys [B, N, D]`` (the last
        layer's keys, prefix included) give TokenCut's CorLoc."""
        out: dict[str, Tensor] = {}
        for key, parts in self._per_layer.items():
            v = torch.stack(parts, dim=1)  # [B, layers, ...]
            if key == "instance":
                out.update({name: v[..., i] for i, name in enumerate(_INSTANCE) if name is not None})
            else:
                out[key] = v.mean(-1) if v.ndim == 3 else v  # distance, entropy, NMI: mean over heads
        if self.instances is not None and last_keys is not None:
            found = tokencut(last_keys[:, self.info.num_prefix_tokens:], self.info.grid, self.info.patch_size)
            out["corloc"] = corloc(found.boxes, boxes_from_instances(self.instances))
        self.values = out
        return out
