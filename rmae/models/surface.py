"""timm's ``VisionTransformer`` encoder surface for our model, beside the model (timm's adapter style).

The analysis package reaches every encoder — ours, and any timm ViT, including imported DINO,
DINOv2, DeiT… run folders — through these methods, with the same signatures and, for the weights
:func:`rmae.export_timm` writes, the same results as timm: ``forward_intermediates``,
``get_intermediate_layers``, ``pool``, ``forward_head``, ``num_prefix_tokens``, ``global_pool``.
The host class provides ``_check_images``, ``_embed`` (cls + patch tokens with positions),
``blocks``, ``norm`` and ``patch_embed``.
"""

from __future__ import annotations

import torch


class TimmEncoderSurface:
    """Mixin: timm's encoder methods on a ViT with one cls token (see module docstring)."""

    num_prefix_tokens = 1  # the cls token; timm ViTs may add registers or a distillation token
    global_pool = "token"  # what pool() does by default, as timm's vit_*_224 (cls token)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | tuple[int, ...] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False):
        """Block outputs of the whole image, as timm's ``VisionTransformer.forward_intermediates``.

        ``indices``: the last n blocks (int), all (None) or these block indices (negative from the
        end). Each intermediate is a block's output (``norm=True``: passed through the final
        norm), split into patch tokens ``[B, D, gh, gw]`` (``output_fmt="NCHW"``) or ``[B, L, D]``
        (``"NLC"``) and, with ``return_prefix_tokens``, prefix tokens ``[B, 1, D]`` as pairs.
        Returns the intermediates (``intermediates_only``), else ``(final-norm tokens [B, 1+L, D],
        intermediates)``; ``output_dict`` gives timm's dict form.
        """
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_images(x)
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        h = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            h = blk(h)
            if i in take:
                intermediates.append(self.norm(h) if norm else h)
        P = self.num_prefix_tokens
        prefix = [y[:, :P] for y in intermediates]
        intermediates = [y[:, P:] for y in intermediates]
        if output_fmt == "NCHW":
            gh, gw = self.patch_embed.grid_size
            intermediates = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(h)
            return out
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(h), intermediates

    def get_intermediate_layers(self, x: torch.Tensor, n: int | list[int] | tuple[int, ...] = 1,
                                reshape: bool = False, return_prefix_tokens: bool = False,
                                norm: bool = False) -> list:
        """DINO's interface, as timm: ``forward_intermediates(x, n, …, intermediates_only=True)``."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Tokens ``[B, 1+L, D]`` → ``[B, D]``: ``"token"`` (cls), ``"avg"`` / ``"max"`` /
        ``"avgmax"`` over patch tokens, or ``""`` (no pooling) — timm's ``global_pool_nlc``."""
        from timm.models.vision_transformer import global_pool_nlc

        return global_pool_nlc(x, pool_type=self.global_pool if pool_type is None else pool_type,
                               num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """A pre-trained encoder has no classifier: the pooled embedding (timm with ``num_classes=0``)."""
        return self.pool(x)
