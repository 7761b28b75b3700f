"""Probes of frozen encoders: linear, weighted k-NN, attentive and dense (per-patch → mIoU).

    from analysis.probes import run_probe
    r = run_probe("runs/mae", "linear", "scenes:train:2000", "scenes:val:500")
    r["value"], r["best_lr"], r["grid"]      # eval accuracy, chosen lr, {lr: held-out accuracy}

Every trained probe (linear, attentive, dense) trains **one head per learning rate of a grid in a
single pass**: the heads see the same minibatches (one read of the cached features per step), each
lr has its own optimizer param groups, and the loss is the sum of the heads' losses, so each
head's gradient is exactly that of its own loss. The best lr is the one whose head scores best
on a held-out part of the *training* features (``holdout``, seeded), and only that head is then
scored on the eval split — eval data never choose anything. Ties go to the smaller lr.

Probes (``RESULT_KEYS`` maps them to the names results.json uses):

- ``linear`` (``linear_probe``): MAE's linear probe — ``BatchNorm1d(affine=False)`` then Linear,
  SGD with momentum and a cosine schedule (or AdamW); ``solver="sklearn"`` fits scikit-learn's
  ``LogisticRegression`` on standardised features instead, over a grid of ``C``.
- ``knn`` (``knn``): DINO's weighted k-NN — cosine similarity of L2-normalised features, the top
  ``k`` (20) training neighbours vote with weight ``exp(sim / T)``, ``T = 0.07``. Nothing is
  trained, so there is no grid.
- ``attentive`` (``attentive_probe``): AIM's attentive probe — learned query token(s) attend over
  the patch tokens with multi-head cross-attention (key and value projections), the queries'
  outputs are averaged, then LayerNorm and Linear.
- ``dense`` (``dense_miou``): a per-patch linear classifier (BatchNorm + Linear on each patch
  token) trained on each patch's majority ground-truth category; its logits are upsampled
  (bilinear by default) to pixels and scored by mIoU against the ground-truth category maps
  (background is category 0 and counts as a class; mean over classes present in the ground
  truth or the prediction, as mmsegmentation does).

Scores are fractions in [0, 1]. Results also carry ``chance``: the score of always predicting the
most frequent training class (image class, or patch category for dense) on the eval split.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .features import Features, load_features

RESULT_KEYS = {"linear": "linear_probe", "knn": "knn", "attentive": "attentive_probe",
               "dense": "dense_miou"}
PROBES = tuple(RESULT_KEYS)
DEFAULT_POOL = {"linear": "cls", "knn": "cls", "attentive": "tokens", "dense": "tokens"}
DEFAULT_LRS = {"sgd": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0),
               "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}
DEFAULT_OPTIMIZER = {"linear": "sgd", "attentive": "adamw", "dense": "sgd"}
DEFAULT_EPOCHS = {"linear": 100, "attentive": 50, "dense": 50}
DEFAULT_BATCH = {"linear": 256, "attentive": 128, "dense": 32}  # dense: images (× L patches)
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adamw": 0.05}  # MAE linprobe: none; AIM probe: AdamW 0.05
DEFAULT_C = (0.01, 0.1, 1.0, 10.0, 100.0)


class ProbeError(ValueError):
    """A probe cannot run as asked (missing labels, bad setting); the message says what to do."""


@dataclass
class ProbeResult:
    """Outcome of one probe on in-memory features.

    ``value``: eval score of the chosen head (accuracy or mIoU, in [0, 1]); ``grid``: held-out
    score per grid value (lr, or C for sklearn), keys formatted with ``%g``; ``best_lr``: chosen
    lr (None for k-NN and sklearn, which record ``k``/``best_C`` in ``extra``).
    """

    probe: str
    metric: str
    value: float
    best_lr: float | None
    grid: dict[str, float]
    chance: float
    n_train: int
    n_eval: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "key": RESULT_KEYS[self.probe], "metric": self.metric,
                "value": self.value, "best_lr": self.best_lr, "grid": self.grid,
                "chance": self.chance, "n_train": self.n_train, "n_eval": self.n_eval, **self.extra}


# ---------------------------------------------------------------------------------------------
# shared pieces


def _g(v: float) -> str:
    return format(float(v), "g")


def split_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` → (fit indices, held-out indices), int64, disjoint, at least
    one in each. Raises ProbeError when ``n < 2`` or ``fraction`` is outside (0, 1)."""
    if not 0.0 < fraction < 1.0:
        raise ProbeError(f"holdout must be a fraction in (0, 1), got {fraction}")
    if n < 2:
        raise ProbeError(f"need at least 2 training samples to hold some out, got {n}")
    n_held = min(n - 1, max(1, int(round(fraction * n))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 0x5EED))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def _grid_values(values: Sequence[float] | None, default: Sequence[float]) -> list[float]:
    vals = sorted({float(v) for v in (values if values is not None else default)})
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise ProbeError(f"grid values must be positive numbers, got {values}")
    return vals


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _bn(dim: int) -> nn.BatchNorm1d:
    # momentum=None: running stats are the exact average over all training batches, not an
    # EMA, so they are right even after a handful of steps (tiny datasets, short schedules).
    return nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)


