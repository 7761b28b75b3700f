"""Image-classification probes on in-memory features: linear, weighted k-NN and attentive.

- :func:`linear_probe`: MAE's linear probe — ``BatchNorm1d(affine=False)`` then Linear, SGD with
  momentum and warmup + cosine (or AdamW), a grid of lrs trained in one pass; or
  ``solver="sklearn"``: scikit-learn's ``LogisticRegression`` on standardised features over a
  grid of ``C``.
- :func:`knn_probe`: DINO's weighted k-NN — cosine similarity of L2-normalised features, the top
  ``k`` (20) training neighbours vote with weight ``exp(sim / T)``, ``T = 0.07``. Nothing is
  trained, so there is no grid.
- :func:`attentive_probe`: an AIM-style attentive probe (learned-query cross-attention over the
  patch tokens; it differs from AIM's head by a value bias and a LayerNorm before the Linear —
  see :class:`~analysis.probes.heads.AttentiveGrid`).

Features live on the CPU (often memory-mapped); ``device`` (``auto``: CUDA, else MPS, else CPU)
is where the heads train and where each minibatch goes. Scores are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rmae.device import resolve_device

from .config import DEFAULT_BATCH, DEFAULT_C, DEFAULT_EPOCHS, DEFAULT_LRS, DEFAULT_WEIGHT_DECAY, ProbeError
from .fit import fit_grid, grid_accuracy, grid_values, intra_op_threads, select, split_holdout
from .heads import AttentiveGrid, LinearGrid
from .result import ProbeResult, check_labels, count_labels, majority_chance

CPU = torch.device("cpu")


def _sklearn_linear(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                    fit_idx: torch.Tensor, held_idx: torch.Tensor, Cs: Sequence[float] | None,
                    seed: int) -> tuple[float, int, dict[str, float], list[float]]:
    """LogisticRegression (lbfgs, multinomial) per C on features standardised with the fit
    part's statistics → (eval accuracy of the best, best index, grid, Cs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    Cs = grid_values(Cs, DEFAULT_C)
    xf, yf = train_x[fit_idx].double().numpy(), train_y[fit_idx].numpy()
    scaler = StandardScaler().fit(xf)
    xf, xh = scaler.transform(xf), scaler.transform(train_x[held_idx].double().numpy())
    models, scores = [], []
    for c in Cs:
        m = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xf, yf)
        models.append(m)
        scores.append(float((m.predict(xh) == train_y[held_idx].numpy()).mean()))
    best, grid = select(scores, Cs)
    value = float((models[best].predict(scaler.transform(eval_x.double().numpy())) == eval_y.numpy()).mean())
    return value, best, grid, Cs


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, *,
                 num_classes: int | None = None, solver: str = "torch", lrs: Sequence[float] | None = None,
                 epochs: int = DEFAULT_EPOCHS["linear"], batch_size: int = DEFAULT_BATCH["linear"],
                 optimizer: str = "sgd", weight_decay: float | None = None, holdout: float = 0.2,
                 Cs: Sequence[float] | None = None, patience: int = 0, seed: int = 0, device: str | torch.device = "auto",
                 threads: int | None = None, progress: bool = False) -> ProbeResult:
    """Linear probe. train_x [N, D] / eval_x [M, D] float features, *_y int64 labels [N] / [M].

    ``solver="torch"``: BatchNorm(affine=False) + Linear heads, one per lr in ``lrs``, trained in
    one pass (:mod:`analysis.probes.fit`). ``solver="sklearn"``: ``LogisticRegression`` per
    ``C`` in ``Cs``. Either way the grid value is chosen on the held-out part of the training set.
    """
    check_labels(train_y, "training")
    check_labels(eval_y, "eval")
    C = num_classes or count_labels(train_y, eval_y)
    fit_idx, held_idx = split_holdout(train_x.shape[0], holdout, seed)
    chance = majority_chance(train_y, eval_y)
    n, m = int(train_x.shape[0]), int(eval_x.shape[0])
    if solver == "sklearn":
        value, best, grid, Cs = _sklearn_linear(train_x, train_y, eval_x, eval_y, fit_idx, held_idx, Cs, seed)
        return ProbeResult("linear", "accuracy", value, None, grid, chance, n, m,
                           {"solver": "sklearn", "grid_param": "C", "best_C": Cs[best]})
    if solver != "torch":
        raise ProbeError(f"solver must be 'torch' or 'sklearn', got {solver!r}")
    lrs = grid_values(lrs, DEFAULT_LRS.get(optimizer, DEFAULT_LRS["sgd"]))
    wd = DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0) if weight_decay is None else weight_decay
    dev = resolve_device(device)
    heads = LinearGrid(train_x.shape[-1], C, len(lrs), torch.Generator().manual_seed(int(seed)))
    with intra_op_threads(batch_size * train_x.shape[-1] * C * len(lrs), threads):
        fit_grid(heads, train_x[fit_idx], train_y[fit_idx], lrs, epochs=epochs, batch_size=batch_size,
                 optimizer=optimizer, weight_decay=wd, seed=seed, device=dev, progress=progress, desc="linear probe",
                 held_out=lambda: grid_accuracy(heads, train_x[held_idx], train_y[held_idx], device=dev),
                 patience=patience)
        best, grid = select(grid_accuracy(heads, train_x[held_idx], train_y[held_idx], device=dev).tolist(), lrs)
        value = float(grid_accuracy(heads, eval_x, eval_y, device=dev)[best])
    return ProbeResult("linear", "accuracy", value, lrs[best], grid, chance, n, m,
                       {"solver": "torch", "grid_param": "lr", "optimizer": optimizer,
                        "weight_decay": wd, "epochs": epochs, "batch_size": batch_size})


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, *, k: int = 20,
               temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
               device: str | torch.device = "auto") -> torch.Tensor:
    """DINO's weighted k-NN votes: train_x [N, D], train_y int64 [N], query_x [M, D] →
    float32 [M, C] (CPU) class scores Σ_{top-k j} exp(cos(q, x_j) / T)·[y_j = c]. The bank sits
    on ``device``; queries go in chunks, so memory is O(chunk · N)."""
    dev = resolve_device(device)
    C = num_classes or count_labels(train_y)
    k = min(int(k), train_x.shape[0])
    bank = F.normalize(train_x.to(dev, torch.float32), dim=1)
    labels = train_y.to(dev)
    out = torch.empty(query_x.shape[0], C, device=CPU)
    for s in range(0, query_x.shape[0], chunk):
        q = F.normalize(query_x[s: s + chunk].to(dev, torch.float32), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], C, device=dev)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        out[s: s + chunk] = votes.cpu()
    return out


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor, *,
              k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
              device: str | torch.device = "auto") -> ProbeResult:
    """Weighted k-NN accuracy of eval_x [M, D] against the whole training bank train_x [N, D]."""
    check_labels(train_y, "training")
    check_labels(eval_y, "eval")
    if k < 1 or temperature <= 0:
        raise ProbeError(f"k-NN needs k ≥ 1 and a positive temperature, got k={k}, T={temperature}")
    C = num_classes or count_labels(train_y, eval_y)
    pred = knn_scores(train_x, train_y, eval_x, k=k, temperature=temperature, num_classes=C, device=device).argmax(1)
    value = float((pred == eval_y).double().mean())
    return ProbeResult("knn", "accuracy", value, None, {}, majority_chance(train_y, eval_y),
                       int(train_x.shape[0]), int(eval_x.shape[0]),
                       {"k": min(int(k), int(train_x.shape[0])), "temperature": temperature})


