"""Pixel attributions for ViT encoders: Integrated Gradients and patch-aligned Occlusion (captum),
and Grad-CAM on the token grid (through the encoder surface).

IG and Occlusion explain a **score function** ``model_fn(images [B, C, H, W]) → [B, K]`` (pick
one column with ``target``) or ``[B]`` / ``[B, 1]`` (``target=None``). Pre-trained MAE / R-MAE
encoders have no head, so two score modules are provided; each also scores final-norm tokens
directly (``score_tokens``), which is what Grad-CAM needs:

- :class:`HeadLogits` — the logits of a probe / linear head on the pooled embedding
  (``target=int`` class);
- :class:`EmbeddingSimilarity` — the cosine similarity of the pooled embedding to a reference
  embedding (``[B, 1]``; e.g. "what makes this image look like that one / like a class mean").

Images are in the model's input space (ImageNet-normalised for ``rmae.data`` batches); the
``mean`` / ``std`` arguments say how to map pixel colours (e.g. black) into that space.

Shapes: IG and Occlusion return ``[B, C, H, W]`` (like the input); :func:`patch_scores` reduces
them to ``[B, gh, gw]``. Grad-CAM returns ``[B, H, W]`` (or ``[B, gh, gw]`` with
``upsample=None``). Models should be in eval mode (dropout / drop-path off) for attributions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from captum.attr import IntegratedGradients, Occlusion

from analysis.encoder import grid_size, model_device, normalize_layer, num_prefix_tokens, pool_tokens
from rmae.data import IMAGENET_MEAN, IMAGENET_STD

Tensor = torch.Tensor
Target = int | Tensor | None
Baseline = str | float | Tensor
Pool = Literal["cls", "mean"]

__all__ = [
    "EmbeddingSimilarity",
    "HeadLogits",
    "grad_cam",
    "integrated_gradients",
    "make_baseline",
    "occlusion",
    "patch_scores",
]


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    a, b = x
    return int(a), int(b)


# ------------------------------------------------------------------------------------------
# score functions for headless encoders


class HeadLogits(nn.Module):
    """Probe logits of an encoder: ``images → head(pool(model.forward_features(images)))``.

    ``model``: an encoder with ``forward_features`` (ours or timm); ``head``: any module mapping
    ``[B, D] → [B, K]`` (a linear probe, a BatchNorm + Linear probe, …). Output ``[B, K]``;
    attribute class ``k`` with ``target=k``. Pooling: :func:`analysis.encoder.pool_tokens`
    (``"mean"`` leaves out every prefix token — cls, registers).
    """

    def __init__(self, model: nn.Module, head: nn.Module, pool: Pool = "cls") -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.pool = pool

    def score_tokens(self, tokens: Tensor) -> Tensor:
        """Final-norm tokens ``[B, N, D]`` → logits ``[B, K]``."""
        return self.head(pool_tokens(tokens, self.pool, num_prefix_tokens(self.model)))

    def forward(self, images: Tensor) -> Tensor:
        return self.score_tokens(self.model.forward_features(images.to(model_device(self.model))))


class EmbeddingSimilarity(nn.Module):
    """Cosine similarity of the pooled embedding to a reference: ``images [B, C, H, W] → [B, 1]``.

    ``s(x) = ⟨e(x), r⟩ / (‖e(x)‖·‖r‖)``, ``e(x) = pool(model.forward_features(x))``. ``reference`` is
    ``[D]`` (one for all images) or ``[B, D]`` (one per image, e.g. each image's own embedding, or
    the embedding of another view); it is detached and stored as a buffer. Use with
    ``target=None``.

    Note: at ``x`` whose own embedding is the reference, ``s = 1`` is a maximum, so its gradient
    is zero — Grad-CAM (a gradient at ``x``) is blank there. IG and Occlusion still work (they
    compare with a baseline); for Grad-CAM use another reference (another view, a class mean).
    """

    def __init__(self, model: nn.Module, reference: Tensor, pool: Pool = "cls") -> None:
        super().__init__()
        if reference.ndim not in (1, 2):
            raise ValueError(f"reference must be [D] or [B, D], got {list(reference.shape)}")
        self.model = model
        self.pool = pool
        self.register_buffer("reference", reference.detach().clone())

    def score_tokens(self, tokens: Tensor) -> Tensor:
        """Final-norm tokens ``[B, N, D]`` → similarities ``[B, 1]``."""
        emb = pool_tokens(tokens, self.pool, num_prefix_tokens(self.model))
        ref = self.reference.to(emb.device, emb.dtype)
        if ref.ndim == 2 and ref.shape[0] != emb.shape[0]:
            if emb.shape[0] % ref.shape[0]:
                raise ValueError(f"reference has {ref.shape[0]} rows for a batch of {emb.shape[0]}")
            # captum evaluates IG steps / occlusion windows as [k·B] batches laid out as k copies of
            # the B images, so a per-image reference repeats the same way.
            ref = ref.repeat(emb.shape[0] // ref.shape[0], 1)
        return F.cosine_similarity(emb, ref.expand_as(emb), dim=-1).unsqueeze(-1)

    def forward(self, images: Tensor) -> Tensor:
        return self.score_tokens(self.model.forward_features(images.to(model_device(self.model))))


# ------------------------------------------------------------------------------------------
# baselines


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur, kernel radius ``ceil(3σ)``, replicate padding (valid for any
    radius, unlike reflect padding which needs radius < side)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    C = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def make_baseline(images: Tensor, baseline: Baseline = "black", *,
                  mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                  blur_sigma: float | None = None) -> Tensor:
    """A reference input for IG / Occlusion, in the same (normalised) space as ``images``.

    - ``"black"``: pixel colour 0 mapped through the normalisation, ``(0 − mean_c) / std_c``
      (0 if ``mean``/``std`` are None, i.e. images are raw [0, 1] pixels);
    - ``"zero"``: 0 in the model's input space — the dataset mean colour for normalised inputs;
    - ``"mean"``: each image's own per-channel mean colour (a flat grey of the image);
    - ``"blur"``: the image blurred with a Gaussian of ``blur_sigma`` pixels (default: a
      sixteenth of the longer side, which removes detail at the scale of a patch while keeping
      coarse colour layout — Sturmfels et al. 2020, "Visualizing the Impact of Feature
      Attribution Baselines", Distill). Blurring commutes with per-channel normalisation, so it is
      applied in input space;
    - a float: that constant; a tensor: broadcast to ``images``.

    Returns a ``[B, C, H, W]`` tensor (detached).
    """
    images = images.detach()
    if isinstance(baseline, Tensor):
        return baseline.to(images.device, images.dtype).expand_as(images).clone()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(images, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "black":
        if mean is None or std is None:
            return torch.zeros_like(images)
        m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        if m.shape[1] != images.shape[1]:
            raise ValueError(f"mean/std have {m.shape[1]} channels, images {images.shape[1]}")
        return ((0.0 - m) / s).expand_as(images).clone()
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(images.shape[-2:]) / 16
        if sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {sigma}")
        return _gaussian_blur(images, float(sigma))
    raise ValueError(f"baseline must be 'black', 'zero', 'mean', 'blur', a number or a tensor, got {baseline!r}")


# ------------------------------------------------------------------------------------------
# Integrated Gradients, Occlusion


def integrated_gradients(model_fn: Callable[[Tensor], Tensor], images: Tensor, target: Target = None, *,
                         steps: int = 32, baseline: Baseline = "black",
                         mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                         blur_sigma: float | None = None, internal_batch_size: int | None = None,
                         return_delta: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Integrated Gradients (Sundararajan et al. 2017, "Axiomatic Attribution for Deep Networks").

    ``IG_i(x) = (x_i − x'_i) · ∫₀¹ ∂f(x' + α(x − x'))/∂x_i dα`` with baseline ``x'``
    (:func:`make_baseline`), the integral by captum's Gauss–Legendre rule with ``steps`` points.
    Completeness: ``Σ_i IG_i = f(x) − f(x')`` up to the quadrature error, which
    ``return_delta=True`` reports per image (``[B]``).

    Args:
        model_fn: ``[B, C, H, W] → [B, K]`` (with ``target``) or ``[B]`` / ``[B, 1]``.
        target: class index (int) or ``[B]`` indices; None for a single-output score.
        internal_batch_size: evaluate the ``steps·B`` interpolated images in chunks of this size.
    Returns:
        attributions ``[B, C, H, W]`` (and the convergence delta ``[B]``).
    """
    base = make_baseline(images, baseline, mean=mean, std=std, blur_sigma=blur_sigma)
    ig = IntegratedGradients(model_fn)
    return ig.attribute(images, baselines=base, target=target, n_steps=steps,
                        internal_batch_size=internal_batch_size, return_convergence_delta=return_delta)


def occlusion(model_fn: Callable[[Tensor], Tensor], images: Tensor, target: Target = None, *,
              patch_size: int | Sequence[int], baseline: Baseline = "zero",
              mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
              perturbations_per_eval: int = 16) -> Tensor:
    """Occlusion (Zeiler & Fergus 2014) with **patch-aligned** windows.

    Window = stride = one ViT patch (all channels), so every occluded region is exactly one token
    of the model and each pixel is covered once: the attribution of every pixel in patch ``P``
    is ``f(x) − f(x with P replaced by the baseline)``. Unaligned windows would occlude parts
    of several tokens and blur the token-level answer.

    Baseline (what an occluded patch becomes): ``"zero"`` (default) — 0 in the normalised input
    space, i.e. the dataset mean colour, the value a ViT sees least surprisingly; ``"mean"`` —
    the image's own mean colour; ``"black"``, ``"blur"``, a number or a tensor as in
    :func:`make_baseline`.

    Returns: ``[B, C, H, W]`` (constant within each patch; :func:`patch_scores` with
    ``reduce="mean"`` gives the per-patch score drop).
    """
    ph, pw = _pair(patch_size)
    B, C, H, W = images.shape
    if H % ph or W % pw:
        raise ValueError(f"images {H}×{W} are not divisible by the patch size {ph}×{pw}")
    base = make_baseline(images, baseline, mean=mean, std=std)
    occ = Occlusion(model_fn)
    return occ.attribute(images, sliding_window_shapes=(C, ph, pw), strides=(C, ph, pw), baselines=base,
                         target=target, perturbations_per_eval=perturbations_per_eval)


def patch_scores(attributions: Tensor, patch_size: int | Sequence[int], *, reduce: Literal["sum", "mean"] = "sum",
                 absolute: bool = False) -> Tensor:
    """Pixel attributions ``[B, C, H, W]`` or ``[B, H, W]`` → per-patch scores ``[B, gh, gw]``.

    ``reduce="sum"`` adds channels and pixels (so IG patch scores still sum to ``f(x) − f(x')``);
    ``"mean"`` averages them (for Occlusion: the score drop when the patch is occluded).
    ``absolute=True`` takes ``|a|`` first (magnitude maps).
    """
    a = attributions.abs() if absolute else attributions
    if a.ndim == 4:
        a = a.sum(dim=1) if reduce == "sum" else a.mean(dim=1)
    elif a.ndim != 3:
        raise ValueError(f"attributions must be [B, C, H, W] or [B, H, W], got {list(a.shape)}")
    ph, pw = _pair(patch_size)
    pooled = F.avg_pool2d(a[:, None], kernel_size=(ph, pw), stride=(ph, pw))[:, 0]
    return pooled * (ph * pw) if reduce == "sum" else pooled


# ------------------------------------------------------------------------------------------
# Grad-CAM on the token grid


def _select(scores: Tensor, target: Target) -> Tensor:
    """One score per image ``[B]`` from ``[B]`` / ``[B, K]`` scores (captum's target convention)."""
    B = scores.shape[0]
    if target is None:
        if scores[0].numel() != 1:
            raise ValueError(f"the score has {scores[0].numel()} outputs per image: pass target=<index>")
        return scores.reshape(B)
    if isinstance(target, int):
        return scores[:, target]
    t = torch.as_tensor(target, device=scores.device).long().reshape(-1).expand(B)
    return scores.gather(1, t[:, None])[:, 0]


def grad_cam(score_module: nn.Module, images: Tensor, target: Target = None, *, layer: int = -1,
             at: Literal["input", "output"] = "input", relu: bool = True,
             upsample: Literal["bilinear", "nearest"] | None = "bilinear") -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the ViT token grid.

    With ``A ∈ R^{C×gh×gw}`` the patch tokens of the chosen layer on the grid (prefix tokens —
    cls, registers — dropped) and ``s`` the selected score::

        α_c = (1/L) Σ_{r,c'} ∂s/∂A_{c,r,c'}          (gradient averaged over the grid)
        CAM = ReLU(Σ_c α_c · A_c)                    ([gh, gw], upsampled to pixels)

    Where: ``at="output"`` takes the output of ``blocks[layer]``; ``at="input"`` (default) the
    tokens **entering** it, i.e. the output of ``blocks[layer − 1]`` (block 0's input is the patch
    embedding, which the encoder surface does not expose: a ValueError). The default matters for
    the last block: with cls pooling, nothing after the last block mixes tokens, so the score's
    gradient w.r.t. the last block's *output* patch tokens is exactly zero and the map is blank —
    which is why pytorch-grad-cam hooks ``blocks[-1].norm1`` for ViTs; the input of the last
    block is the equivalent here.

    How, through the encoder surface only (no hooks): one ``forward_intermediates`` pass (grad
    enabled) returns the final tokens, scored by ``score_module.score_tokens``, and the chosen
    block output's patch tokens — a view of that block's output tensor in the autograd graph, so
    ``torch.autograd.grad`` w.r.t. the tensor it views gives ``∂s/∂A`` exactly.

    Args:
        score_module: a score module with ``.model`` (the ViT: ours or timm) and
            ``.score_tokens(tokens [B, N, D]) → [B] / [B, K]`` — :class:`HeadLogits`,
            :class:`EmbeddingSimilarity`.
        target: class index (int) or ``[B]`` indices; None for a single-output score.
        relu: apply the Grad-CAM ReLU.
        upsample: ``"bilinear"`` / ``"nearest"`` to pixels, or None to keep the grid.
    Returns:
        ``[B, H, W]`` (or ``[B, gh, gw]``), detached, on the model's device.
    """
    model = getattr(score_module, "model", None)
    if not (callable(getattr(score_module, "score_tokens", None)) and isinstance(model, nn.Module)):
        raise ValueError("grad_cam needs a score module with .model (the ViT) and .score_tokens(tokens) — "
                         "e.g. HeadLogits or EmbeddingSimilarity")
    if at not in ("input", "output"):
        raise ValueError(f"at must be 'input' or 'output', got {at!r}")
    block = normalize_layer(layer, len(model.blocks))
    if at == "input" and block == 0:
        raise ValueError("the input of block 0 is the patch embedding, which forward_intermediates does not "
                         "expose: use layer ≥ 1, or at='output'")
    k = block - 1 if at == "input" else block
    images = images.to(model_device(model))
    P, (gh, gw) = num_prefix_tokens(model), grid_size(model)
    with torch.enable_grad():
        final, (patches,) = model.forward_intermediates(images, indices=[k], norm=False, output_fmt="NLC")
        # patches [B, L, C] is tokens[:, P:] of block k's output (a view; the output itself when P = 0)
        tokens = patches if patches._base is None else patches._base
        if tokens.shape != (patches.shape[0], P + gh * gw, patches.shape[-1]):
            raise ValueError(f"forward_intermediates of {type(model).__name__} did not return a view of block {k}'s "
                             f"output tokens; grad_cam cannot take the gradient there")
        score = _select(score_module.score_tokens(final), target)
        (grad,) = torch.autograd.grad(score.sum(), tokens)  # images are independent: Σ_b keeps each ∂s_b
    alpha = grad[:, P:].mean(dim=1)  # [B, C]
    cam = torch.einsum("blc,bc->bl", patches.detach(), alpha).reshape(-1, 1, gh, gw)
    if relu:
        cam = cam.clamp_min(0)
    if upsample is not None:
        kw = {"align_corners": False} if upsample == "bilinear" else {}
        cam = F.interpolate(cam, size=images.shape[-2:], mode=upsample, **kw)
    return cam[:, 0]
