"""Where and how widely patch queries attend: attention distance, entropy, and query–key NMI.

Every function takes one layer ``[B, heads, N, N]`` or a sequence of layers and follows the
conventions of :mod:`analysis.metrics._layers` (patch queries, patch keys renormalised, prefix
tokens dropped, per-image float64 values). Each is a :class:`~analysis.metrics._layers.LayerMetric`
(:class:`Distance`, :class:`Entropy`, :class:`NMI`), so an analysis can compute them together in
one chunked pass per layer (:mod:`analysis.metrics.stream`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._layers import AttentionInput, Chunk, HeadMode, LayerMetric, Tensor, entropy, layer_values, pair

__all__ = ["NMI", "Distance", "Entropy", "attention_entropy", "attention_nmi", "mean_attention_distance",
           "patch_distances"]


def patch_distances(grid_hw: tuple[int, int], patch_size: int | Sequence[int],
                    device: torch.device | str | None = None) -> Tensor:
    """Euclidean distances in pixels between patch centres, ``[L, L]`` float64.

    Patch ``i`` at grid cell ``(r, c) = (i // gw, i % gw)`` has its centre at
    ``((r + ½)·p_h, (c + ½)·p_w)`` pixels.
    """
    gh, gw = grid_hw
    ph, pw = pair(patch_size)
    r, c = torch.meshgrid(torch.arange(gh, dtype=torch.float64, device=device),
                          torch.arange(gw, dtype=torch.float64, device=device), indexing="ij")
    pos = torch.stack([(r + 0.5) * ph, (c + 0.5) * pw], dim=-1).reshape(-1, 2)
    # Explicit differences, not torch.cdist: cdist may switch to a matmul formula that loses
    # precision (and gives non-zero self-distances) on larger inputs.
    return (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1).sqrt()


def mean_attention_distance(attn: AttentionInput, grid_hw: tuple[int, int], patch_size: int | Sequence[int],
                            num_prefix: int = 1) -> Tensor:
    """Mean attention distance in pixels, per image and head.

    For patch query ``i`` with renormalised attention ``ã_ij`` over patch keys ``j`` and patch
    centres ``pos``::

        d_i = Σ_j ã_ij · ‖pos_i − pos_j‖₂          (pixels)
        D   = (1/L) Σ_i d_i                          (averaged over patch queries)

    The "attention distance" of Dosovitskiy et al. 2021 (ViT, Fig. 7 / App. D.7) and Raghu et
    al. 2021 ("Do Vision Transformers See Like Convolutional Neural Networks?", Fig. 3): the
    receptive-field size analogue of self-attention. Prefix queries and keys (cls, registers)
    are excluded and rows renormalised over patch keys: they have no position.

    Args:
        attn: ``[B, h, N, N]`` or a sequence of layers.
        grid_hw: ``(gh, gw)`` patch grid; ``L = gh·gw = N − num_prefix``.
        patch_size: ``p`` or ``(p_h, p_w)`` in pixels.
    Returns:
        float64 ``[B, h]`` (one layer) or ``[B, layers, h]``.
    """
    return layer_values(Distance(grid_hw, patch_size), attn, num_prefix, grid_hw[0] * grid_hw[1])


class Distance(LayerMetric):
    """:func:`mean_attention_distance` of one layer at a time → ``[B, h]``; ``heads="mean"`` →
    ``[B, 1]``, the mean over heads, read from the head-mean rows (the distance is linear in the
    rows, so it equals the mean of the per-head distances, for ``h``-fold less work)."""

    def __init__(self, grid_hw: tuple[int, int], patch_size: int | Sequence[int], heads: HeadMode = "each") -> None:
        self.grid_hw, self.patch_size, self.heads = grid_hw, patch_size, heads
        self.dist: Tensor | None = None

    def begin(self, attn: Tensor) -> None:
        self.parts: list[Tensor] = []

    def update(self, chunk: Chunk) -> None:
        p = chunk.head_mean[:, None] if self.heads == "mean" else chunk.rows
        if self.dist is None or self.dist.device != p.device or self.dist.dtype != p.dtype:
            self.dist = patch_distances(self.grid_hw, self.patch_size, p.device).to(p.dtype)
        self.parts.append((p * self.dist[chunk.queries]).sum(-1).double())  # [B, h, q] pixels

    def result(self) -> Tensor:
        return torch.cat(self.parts, dim=-1).mean(-1)


def attention_entropy(attn: AttentionInput, num_prefix: int = 1) -> Tensor:
    """Mean attention entropy in nats, per image and head.

    ``H_i = −Σ_j ã_ij log ã_ij`` over patch keys (rows renormalised without prefix keys, ``0 log 0 = 0``),
    averaged over patch queries. Ranges from 0 (every query attends one key) to ``log L``
    (uniform attention). Used as a locality / focus measure in e.g. Zhai et al. 2023
    ("Stabilizing Transformer Training by Preventing Attention Entropy Collapse") and Park et al.
    2023; here in nats, over patch keys only.

    Returns: float64 ``[B, h]`` or ``[B, layers, h]``.
    """
    return layer_values(Entropy(), attn, num_prefix)


class Entropy(LayerMetric):
    """:func:`attention_entropy` of one layer at a time → ``[B, h]``."""

    def begin(self, attn: Tensor) -> None:
        self.parts: list[Tensor] = []

    def update(self, chunk: Chunk) -> None:
        self.parts.append(chunk.entropy)

    def result(self) -> Tensor:
        return torch.cat(self.parts, dim=-1).mean(-1)


def attention_nmi(attn: AttentionInput, num_prefix: int = 1) -> Tensor:
    """Normalised mutual information between query and key position, per image and head.

    Park et al. 2023, "What Do Self-Supervised Vision Transformers Learn?" (ICLR), §2: treat a
    head's attention as a joint distribution of query position ``Q`` and key position ``K``
    with ``p(q) = 1/L`` (uniform over patch queries) and ``p(k|q) = ã_qk``. Then::

        p(k)     = (1/L) Σ_q ã_qk
        I(Q; K)  = H(K) − H(K|Q) = H(p(k)) − (1/L) Σ_q H(ã_q·)
        NMI      = I(Q; K) / sqrt(H(Q) · H(K)),       H(Q) = log L

    (their normalisation, ``mi / sqrt(eq * ek)``). NMI ≈ 0 means *attention collapse*: every
    query attends the same keys (the map does not depend on the query); NMI = 1 for one-hot
    attention to distinct keys (e.g. each patch attends only itself). Unlike the original code
    (which uses the full ``[N, N]`` map), prefix tokens are dropped and rows renormalised over
    patch keys (:mod:`analysis.metrics._layers`). When ``H(K) = 0`` (every query attends one and
    the same key) I = 0 and NMI is defined as 0.

    Returns: float64 ``[B, h]`` or ``[B, layers, h]``.
    """
    return layer_values(NMI(), attn, num_prefix)


class NMI(LayerMetric):
    """:func:`attention_nmi` of one layer at a time → ``[B, h]``: the key marginal ``p(k)`` and
    the mean row entropy ``H(K|Q)`` accumulate (float64) over query chunks."""

    def begin(self, attn: Tensor) -> None:
        self.row_entropy: Tensor | float = 0.0  # Σ_q H(ã_q·), [B, h]
        self.key_mass: Tensor | float = 0.0  # Σ_q ã_qk, [B, h, L]
        self.L = 0

    def update(self, chunk: Chunk) -> None:
        self.row_entropy = self.row_entropy + chunk.entropy.sum(-1)
        self.key_mass = self.key_mass + chunk.rows.sum(dim=-2).double()
        self.L += chunk.queries.stop - chunk.queries.start

    def result(self) -> Tensor:
        h_k = entropy(self.key_mass / self.L)  # H(K), p(k) = mean over queries
        h_k_given_q = self.row_entropy / self.L
        mi = (h_k - h_k_given_q).clamp_min(0.0)  # ≥ 0 exactly; clamp float rounding
        h_q = torch.log(torch.tensor(float(self.L), dtype=torch.float64, device=h_k.device))
        denom = torch.sqrt(h_q * h_k)
        return torch.where(denom > 0, mi / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(mi))