def _num_labels(*tensors: torch.Tensor | None, at_least: int = 0) -> int:
    m = at_least
    for t in tensors:
        if t is not None and t.numel():
            m = max(m, int(t.max()) + 1)
    return m


# ---------------------------------------------------------------------------------------------
# grids of heads (one per lr), trained together


class LinearGrid(nn.Module):
    """G independent linear heads after one shared ``BatchNorm1d(affine=False)``.

    x float32 [B, D] → logits float32 [G, B, C]. Sharing the BatchNorm is exact, not an
    approximation: without affine parameters it has nothing to learn, and its statistics depend
    on the inputs only, which all heads share.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, generator: torch.Generator) -> None:
        super().__init__()
        self.bn = _bn(dim)
        # MAE's linear-probe init: weight N(0, 0.01), bias 0.
        self.weight = nn.ParameterList(
            [nn.Parameter(torch.randn(num_classes, dim, generator=generator) * 0.01) for _ in range(num_heads)])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads)])

    def head_params(self, g: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(weight-decayed, not decayed) parameters of head ``g``."""
        return [self.weight[g]], [self.bias[g]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        w = torch.stack(list(self.weight))  # [G, C, D]
        b = torch.stack(list(self.bias))  # [G, C]
        return torch.einsum("bd,gcd->gbc", x, w) + b[:, None, :]


class AttentiveGrid(nn.Module):
    """G independent AIM-style attentive probes over patch tokens.

    x float32 [B, L, D] → logits float32 [G, B, C]. Per head: tokens normalised by a shared
    ``BatchNorm(affine=False)`` over D (as AIM does; needed for un-normed intermediate layers),
    ``Q`` learned queries [Q, D] attend with ``H`` heads over keys ``x W_k`` and values
    ``x W_v + b_v``; the Q outputs are averaged, then LayerNorm and Linear.

    Computed without materialising keys and values: for query ``q_h`` of attention head ``h``,
    ``q_h · (W_k x)_h = (W_{k,h}ᵀ q_h) · x`` and ``Σ_l a_l W_{v,h} x_l = W_{v,h} (Σ_l a_l x_l)``.
    That is the same function of the same parameters (hence identical gradients) at ~D/H times
    fewer FLOPs than projecting all L tokens — which is what makes a grid of attentive probes
    affordable on a CPU. A key bias would add the same constant to every logit of a head
    (softmax ignores it), so there is none.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, generator: torch.Generator,
                 attn_heads: int = 1, num_queries: int = 1) -> None:
        super().__init__()
        if dim % attn_heads:
            raise ProbeError(f"attention heads ({attn_heads}) must divide the feature width ({dim})")
        self.h, self.q_n, self.dim = attn_heads, num_queries, dim
        self.bn = _bn(dim)
        bound = math.sqrt(6.0 / (2 * dim))  # xavier-uniform for the D×D projections

        def u(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        self.query = nn.ParameterList(
            [nn.Parameter(torch.randn(num_queries, dim, generator=generator) * 0.02) for _ in range(num_heads)])
        self.wk = nn.ParameterList([u(dim, dim) for _ in range(num_heads)])
        self.wv = nn.ParameterList([u(dim, dim) for _ in range(num_heads)])
        self.bv = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(num_heads)])
        self.ln_w = nn.ParameterList([nn.Parameter(torch.ones(dim)) for _ in range(num_heads)])
        self.ln_b = nn.ParameterList([nn.Parameter(torch.zeros(dim)) for _ in range(num_heads)])
        self.fc_w = nn.ParameterList(
            [nn.Parameter(torch.randn(num_classes, dim, generator=generator) * 0.01) for _ in range(num_heads)])
        self.fc_b = nn.ParameterList([nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads)])

    def head_params(self, g: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return ([self.wk[g], self.wv[g], self.fc_w[g]],
                [self.query[g], self.bv[g], self.ln_w[g], self.ln_b[g], self.fc_b[g]])

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights [G, B, Q, H, L] of the (batch-normalised) tokens x [B, L, D]."""
        G, H, D = len(self.query), self.h, self.dim
        dh = D // H
        q = torch.stack(list(self.query)).view(G, self.q_n, H, dh)
        wk = torch.stack(list(self.wk)).view(G, H, dh, D)
        u = torch.einsum("gqhe,ghed->gqhd", q, wk)  # W_{k,h}ᵀ q_h: [G, Q, H, D]
        return (torch.einsum("bld,gqhd->gbqhl", x, u) * dh**-0.5).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        G, H = len(self.query), self.h
        x = self.bn(x.reshape(B * L, D)).view(B, L, D)
        a = self.attention(x)
        pooled = torch.einsum("gbqhl,bld->gbqhd", a, x)  # attention-weighted tokens per head
        wv = torch.stack(list(self.wv)).view(G, H, D // H, D)
        v = torch.einsum("gbqhd,ghed->gbqhe", pooled, wv).reshape(G, B, self.q_n, D)
        v = v + torch.stack(list(self.bv))[:, None, None, :]
        v = F.layer_norm(v.mean(2), (D,), eps=1e-6)  # AIM averages the queries' outputs
        v = v * torch.stack(list(self.ln_w))[:, None] + torch.stack(list(self.ln_b))[:, None]
        return torch.einsum("gbd,gcd->gbc", v, torch.stack(list(self.fc_w))) + torch.stack(list(self.fc_b))[:, None]


class DenseGrid(LinearGrid):
    """Per-patch linear heads: tokens [B, L, D] → logits [G, B, L, C] (BatchNorm over all
    patches of the batch, then each head's Linear on every patch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return super().forward(x.reshape(B * L, D)).view(len(self.weight), B, L, -1)


#: Below this many multiply-adds per training step, probes train on one intra-op thread.
SMALL_STEP_MACS = 1e9


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


def _minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    parts = list(torch.randperm(n, generator=generator).split(batch_size))
    # BatchNorm cannot normalise a batch of one sample: fold a lone last sample away.
    if len(parts) > 1 and len(parts[-1]) < 2:
        parts.pop()
    return parts


def fit_grid(grid: nn.Module, x: torch.Tensor, y: torch.Tensor, lrs: Sequence[float], *,
             epochs: int, batch_size: int, optimizer: str = "sgd", weight_decay: float = 0.0,
             seed: int = 0, device: torch.device | str = "cpu", progress: bool = False,
             desc: str = "probe") -> list[float]:
    """Train every head of ``grid`` (head g with lr ``lrs[g]``) in one pass over (x, y).

    x: features [N, ...] (any float dtype; upcast per minibatch, so float16 token caches stay
    float16 in memory); y: int64 targets [N] or [N, L] (-1 = ignore). Each step: one forward of
    all heads on the minibatch, loss = Σ_g mean-CE(head g), per-head param groups in one
    optimizer; cosine schedule with a linear warmup over the first 10 % of steps (MAE's linprobe
    schedule). Deterministic given ``seed``. Returns the mean training loss per epoch (summed
    over heads).
    """
    device = torch.device(device)
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
    steps_per_epoch = len(_minibatches(n, batch_size, torch.Generator().manual_seed(0)))
    total = max(1, epochs * steps_per_epoch)
    warmup = total // 10
    G = len(lrs)
    step, history = 0, []
    for _ in tqdm(range(epochs), desc=desc, unit="ep", disable=not progress, leave=False, file=sys.stderr):
        running, count = 0.0, 0
        for idx in _minibatches(n, batch_size, gen):
            f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
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
    grid.eval()
    return history


@torch.no_grad()
def _logits(grid: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[tuple[slice, torch.Tensor]]:
    grid.eval()
    for s in range(0, x.shape[0], batch_size):
        sl = slice(s, min(s + batch_size, x.shape[0]))
        yield sl, grid(x[sl].to(device, torch.float32))


def grid_accuracy(grid: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Top-1 accuracy of every head: x [N, ...], y int64 [N] → float64 [G] in [0, 1]."""
    correct = None
    for sl, logits in _logits(grid, x, batch_size, torch.device(device)):
        c = (logits.argmax(-1).cpu() == y[sl]).sum(1).double()
        correct = c if correct is None else correct + c
    return correct / max(1, x.shape[0])


def confusion_to_iou(conf: torch.Tensor) -> tuple[float, list[float | None]]:
    """conf int64 [C, C] (rows ground truth, columns prediction) → (mIoU, per-class IoU).

    IoU_c = TP / (TP + FP + FN); classes absent from both ground truth and prediction are
    undefined (None) and left out of the mean, as mmsegmentation does.
    """
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    valid = ~iou.isnan()
    miou = float(iou[valid].mean()) if valid.any() else float("nan")
    return miou, [None if math.isnan(v) else float(v) for v in iou.tolist()]


def upsample_predictions(logits: torch.Tensor, grid_hw: tuple[int, int], image_hw: tuple[int, int],
                         mode: str = "bilinear") -> torch.Tensor:
    """Per-patch logits [B, L, C] → per-pixel predicted category int64 [B, H, W] (logits are
    upsampled, then arg-maxed — not the labels, so bilinear blends neighbouring patches)."""
    B, L, C = logits.shape
    h, w = grid_hw
    maps = logits.transpose(1, 2).reshape(B, C, h, w)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps, size=tuple(image_hw), mode=mode, **kw).argmax(1)


def grid_miou(grid: nn.Module, tokens: torch.Tensor, maps: torch.Tensor, num_labels: int,
              grid_hw: tuple[int, int], heads: Sequence[int] | None = None, upsample: str = "bilinear",
              device: torch.device | str = "cpu") -> tuple[list[float], list[list[float | None]]]:
    """Pixel mIoU of dense heads: tokens [N, L, D], maps int [N, H, W] ground-truth categories.

    Returns (mIoU per head, per-class IoU per head) for ``heads`` (default: all). Memory is
    bounded: images go through in chunks sized so the upsampled logits stay ≲ 32 M floats.
    """
    device = torch.device(device)
    G = len(grid.weight)
    heads = list(range(G)) if heads is None else list(heads)
    H, W = maps.shape[-2:]
    chunk = max(1, min(256, (32 << 20) // max(1, num_labels * H * W)))
    conf = torch.zeros(len(heads), num_labels * num_labels, dtype=torch.int64)
    for sl, logits in _logits(grid, tokens, chunk, device):  # [G, b, L, C]
        gt = maps[sl].long().reshape(-1)
        for j, g in enumerate(heads):
            pred = upsample_predictions(logits[g], grid_hw, (H, W), upsample).cpu().reshape(-1)
            conf[j] += torch.bincount(gt * num_labels + pred, minlength=num_labels * num_labels)
    out = [confusion_to_iou(c.view(num_labels, num_labels)) for c in conf]
    return [m for m, _ in out], [p for _, p in out]


def _select(scores: Sequence[float], values: Sequence[float]) -> tuple[int, dict[str, float]]:
    scores = [float(s) for s in scores]
    best = int(np.nanargmax(np.asarray(scores)))  # first maximum: ties go to the smaller value
    return best, {_g(v): s for v, s in zip(values, scores)}


def _check_labels(y: torch.Tensor, what: str) -> None:
    if y.numel() == 0 or bool((y < 0).any()):
        raise ProbeError(f"the {what} data have no image labels for every image; a classification "
                         "probe needs labelled data (scenes, or folder:PATH with one sub-folder per class)")


def _majority_chance(train_y: torch.Tensor, eval_y: torch.Tensor) -> float:
    return float((eval_y == torch.bincount(train_y).argmax()).double().mean())


# ---------------------------------------------------------------------------------------------
# the probes on in-memory features


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, *,
                 num_classes: int | None = None, solver: str = "torch", lrs: Sequence[float] | None = None,
                 epochs: int = DEFAULT_EPOCHS["linear"], batch_size: int = DEFAULT_BATCH["linear"],
                 optimizer: str = "sgd", weight_decay: float | None = None, holdout: float = 0.2,
                 Cs: Sequence[float] | None = None, seed: int = 0, device: str | torch.device | None = None,
                 threads: int | None = None, progress: bool = False) -> ProbeResult:
    """Linear probe. train_x [N, D] / eval_x [M, D] float features, *_y int64 labels [N] / [M].

    ``solver="torch"``: BatchNorm(affine=False) + Linear heads, one per lr in ``lrs``, trained in
    one pass (see module docstring). ``solver="sklearn"``: ``LogisticRegression`` (lbfgs,
    multinomial) on features standardised with the fit part's statistics, one per ``C`` in
    ``Cs``. Either way the grid value is chosen on the held-out part of the training set.
    """
    _check_labels(train_y, "training")
    _check_labels(eval_y, "eval")
    C = num_classes or _num_labels(train_y, eval_y)
    fit_idx, held_idx = split_holdout(train_x.shape[0], holdout, seed)
    chance = _majority_chance(train_y, eval_y)
    if solver == "sklearn":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        Cs = _grid_values(Cs, DEFAULT_C)
        xf, yf = train_x[fit_idx].double().numpy(), train_y[fit_idx].numpy()
        scaler = StandardScaler().fit(xf)
        xf, xh = scaler.transform(xf), scaler.transform(train_x[held_idx].double().numpy())
        models, scores = [], []
        for c in Cs:
            m = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xf, yf)
            models.append(m)
            scores.append(float((m.predict(xh) == train_y[held_idx].numpy()).mean()))
        best, grid = _select(scores, Cs)
        value = float((models[best].predict(scaler.transform(eval_x.double().numpy())) == eval_y.numpy()).mean())
        return ProbeResult("linear", "accuracy", value, None, grid, chance, int(train_x.shape[0]),
                           int(eval_x.shape[0]), {"solver": "sklearn", "grid_param": "C", "best_C": Cs[best]})
    if solver != "torch":
        raise ProbeError(f"solver must be 'torch' or 'sklearn', got {solver!r}")
    lrs = _grid_values(lrs, DEFAULT_LRS[optimizer] if optimizer in DEFAULT_LRS else DEFAULT_LRS["sgd"])
    wd = DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0) if weight_decay is None else weight_decay
    dev = _device(device)
    g = torch.Generator().manual_seed(int(seed))
    heads = LinearGrid(train_x.shape[-1], C, len(lrs), g)
    with intra_op_threads(batch_size * train_x.shape[-1] * C * len(lrs), threads):
        fit_grid(heads, train_x[fit_idx], train_y[fit_idx], lrs, epochs=epochs, batch_size=batch_size,
                 optimizer=optimizer, weight_decay=wd, seed=seed, device=dev, progress=progress, desc="linear probe")
        best, grid = _select(grid_accuracy(heads, train_x[held_idx], train_y[held_idx], device=dev).tolist(), lrs)
        value = float(grid_accuracy(heads, eval_x, eval_y, device=dev)[best])
    return ProbeResult("linear", "accuracy", value, lrs[best], grid, chance, int(train_x.shape[0]),
                       int(eval_x.shape[0]), {"solver": "torch", "grid_param": "lr", "optimizer": optimizer,
                                              "weight_decay": wd, "epochs": epochs, "batch_size": batch_size})


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, *, k: int = 20,
               temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
               device: str | torch.device | None = None) -> torch.Tensor:
    """DINO's weighted k-NN votes: train_x [N, D], train_y int64 [N], query_x [M, D] →
    float32 [M, C] class scores Σ_{top-k j} exp(cos(q, x_j) / T)·[y_j = c]. Queries go in
    chunks, so memory is O(chunk · N)."""
    dev = _device(device)
    C = num_classes or _num_labels(train_y)
    k = min(int(k), train_x.shape[0])
    bank = F.normalize(train_x.to(dev, torch.float32), dim=1)
    labels = train_y.to(dev)
    out = torch.empty(query_x.shape[0], C)
    for s in range(0, query_x.shape[0], chunk):
        q = F.normalize(query_x[s: s + chunk].to(dev, torch.float32), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], C, device=dev)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out[s: s + chunk] = votes.cpu()
    return out


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, *,
              k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
              device: str | torch.device | None = None) -> ProbeResult:
    """Weighted k-NN accuracy of eval_x [M, D] against the whole training bank train_x [N, D]."""
    _check_labels(train_y, "training")
    _check_labels(eval_y, "eval")
    if k < 1 or temperature <= 0:
        raise ProbeError(f"k-NN needs k ≥ 1 and a positive temperature, got k={k}, T={temperature}")
    C = num_classes or _num_labels(train_y, eval_y)
    pred = knn_scores(train_x, train_y, eval_x, k=k, temperature=temperature, num_classes=C, device=device).argmax(1)
    value = float((pred == eval_y).double().mean())
    return ProbeResult("knn", "accuracy", value, None, {}, _majority_chance(train_y, eval_y),
                       int(train_x.shape[0]), int(eval_x.shape[0]),
                       {"k": min(int(k), int(train_x.shape[0])), "temperature": temperature})


