"""Representation similarity between encoders: linear CKA (Kornblith et al. 2019), layer by layer.

:func:`linear_cka` and :class:`StreamingCKA` are pure functions of features; :func:`layer_cka`
**runs two encoders** over a dataset (through :func:`analysis.encoder.block_tokens`, so ours and
any timm ViT alike) and accumulates their layer × layer CKA matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn

from analysis.encoder import block_tokens, model_device, num_prefix_tokens, pool_tokens

Tensor = torch.Tensor

__all__ = ["StreamingCKA", "layer_cka", "linear_cka"]


def linear_cka(X: Tensor, Y: Tensor) -> Tensor:
    """Linear centred kernel alignment between two representations of the same ``n`` examples.

    Kornblith et al. 2019 ("Similarity of Neural Network Representations Revisited", Eq. 5),
    feature-space form: with column-centred ``X [n, p]``, ``Y [n, q]``::

        CKA(X, Y) = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F · ‖Yᵀ Y‖_F)

    In [0, 1]; invariant to orthogonal transforms and isotropic scaling of either side (not to
    arbitrary invertible linear maps). NaN if either side has zero variance.

    Returns: float64 scalar.
    """
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must be [n, p] and [n, q] with the same n, got {list(X.shape)}, {list(Y.shape)}")
    X = X.double() - X.double().mean(0)
    Y = Y.double() - Y.double().mean(0)
    return (Y.T @ X).pow(2).sum() / ((X.T @ X).norm() * (Y.T @ Y).norm())


class StreamingCKA:
    """Layer × layer linear CKA between two models, accumulated over batches.

    Memory does not grow with the dataset: per layer it keeps ``n``, ``Σx`` and ``XᵀX`` (and the
    same for Y), and one cross block ``XᵢᵀYⱼ`` per layer pair — all float64. At the end the
    sums are centred exactly (feature-space formula, :func:`linear_cka`)::

        Cxy = Σ (x − x̄)(y − ȳ)ᵀ = Σ x yᵀ − n · x̄ ȳᵀ,   likewise Cxx, Cyy
        CKA_ij = ‖C_{x_i y_j}‖²_F / (‖C_{x_i x_i}‖_F · ‖C_{y_j y_j}‖_F)

    To avoid cancellation in ``Σ x yᵀ − n x̄ ȳᵀ`` when features have large means (ViT residual
    streams do), every row is first shifted by the first batch's mean (any constant shift
    leaves the centred sums unchanged). Cost: ``(Σ_i p_i)·(Σ_j q_j)`` float64s for the cross
    sums — ViT-B (13 × 768 per side) ≈ 0.8 GB, ViT-Tiny ≈ 50 MB.

    Usage: ``update(feats_a, feats_b)`` per batch with lists of ``[n, p_i]`` / ``[n, q_j]``
    tensors (same ``n`` rows, i.e. the same examples); ``compute() → [La, Lb]``.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift_a: list[Tensor] | None = None
        self._shift_b: list[Tensor] | None = None

    def update(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> None:
        xs = [f.detach().double().reshape(f.shape[0], -1) for f in feats_a]
        ys = [f.detach().double().reshape(f.shape[0], -1) for f in feats_b]
        n = xs[0].shape[0]
        if any(x.shape[0] != n for x in xs + ys):
            raise ValueError("every layer of both models must give the same number of rows (examples)")
        if self._shift_a is None:
            self._shift_a = [x.mean(0) for x in xs]
            self._shift_b = [y.mean(0) for y in ys]
            self._sum_a = [torch.zeros_like(s) for s in self._shift_a]
            self._sum_b = [torch.zeros_like(s) for s in self._shift_b]
            self._gram_a = [torch.zeros(len(s), len(s), dtype=torch.float64, device=s.device) for s in self._shift_a]
            self._gram_b = [torch.zeros(len(s), len(s), dtype=torch.float64, device=s.device) for s in self._shift_b]
            self._dims_a = [s.numel() for s in self._shift_a]
            self._dims_b = [s.numel() for s in self._shift_b]
            self._cross = torch.zeros(sum(self._dims_a), sum(self._dims_b), dtype=torch.float64, device=xs[0].device)
        elif [x.shape[1] for x in xs] != self._dims_a or [y.shape[1] for y in ys] != self._dims_b:
            raise ValueError("layer widths changed between batches")
        xs = [x - s for x, s in zip(xs, self._shift_a)]
        ys = [y - s for y, s in zip(ys, self._shift_b)]
        for i, x in enumerate(xs):
            self._sum_a[i] += x.sum(0)
            self._gram_a[i] += x.T @ x
        for j, y in enumerate(ys):
            self._sum_b[j] += y.sum(0)
            self._gram_b[j] += y.T @ y
        self._cross += torch.cat(xs, dim=1).T @ torch.cat(ys, dim=1)  # all layer pairs in one matmul
        self.n += n

    def compute(self) -> Tensor:
        """→ float64 ``[La, Lb]`` CKA matrix."""
        if self.n == 0:
            raise ValueError("StreamingCKA.compute() before any update()")
        n = self.n
        norm_a = [(g - torch.outer(s, s) / n).norm() for g, s in zip(self._gram_a, self._sum_a)]
        norm_b = [(g - torch.outer(s, s) / n).norm() for g, s in zip(self._gram_b, self._sum_b)]
        out = torch.empty(len(norm_a), len(norm_b), dtype=torch.float64, device="cpu")
        oa = 0
        for i, pa in enumerate(self._dims_a):
            ob = 0
            for j, pb in enumerate(self._dims_b):
                c = self._cross[oa:oa + pa, ob:ob + pb] - torch.outer(self._sum_a[i], self._sum_b[j]) / n
                out[i, j] = (c.pow(2).sum() / (norm_a[i] * norm_b[j])).cpu()
                ob += pb
            oa += pa
        return out


def _examples(x: Tensor, tokens: str, num_prefix: int) -> Tensor:
    """Block output ``[B, N, D]`` → the rows CKA compares: ``[B·L, D]`` patch tokens, or ``[B, D]``."""
    if tokens == "patch":
        return x[:, num_prefix:].reshape(-1, x.shape[-1])
    return pool_tokens(x, tokens, num_prefix)


@torch.no_grad()
def layer_cka(model_a: nn.Module, model_b: nn.Module, batches: Iterable[Tensor | dict[str, Any]], *,
              tokens: Literal["patch", "cls", "mean"] = "patch", max_batches: int | None = None,
              batches_b: Iterable[Tensor | dict[str, Any]] | None = None) -> Tensor:
    """Layer × layer linear CKA between two ViT encoders (e.g. MAE vs R-MAE) over a dataset.

    Runs both models. Layer ``i`` is the output of ``blocks[i]`` (the raw residual stream, no final
    norm, also for the last block) on whole images, from :func:`analysis.encoder.block_tokens`.
    The examples compared are chosen by ``tokens``: ``"patch"`` — every patch token of every image
    is one example (both models must have the same patch grid; the token CKA of Raghu et al.
    2021); ``"cls"`` — the cls token per image; ``"mean"`` — mean-pooled patch tokens per image
    (prefix tokens — cls, registers — excluded, :func:`analysis.encoder.pool_tokens`).
    Accumulated with :class:`StreamingCKA` (memory independent of the number of images), on
    ``model_a``'s device. Images go to each model's own device. Models run in eval mode
    (restored afterwards).

    Models of different input sizes compare on the same images, each at its own size: pass
    ``batches_b``, the same images in the same order rendered for ``model_b`` (examples are then
    images: ``tokens`` "cls" or "mean").

    Args:
        batches: iterable of image tensors ``[B, 3, H, W]`` or batch dicts with ``"images"``.
        batches_b: ``model_b``'s images, batch for batch the same as ``batches`` (default: ``batches``).
    Returns:
        float64 ``[depth_a, depth_b]``, on the CPU.
    """
    if tokens not in ("patch", "cls", "mean"):
        raise ValueError(f"tokens must be 'patch', 'cls' or 'mean', got {tokens!r}")
    acc = StreamingCKA()
    models = (model_a, model_b)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        pairs = zip(batches, batches) if batches_b is None else zip(batches, batches_b, strict=True)
        for k, pair in enumerate(pairs):
            if max_batches is not None and k >= max_batches:
                break
            images = [batch["images"] if isinstance(batch, dict) else batch for batch in pair]
            if images[0].shape[0] != images[1].shape[0]:
                raise ValueError(f"batch {k}: {images[0].shape[0]} images for model_a, {images[1].shape[0]} for "
                                 "model_b; batches_b must hold the same images as batches")
            fa, fb = ([_examples(x, tokens, num_prefix_tokens(m))
                       for x in block_tokens(m, imgs.to(model_device(m)), range(len(m.blocks)),
                                             final_norm_on_last=False)] for m, imgs in zip(models, images))
            if fa[0].shape[0] != fb[0].shape[0]:
                raise ValueError(f"tokens='{tokens}' gives {fa[0].shape[0]} vs {fb[0].shape[0]} examples: "
                                 f"the models have different patch grids; use tokens='cls' or 'mean'")
            acc.update(fa, [f.to(fa[0].device) for f in fb])
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return acc.compute()
