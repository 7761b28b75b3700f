"""Training a grid of heads in one pass, and choosing the best on held-out training data.

Every trained probe (linear, attentive, dense) trains **one head per learning rate of a grid in a
single pass**: the heads see the same minibatches (one read of the cached features per step), each
lr has its own optimizer param groups, and the loss is the sum of the heads' losses, so each
head's gradient is exactly that of its own loss. The best lr is the one whose head scores best
on a held-out part of the *training* features (:func:`split_holdout`, seeded), and only that
head is then scored on the eval split — eval data never choose anything. Ties go to the smaller
lr.

Features stay where they are (CPU, often memory-mapped); each minibatch is moved to ``device``.
Index tensors and head initialisations are made on the CPU from seeded generators, so results
do not depend on the device beyond float rounding.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rmae.device import resolve_device

from .config import ProbeError

CPU = torch.device("cpu")
#: Below this many multiply-adds per training step, probes train on one intra-op thread.
SMALL_STEP_MACS = 1e9


def split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` → (fit indices, held-out indices), int64 on the CPU,
    disjoint, at least one in each. Raises ProbeError when ``n < 2`` or ``fraction`` is outside
    (0, 1)."""
    if not 0.0 < fraction < 1.0:
        raise ProbeError(f"holdout must be a fraction in (0, 1), got {fraction}")
    if n < 2:
        raise ProbeError(f"need at least 2 training samples to hold some out, got {n}")
    n_held = min(n - 1, max(1, int(round(fraction * n))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 0x5EED), device=CPU)
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def grid_values(values: Sequence[float] | None, default: Sequence[float]) -> list[float]:
    """The grid to train (``values``, else ``default``), sorted ascending, duplicates removed."""
    vals = sorted({float(v) for v in (values if values is not None else default)})
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise ProbeError(f"grid values must be positive numbers, got {values}")
    return vals


