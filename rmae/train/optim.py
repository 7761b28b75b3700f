"""AdamW with MAE's parameter groups, and the per-iteration warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, skip: set[str] | None = None,
                 layer_scales: dict[str, float] | None = None) -> list[dict]:
    """Two groups per lr scale: decayed weights, and undecayed norms / biases / tokens /
    position embeddings (timm's ``param_groups_weight_decay``). Frozen parameters (the fixed
    sin-cos tables) are left out. ``layer_scales`` maps a parameter name to an lr multiplier
    (layer-wise lr decay for fine-tuning); each group carries it as ``lr_scale``.
    """
    skip = set(skip or ()) | set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        scale = (layer_scales or {}).get(name, 1.0)
        g = groups.setdefault((scale, no_decay), {"params": [], "names": [], "lr_scale": scale,
                                                  "weight_decay": 0.0 if no_decay else weight_decay})
        g["params"].append(p)
        g["names"].append(name)
    return [{k: v for k, v in g.items() if k != "names"} for g in groups.values()]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), **kwargs) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay, **kwargs), lr=lr, betas=tuple(betas))


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then half-cosine to ``min_lr``
    at ``total_steps`` (MAE's ``adjust_learning_rate``, per iteration)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