def attentive_probe(train_tokens: torch.Tensor, train_y: torch.Tensor, eval_tokens: torch.Tensor,
                    eval_y: torch.Tensor, *, num_classes: int | None = None, attn_heads: int | None = None,
                    num_queries: int = 1, lrs: Sequence[float] | None = None,
                    epochs: int = DEFAULT_EPOCHS["attentive"], batch_size: int = DEFAULT_BATCH["attentive"],
                    optimizer: str = "adamw", weight_decay: float | None = None, holdout: float = 0.2,
                    seed: int = 0, device: str | torch.device | None = None, threads: int | None = None,
                    progress: bool = False) -> ProbeResult:
    """Attentive probe on patch tokens train_tokens [N, L, D] / eval_tokens [M, L, D] (float16
    or float32), labels int64 [N] / [M]. ``attn_heads`` defaults to D // 64 (ViT's 64-d heads),
    at least 1."""
    _check_labels(train_y, "training")
    _check_labels(eval_y, "eval")
    if train_tokens.ndim != 3:
        raise ProbeError("the attentive probe needs patch tokens [N, L, D] (pool='tokens')")
    C = num_classes or _num_labels(train_y, eval_y)
    D = train_tokens.shape[-1]
    heads_n = attn_heads or max(1, D // 64)
    fit_idx, held_idx = split_holdout(train_tokens.shape[0], holdout, seed)
    lrs = _grid_values(lrs, DEFAULT_LRS.get(optimizer, DEFAULT_LRS["adamw"]))
    wd = DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0) if weight_decay is None else weight_decay
    dev = _device(device)
    heads = AttentiveGrid(D, C, len(lrs), torch.Generator().manual_seed(int(seed)), heads_n, num_queries)
    L = train_tokens.shape[1]
    # per step: attention logits + pooling over B·L tokens for every (lr, query, head), + values
    macs = batch_size * len(lrs) * num_queries * (2 * L * D * heads_n + D * D)
    with intra_op_threads(macs, threads):
        fit_grid(heads, train_tokens[fit_idx], train_y[fit_idx], lrs, epochs=epochs, batch_size=batch_size,
                 optimizer=optimizer, weight_decay=wd, seed=seed, device=dev, progress=progress,
                 desc="attentive probe")
        bs = max(1, (1 << 16) // max(1, L))
        best, grid = _select(grid_accuracy(heads, train_tokens[held_idx], train_y[held_idx], bs, dev).tolist(), lrs)
        value = float(grid_accuracy(heads, eval_tokens, eval_y, bs, dev)[best])
    return ProbeResult("attentive", "accuracy", value, lrs[best], grid, _majority_chance(train_y, eval_y),
                       int(train_tokens.shape[0]), int(eval_tokens.shape[0]),
                       {"grid_param": "lr", "optimizer": optimizer, "weight_decay": wd, "epochs": epochs,
                        "batch_size": batch_size, "attn_heads": heads_n, "num_queries": num_queries})


def dense_probe(train_tokens: torch.Tensor, train_patch_labels: torch.Tensor, train_maps: torch.Tensor,
                eval_tokens: torch.Tensor, eval_maps: torch.Tensor, *, grid_hw: tuple[int, int],
                num_labels: int | None = None, upsample: str = "bilinear", lrs: Sequence[float] | None = None,
                epochs: int = DEFAULT_EPOCHS["dense"], batch_size: int = DEFAULT_BATCH["dense"],
                optimizer: str = "sgd", weight_decay: float | None = None, holdout: float = 0.2, seed: int = 0,
                device: str | torch.device | None = None, threads: int | None = None,
                progress: bool = False) -> ProbeResult:
    """Dense per-patch linear probe scored by pixel mIoU.

    train_tokens [N, L, D] / eval_tokens [M, L, D] patch tokens (L = h·w of ``grid_hw``, row
    major); train_patch_labels int64 [N, L] training targets (majority category per patch,
    -1 = ignore); train_maps [N, H, W] / eval_maps [M, H, W] ground-truth category per pixel
    (0 = background). The held-out split is by image, so no image's patches are on both sides.
    ``num_labels`` = number of categories including background (default: from the maps).
    """
    if train_tokens.ndim != 3 or train_tokens.shape[1] != grid_hw[0] * grid_hw[1]:
        raise ProbeError(f"the dense probe needs patch tokens [N, {grid_hw[0] * grid_hw[1]}, D] (pool='tokens')")
    if upsample not in ("bilinear", "nearest", "bicubic"):
        raise ProbeError(f"upsample must be bilinear, nearest or bicubic, got {upsample!r}")
    C = num_labels or _num_labels(train_patch_labels, train_maps, eval_maps)
    fit_idx, held_idx = split_holdout(train_tokens.shape[0], holdout, seed)
    lrs = _grid_values(lrs, DEFAULT_LRS.get(optimizer, DEFAULT_LRS["sgd"]))
    wd = DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0) if weight_decay is None else weight_decay
    dev = _device(device)
    heads = DenseGrid(train_tokens.shape[-1], C, len(lrs), torch.Generator().manual_seed(int(seed)))
    L, D = train_tokens.shape[1:]
    with intra_op_threads(batch_size * L * D * C * len(lrs), threads):
        fit_grid(heads, train_tokens[fit_idx], train_patch_labels[fit_idx], lrs, epochs=epochs,
                 batch_size=batch_size, optimizer=optimizer, weight_decay=wd, seed=seed, device=dev,
                 progress=progress, desc="dense probe")
        held, _ = grid_miou(heads, train_tokens[held_idx], train_maps[held_idx], C, grid_hw, upsample=upsample,
                            device=dev)
        best, grid = _select(held, lrs)
        (value,), (per_class,) = grid_miou(heads, eval_tokens, eval_maps, C, grid_hw, [best], upsample, dev)
    # Chance: every pixel predicted as the most frequent training patch category.
    majority = int(torch.bincount(train_patch_labels[train_patch_labels >= 0].reshape(-1), minlength=C).argmax())
    gt = eval_maps.long().reshape(-1)
    conf = torch.bincount(gt * C + majority, minlength=C * C).view(C, C)
    return ProbeResult("dense", "miou", value, lrs[best], grid, confusion_to_iou(conf)[0],
                       int(train_tokens.shape[0]), int(eval_tokens.shape[0]),
                       {"grid_param": "lr", "per_class_iou": per_class, "num_labels": C, "upsample": upsample,
                        "optimizer": optimizer, "weight_decay": wd, "epochs": epochs, "batch_size": batch_size})