@contextlib.contextmanager
def intra_op_threads(step_macs: float, threads: int | None = None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads, or, when None, with one thread if a step
    costs fewer than :data:`SMALL_STEP_MACS` multiply-adds (else torch's current setting); the
    caller's setting is restored after.

    Why: a probe step on cached features is a few small ops, and every multi-threaded op ends in
    a barrier that waits for its slowest thread. Measured on 2 busy cores (ViT-Tiny/8 64²
    features of 300 scenes): linear probe 2.9 s with 2 threads vs 0.04 s with 1; dense probe
    (22 M MACs/step) 20 s vs 2 s; attentive (70 M MACs/step) 22–62 s vs 1.7–2.6 s. Steps above
    ~1e9 MACs (ImageNet-scale linear probes, ViT-B attentive or dense probes) keep every core.
    Results agree across thread counts only to float rounding, so a fixed setting also keeps
    small probes bit-reproducible across machines with different core counts.
    """
    old = torch.get_num_threads()
    n = threads if threads is not None else (1 if step_macs < SMALL_STEP_MACS else old)
    if n != old:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield n
    finally:
        if n != old:
            torch.set_num_threads(old)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A seeded shuffle of ``range(n)`` cut into minibatches (int64 index tensors on the CPU)."""
    parts = list(torch.randperm(n, generator=generator, device=CPU).split(batch_size))
    # BatchNorm cannot normalise a batch of one sample: fold a lone last sample away.
    if len(parts) > 1 and len(parts[-1]) < 2:
        parts.pop()
    return parts


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Fraction of its peak lr a head uses at ``step`` (0-based) of ``total``: linear warmup
    over ``warmup`` steps, then half-cosine to 0 — :func:`rmae.train.optim.lr_at`.

    During warmup it is read at ``step + 1``: lr_at is 0 at step 0 (as MAE's per-iteration
    schedule), so a probe's first update would be wasted — with a few dozen steps in all, a
    noticeable share of its training. Read this way, warmup reaches the peak at its last step
    and the cosine starts right after it.
    """
    # Imported here: rmae.train loads the trainer (TensorBoard, scipy), and every `rmae` command
    # imports this package to register `rmae probe`.
    from rmae.train.optim import lr_at

    return lr_at(step + 1 if step < warmup else step, total, 1.0, warmup)


def fit_grid(grid: nn.Module, x: torch.Tensor, y: torch.Tensor, lrs: Sequence[float], *,
             epochs: int, batch_size: int, optimizer: str = "sgd", weight_decay: float = 0.0,
             seed: int = 0, device: str | torch.device = "auto", progress: bool = False,
             desc: str = "probe", held_out: Callable[[], Sequence[float]] | None = None,
             patience: int = 0) -> list[float]:
    """Train every head of ``grid`` (head g with lr ``lrs[g]``) in one pass over (x, y).

    x: features [N, ...] (any float dtype; upcast per minibatch, so float16 token caches stay
    float16 in memory); y: int64 targets [N] or [N, L] (-1 = ignore). Each step: one forward of
    all heads on the minibatch, loss = Σ_g mean-CE(head g), per-head param groups in one
    optimizer; :func:`lr_factor` schedule with warmup over the first 10 % of steps. The grid is
    moved to ``device`` (``auto``: CUDA, else MPS, else CPU). Deterministic given ``seed``.

    Early stopping: with ``held_out`` (→ the held-out score of every head) and ``patience`` > 0,
    each head's held-out score is checked after every epoch past the warmup; each head keeps the
    parameters of its best check, and training stops once no head has improved for ``patience``
    checks — epochs the held-out score no longer rewards are not spent.
    Returns the mean training loss per epoch run (summed over heads).
    """
    device = resolve_device(device)
    grid.to(device).train()
    groups = []
    for g, lr in enumerate(lrs):
        decay, no_decay = grid.head_params(g)
        groups.append({"params": decay, "lr": lr, "base_lr": lr, "weight_decay": weight_decay})
        groups.append({"params": no_decay, "lr": lr, "base_lr": lr, "weight_decay": 0.0})
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lrs[0], betas=(0.9, 0.999))
    else:
        raise ProbeError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    steps_per_epoch = len(minibatches(n, batch_size, torch.Generator().manual_seed(0)))
    total = max(1, epochs * steps_per_epoch)
    warmup = total // 10  # the first 10 % of steps (MAE's linear-probe schedule)
    G = len(lrs)
    step, history = 0, []
    best = [float("-inf")] * G
    kept: dict[int, list[torch.Tensor]] = {}  # head → its parameters at its best held-out check
    stale = 0
    for _ in tqdm(range(epochs), desc=desc, unit="ep", disable=not progress, leave=False, file=sys.stderr):
        running, count = 0.0, 0
        for idx in minibatches(n, batch_size, gen):
            f = lr_factor(step, total, warmup)
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * f
            xb = x[idx].to(device, torch.float32)
            yb = y[idx].to(device)
            logits = grid(xb)  # [G, B, (L,) C]
            # The mean over all G×B(×L) terms times G = Σ_g (head g's mean CE): every head gets
            # exactly the gradient of its own loss (heads share no parameters).
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   yb.expand(G, *yb.shape).reshape(-1), ignore_index=-1) * G
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            count += 1
            step += 1
        history.append(running / max(1, count))
        if held_out is None or patience <= 0 or step < warmup:
            continue
        scores = [float(v) for v in held_out()]
        grid.train()
        improved = [g for g in range(G) if scores[g] > best[g]]
        for g in improved:
            best[g] = scores[g]
            kept[g] = [p.detach().clone() for ps in grid.head_params(g) for p in ps]
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    with torch.no_grad():  # every head back to its best check
        for g, values in kept.items():
            for p, v in zip((p for ps in grid.head_params(g) for p in ps), values):
                p.copy_(v)
    grid.eval()
    return history


@torch.no_grad()
def grid_logits(grid: nn.Module, x: torch.Tensor, batch_size: int,
                device: torch.device) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, logits [G, b, …] on ``device``) for consecutive chunks of ``x``."""
    grid.eval()
    for s in range(0, x.shape[0], batch_size):
        sl = slice(s, min(s + batch_size, x.shape[0]))
        yield sl, grid(x[sl].to(device, torch.float32))


def grid_accuracy(grid: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
                  device: str | torch.device = "auto") -> torch.Tensor:
    """Top-1 accuracy of every head: x [N, ...], y int64 [N] → float64 [G] in [0, 1] (CPU)."""
    correct = None
    for sl, logits in grid_logits(grid, x, batch_size, resolve_device(device)):
        c = (logits.argmax(-1).cpu() == y[sl]).sum(1).double()
        correct = c if correct is None else correct + c
    return correct / max(1, x.shape[0])


def select(scores: Sequence[float], values: Sequence[float]) -> tuple[int, dict[str, float]]:
    """(index of the best score — the first on ties, so the smaller grid value —,
    {``%g`` of each grid value: its score})."""
    scores = [float(s) for s in scores]
    best = int(np.nanargmax(np.asarray(scores)))
    return best, {format(float(v), "g"): s for v, s in zip(values, scores)}