def attentive_probe(train_tokens: torch.Tensor, train_y: torch.Tensor, eval_tokens: torch.Tensor,
                    eval_y: torch.Tensor, *, num_classes: int | None = None, attn_heads: int | None = None,
                    num_queries: int = 1, lrs: Sequence[float] | None = None,
                    epochs: int = DEFAULT_EPOCHS["attentive"], batch_size: int = DEFAULT_BATCH["attentive"],
                    optimizer: str = "adamw", weight_decay: float | None = None, holdout: float = 0.2,
                    seed: int = 0, device: str | torch.device = "auto", threads: int | None = None,
                    patience: int = 0, progress: bool = False) -> ProbeResult:
    """AIM-style attentive probe (:class:`~analysis.probes.heads.AttentiveGrid`) on patch tokens
    train_tokens [N, L, D] / eval_tokens [M, L, D] (float16 or float32), labels int64 [N] / [M].
    ``attn_heads`` defaults to D // 64 (ViT's 64-d heads), at least 1."""
    check_labels(train_y, "training")
    check_labels(eval_y, "eval")
    if train_tokens.ndim != 3:
        raise ProbeError("the attentive probe needs patch tokens [N, L, D] (pool='tokens')")
    C = num_classes or count_labels(train_y, eval_y)
    L, D = train_tokens.shape[1:]
    heads_n = attn_heads or max(1, D // 64)
    fit_idx, held_idx = split_holdout(train_tokens.shape[0], holdout, seed)
    lrs = grid_values(lrs, DEFAULT_LRS.get(optimizer, DEFAULT_LRS["adamw"]))
    wd = DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0) if weight_decay is None else weight_decay
    dev = resolve_device(device)
    heads = AttentiveGrid(D, C, len(lrs), torch.Generator().manual_seed(int(seed)), heads_n, num_queries)
    # per step: attention logits + pooling over B·L tokens for every (lr, query, head), + values
    macs = batch_size * len(lrs) * num_queries * (2 * L * D * heads_n + D * D)
    with intra_op_threads(macs, threads):
        bs = max(1, (1 << 16) // max(1, L))
        fit_grid(heads, train_tokens[fit_idx], train_y[fit_idx], lrs, epochs=epochs, batch_size=batch_size,
                 optimizer=optimizer, weight_decay=wd, seed=seed, device=dev, progress=progress,
                 desc="attentive probe", patience=patience,
                 held_out=lambda: grid_accuracy(heads, train_tokens[held_idx], train_y[held_idx], bs, dev))
        best, grid = select(grid_accuracy(heads, train_tokens[held_idx], train_y[held_idx], bs, dev).tolist(), lrs)
        value = float(grid_accuracy(heads, eval_tokens, eval_y, bs, dev)[best])
    return ProbeResult("attentive", "accuracy", value, lrs[best], grid, majority_chance(train_y, eval_y),
                       int(train_tokens.shape[0]), int(eval_tokens.shape[0]),
                       {"grid_param": "lr", "optimizer": optimizer, "weight_decay": wd, "epochs": epochs,
                        "batch_size": batch_size, "attn_heads": heads_n, "num_queries": num_queries})