# ---------------------------------------------------------------------------------------------
# run folders


def default_eval_data(train_data: str) -> str:
    """The eval spec implied by a training spec: scenes → ``scenes:val`` (at most as many images
    as the training spec names, ≤ 1000); anything else has no implied eval split (ProbeError)."""
    from rmae.data import parse_data_spec

    spec = parse_data_spec(train_data)
    if spec.kind == "scenes" and spec.split == "train":
        return "scenes:val" + (f":{min(spec.length, 1000)}" if spec.length else "")
    raise ProbeError(f"no default eval data for '{train_data}': pass eval data (--eval-data SPEC), "
                     "e.g. folder:/data/imagenet/val")


def result_path(run_dir: str | os.PathLike, probe: str, train: str, eval_: str, layer: int, pool: str,
                solver: str = "torch") -> Path:
    """Where :func:`run_probe` writes: ``RUN/analysis/probes/<probe>_<train>__<eval>_L<layer>_<pool>.json``."""
    from rmae.data import parse_data_spec

    from .features import data_slug

    name = probe + ("-sklearn" if solver == "sklearn" else "")
    return (Path(run_dir) / "analysis" / "probes"
            / f"{name}_{data_slug(parse_data_spec(train))}__{data_slug(parse_data_spec(eval_))}_L{layer}_{pool}.json")


