"""Pixel attributions for ViT encoders with captum: Integrated Gradients, patch-aligned Occlusion
and Grad-CAM on the token grid.

Every method explains a **score function** ``model_fn(images [B, C, H, W]) → [B, K]`` (pick one
column with ``target``) or ``[B]`` / ``[B, 1]`` (``target=None``). Pre-trained MAE / R-MAE
encoders have no head, so two score modules are provided:

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
from captum.attr import IntegratedGradients, LayerGradCam, Occlusion

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
    "pool_tokens",
]


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return x, x
    a, b = x
    return int(a), int(b)


def _num_prefix(model: nn.Module) -> int:
    # timm ViTs carry num_prefix_tokens (cls + registers); our encoders have exactly one cls token.
    return int(getattr(model, "num_prefix_tokens", 1))


# ------------------------------------------------------------------------------------------
# score functions for headless encoders


def pool_tokens(tokens: Tensor, pool: Pool = "cls", num_prefix: int = 1) -> Tensor:
    """``[B, N, D]`` encoder tokens → ``[B, D]``: the cls token (index 0) or the mean of the patch
    tokens (prefix tokens excluded, as MAE's global-pool fine-tuning does)."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, num_prefix:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


class HeadLogits(nn.Module):
    """Probe logits of an encoder: ``images → head(pool(model.forward_features(images)))``.

    ``model``: an encoder with ``forward_features`` (ours or timm); ``head``: any module mapping
    ``[B, D] → [B, K]`` (a linear probe, a BatchNorm + Linear probe, …). Output ``[B, K]``;
    attribute class ``k`` with ``target=k``.
    """

    def __init__(self, model: nn.Module, head: nn.Module, pool: Pool = "cls") -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.pool = pool

    def forward(self, images: Tensor) -> Tensor:
        return self.head(pool_tokens(self.model.forward_features(images), self.pool, _num_prefix(self.model)))


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

    def forward(self, images: Tensor) -> Tensor:
        emb = pool_tokens(self.model.forward_features(images), self.pool, _num_prefix(self.model))
        ref = self.reference
        if ref.ndim == 2 and ref.shape[0] != emb.shape[0]:
            if emb.shape[0] % ref.shape[0]:
                raise ValueError(f"reference has {ref.shape[0]} rows for a batch of {emb.shape[0]}")
            # captum evaluates IG steps / occlusion windows as [k·B] batches laid out as k copies of
            # the B images, so a per-image reference repeats the same way.
            ref = ref.repeat(emb.shape[0] // ref.shape[0], 1)
        return F.cosine_similarity(emb, ref.to(emb.dtype).expand_as(emb), dim=-1).unsqueeze(-1)


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


class _TokenGrid(nn.Module):
    """Identity that presents patch tokens channel-first: ``[B, L, C] → [B, C, gh, gw]``.

    captum's ``LayerGradCam`` averages gradients over all dims after the channel dim 1 and sums
    ``weights · activations`` over dim 1 — correct for ``[B, C, h, w]`` CNN maps, wrong for ViT
    tokens ``[B, N, C]`` (it would treat tokens as channels). This module is the layer captum
    hooks; patch token ``i`` lands at ``(i // gw, i % gw)``.
    """

    def __init__(self, grid_hw: tuple[int, int]) -> None:
        super().__init__()
        self.grid_hw = grid_hw

    def forward(self, tokens: Tensor) -> Tensor:
        B, L, C = tokens.shape
        gh, gw = self.grid_hw
        if L != gh * gw:
            raise ValueError(f"{L} patch tokens do not fill the {gh}×{gw} grid")
        return tokens.transpose(1, 2).reshape(B, C, gh, gw)


def _find_encoder(model_fn: Callable[[Tensor], Tensor]) -> nn.Module:
    if isinstance(model_fn, nn.Module):
        for m in model_fn.modules():  # the model itself first, then submodules (HeadLogits.model …)
            if hasattr(m, "blocks") and hasattr(m, "patch_embed"):
                return m
    raise ValueError("grad_cam could not find a ViT encoder (a module with .blocks and .patch_embed) inside "
                     "model_fn; pass encoder=<the ViT whose blocks model_fn runs>")


def grad_cam(model_fn: Callable[[Tensor], Tensor], images: Tensor, target: Target = None, *,
             layer: int = -1, at: Literal["input", "output"] = "input", encoder: nn.Module | None = None,
             relu: bool = True, upsample: Literal["bilinear", "nearest"] | None = "bilinear") -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the ViT token grid, via captum's ``LayerGradCam``.

    With ``A ∈ R^{C×gh×gw}`` the patch tokens of the chosen layer reshaped to a grid (cls and
    other prefix tokens dropped) and ``s`` the score::

        α_c = (1/L) Σ_{r,c'} ∂s/∂A_{c,r,c'}          (gradient averaged over the grid)
        CAM = ReLU(Σ_c α_c · A_c)                    ([gh, gw], upsampled to pixels)

    Where: ``at="input"`` (default) takes the tokens **entering** ``blocks[layer]``; ``"output"``
    takes that block's output. The default matters for the last block: with cls pooling, nothing
    after the last block mixes tokens, so the score's gradient w.r.t. the last block's *output*
    patch tokens is exactly zero and the map is blank — which is why pytorch-grad-cam hooks
    ``blocks[-1].norm1`` for ViTs; the input of the last block is the equivalent here.

    The grid is exposed by a forward (pre-)hook on the block that routes the patch tokens through
    an identity module outputting ``[B, C, gh, gw]`` (the layer captum hooks) and back; the model
    is not modified and the hook is removed afterwards.

    Args:
        model_fn: score function (e.g. :class:`HeadLogits`, :class:`EmbeddingSimilarity`) whose
            forward runs ``encoder.blocks``.
        encoder: the ViT (our model or timm); found inside ``model_fn`` when it is an ``nn.Module``.
        relu: apply the Grad-CAM ReLU (captum's default is off).
        upsample: ``"bilinear"`` / ``"nearest"`` to pixels, or None to keep the grid.
    Returns:
        ``[B, H, W]`` (or ``[B, gh, gw]``), detached.
    """
    enc = encoder if encoder is not None else _find_encoder(model_fn)
    grid = tuple(int(g) for g in enc.patch_embed.grid_size)
    prefix = _num_prefix(enc)
    to_grid = _TokenGrid(grid)

    def through_grid(tokens: Tensor) -> Tensor:
        patches = to_grid(tokens[:, prefix:]).flatten(2).transpose(1, 2)  # back to [B, L, C]
        return torch.cat([tokens[:, :prefix], patches], dim=1)

    block = enc.blocks[layer]
    if at == "input":
        handle = block.register_forward_pre_hook(lambda _m, args: (through_grid(args[0]), *args[1:]))
    elif at == "output":
        handle = block.register_forward_hook(lambda _m, _args, out: through_grid(out))
    else:
        raise ValueError(f"at must be 'input' or 'output', got {at!r}")
    try:
        cam = LayerGradCam(model_fn, to_grid).attribute(images, target=target, relu_attributions=relu)
    finally:
        handle.remove()
    cam = cam.detach()  # [B, 1, gh, gw]
    if upsample is not None:
        kw = {"align_corners": False} if upsample == "bilinear" else {}
        cam = F.interpolate(cam, size=images.shape[-2:], mode=upsample, **kw)
    return cam[:, 0]