def run_probe(run_dir: str | os.PathLike, probe: str, train_data: str, eval_data: str | None = None,
              layer: int = -1, *, pool: str | None = None, solver: str = "torch", epochs: int | None = None,
              lrs: Sequence[float] | None = None, optimizer: str | None = None, weight_decay: float | None = None,
              batch_size: int | None = None, holdout: float = 0.2, k: int = 20, temperature: float = 0.07,
              Cs: Sequence[float] | None = None, attn_heads: int | None = None, num_queries: int = 1,
              upsample: str = "bilinear", seed: int = 0, data_seed: int = 0, crop_pct: float = 1.0,
              device: str | None = None, extract_batch_size: int = 64, num_workers: int = 0,
              threads: int | None = None, cache: bool = True, progress: bool = True,
              write: bool = True) -> dict[str, Any]:
    """Probe run folder ``run_dir``'s encoder: features of ``train_data`` and ``eval_data``
    (data specs; eval defaults via :func:`default_eval_data`) at block ``layer``, from the
    feature cache when possible (:func:`analysis.features.load_features`), then ``probe`` ∈
    :data:`PROBES`. Returns a JSON-able dict and, with ``write``, stores it at
    :func:`result_path`::

        {"probe", "key" (results.json name), "metric" ("accuracy" | "miou"), "value",
         "best_lr", "grid" {lr: held-out score}, "chance", "train", "eval", "layer", "pool",
         "n_train", "n_eval", "num_classes", "feature_cache_hit", "seconds", "run", "weights",
         "seed", "path", + probe settings (epochs, optimizer, k, per_class_iou, …)}

    ``feature_cache_hit`` is True when both splits' features came from the cache.
    Raises ProbeError / rmae.CheckpointError / rmae.data.DataError with one-line messages.
    """
    t0 = time.perf_counter()
    if probe not in PROBES:
        raise ProbeError(f"unknown probe {probe!r}; choose one of {', '.join(PROBES)}")
    eval_data = eval_data or default_eval_data(train_data)
    pool = pool or DEFAULT_POOL[probe]
    if probe in ("attentive", "dense") and pool != "tokens":
        raise ProbeError(f"the {probe} probe reads patch tokens: use pool 'tokens', not {pool!r}")
    if probe in ("linear", "knn") and pool == "tokens":
        raise ProbeError(f"the {probe} probe needs one vector per image: use pool 'cls' or 'mean'")
    if solver == "sklearn" and probe != "linear":
        raise ProbeError("solver 'sklearn' applies to the linear probe only")
    common = dict(layer=layer, pool=pool, data_seed=data_seed, crop_pct=crop_pct,
                  batch_size=extract_batch_size, num_workers=num_workers, device=device,
                  progress=progress, cache=cache)
    tr: Features = load_features(run_dir, train_data, **common)
    ev: Features = load_features(run_dir, eval_data, **common)
    num_classes: int | None = None
    opt = optimizer or DEFAULT_OPTIMIZER.get(probe, "sgd")
    train_kw = dict(lrs=lrs, optimizer=opt, weight_decay=weight_decay, holdout=holdout, seed=seed,
                    device=device, threads=threads, progress=progress)
    if epochs is not None:
        train_kw["epochs"] = epochs
    if batch_size is not None:
        train_kw["batch_size"] = batch_size
    if probe in ("linear", "knn", "attentive"):
        num_classes = max(tr.num_classes, ev.num_classes)
        if not tr.has_labels or not ev.has_labels:
            which = train_data if not tr.has_labels else eval_data
            raise ProbeError(f"'{which}' has no image labels; the {probe} probe classifies images "
                             "(use scenes, or folder:PATH with one sub-folder per class)")
        # Compare names, not counts: folder: data index the sub-folders each folder has, so a
        # val folder missing one class would shift every later label by one.
        if (tr.class_names or tr.num_classes) != (ev.class_names or ev.num_classes):
            raise ProbeError(f"'{train_data}' and '{eval_data}' do not have the same classes "
                             f"({tr.num_classes} vs {ev.num_classes}"
                             + (f"; e.g. {sorted(set(tr.class_names or []) ^ set(ev.class_names or []))[:3]}"
                                if tr.class_names and ev.class_names else "")
                             + "); probe with data that share their class folders")
    if probe == "linear":
        if solver == "sklearn":
            res = linear_probe(tr.features, tr.labels, ev.features, ev.labels, num_classes=num_classes,
                               solver="sklearn", holdout=holdout, Cs=Cs, seed=seed)
        else:
            res = linear_probe(tr.features, tr.labels, ev.features, ev.labels, num_classes=num_classes, **train_kw)
    elif probe == "knn":
        res = knn_probe(tr.features, tr.labels, ev.features, ev.labels, k=k, temperature=temperature,
                        num_classes=num_classes, device=device)
    elif probe == "attentive":
        res = attentive_probe(tr.features, tr.labels, ev.features, ev.labels, num_classes=num_classes,
                              attn_heads=attn_heads, num_queries=num_queries, **train_kw)
    else:
        if tr.classes is None or ev.classes is None or tr.patch_labels is None:
            which = train_data if tr.classes is None else eval_data
            raise ProbeError(f"'{which}' has no ground-truth category maps; the dense probe needs "
                             "them (use scenes, or coco:IMAGES:JSON)")
        n_labels = max(tr.num_categories, ev.num_categories) + 1
        res = dense_probe(tr.features, tr.patch_labels, tr.classes, ev.features, ev.classes,
                          grid_hw=tr.grid, num_labels=n_labels, upsample=upsample, **train_kw)
    out = res.to_dict()
    out.update(train=tr.spec, eval=ev.spec, layer=tr.layer, pool=pool,
               num_classes=res.extra.get("num_labels", num_classes),
               feature_cache_hit=bool(tr.cache_hit and ev.cache_hit), run=str(run_dir),
               weights=tr.meta["key"]["weights"][:16], seed=seed, data_seed=data_seed,
               seconds=round(time.perf_counter() - t0, 3))
    out = _jsonable(out)
    if write:
        path = result_path(run_dir, probe, tr.spec, ev.spec, tr.layer, pool, solver)
        out["path"] = str(path)
        _write_json(path, out)
    return out


def _jsonable(obj: Any) -> Any:
    """NaN (e.g. mIoU of an empty eval set) → None, so results are strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    import json

    from rmae.io import atomic_write

    text = json.dumps(obj, indent=1, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
