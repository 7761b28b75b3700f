"""Attributions in every view: what the report, the dashboard and the notebook explain, and how.

A pre-trained MAE / R-MAE encoder has no head, so two scores stand in for "the model's output"
(:mod:`analysis.attribution` computes the maps):

- **probe logit** — a linear head on the pooled embedding (cls token, or the mean patch token for
  encoders without one), fitted on labelled training features (logistic regression on
  standardised features, the standardisation folded into one ``Linear``). The features are the
  linear probe's own (:func:`analysis.feature_cache.load_features` of the probe training data, so
  a run that was probed reads them back from its cache). Each image explains the logit of its
  labelled class (its predicted class when it has no label).
- **embedding similarity** — the cosine of the image's pooled embedding to the mean training
  embedding of that class; without labels, to the mean embedding of the data (the training data,
  else the evaluation images). Which reference was used is written next to every map.

For each score, three maps on the token grid ``[gh, gw]`` (non-negative, for overlays): ``IG`` —
``|integrated gradients|`` summed over each patch's pixels (baseline: black); ``occlusion`` — the
score's drop when the patch is replaced by the dataset mean colour (patch-aligned windows),
negative drops shown as 0; ``Grad-CAM`` — on the tokens entering the last block.

    targets = fit_targets(train_features, pool="cls")          # or Targets.unlabelled(mean)
    maps = attribution_maps(model, images, targets, labels)    # AttributionMaps
    draw(images, {"mae": maps}, "figures/attributions_mae.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import attribution as A
from . import encoder

Tensor = torch.Tensor

METHODS = ("IG", "occlusion", "Grad-CAM")
TARGETS = ("probe logit", "embedding similarity")
#: what each map shows, for captions
MEANING = {"IG": "|integrated gradients| per patch (baseline: black)",
           "occlusion": "score drop when the patch becomes the mean colour (drops < 0 shown as 0)",
           "Grad-CAM": "Grad-CAM on the tokens entering the last block"}


# ------------------------------------------------------------------------------------------
# the two scores


@dataclass
class Targets:
    """What the two scores of one run are made of (see the module docstring).

    ``head``: ``Linear [D → K]`` over ``classes`` (the class id of each logit), or None without
    labelled training data; ``class_means``: ``{class id: [D]}``; ``data_mean``: ``[D]`` (the
    reference without labels); ``about``: one sentence on what they were fitted on.
    """

    pool: str
    data_mean: Tensor
    about: str
    head: nn.Linear | None = None
    classes: list[int] = field(default_factory=list)
    class_means: dict[int, Tensor] = field(default_factory=dict)
    class_names: list[str] | None = None

    def name(self, cls: int) -> str:
        return self.class_names[cls] if self.class_names and 0 <= cls < len(self.class_names) else f"class {cls}"


def pool_of(model: nn.Module) -> str:
    """The image vector the scores read: cls when the encoder has one, else the mean patch token."""
    return "cls" if encoder.has_cls_token(model) else "mean"


def fit_linear_head(x: Tensor, y: Tensor, seed: int = 0) -> tuple[nn.Linear, list[int]]:
    """Logistic regression (lbfgs, multinomial, C = 1) on standardised ``x [N, D]`` with labels
    ``y [N]`` → (``Linear [D → K]`` on the raw features, the class id of each of its K logits).
    ``(x − μ)/σ · Wᵀ + b`` is folded into ``x · (W/σ)ᵀ + (b − (W/σ)·μ)``; a two-class fit's one
    logit becomes the pair ``∓z/2`` (the same softmax)."""
    from sklearn.linear_model import LogisticRegression

    xn = x.double().numpy()
    mu, sigma = xn.mean(0), xn.std(0)
    sigma = np.where(sigma > 0, sigma, 1.0)
    fit = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit((xn - mu) / sigma, y.numpy())
    w, b = fit.coef_ / sigma, fit.intercept_ - (fit.coef_ / sigma) @ mu
    if w.shape[0] == 1:
        w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    head = nn.Linear(x.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    return head.eval(), [int(c) for c in fit.classes_]


def fit_targets(features: Tensor, labels: Tensor | None, *, pool: str, about: str,
                class_names: Sequence[str] | None = None, seed: int = 0) -> Targets:
    """Both scores from pooled training features ``[N, D]`` and their labels ``[N]`` (None, or any
    label < 0: no labels → no head, the data mean as the similarity reference)."""
    x = features.float()
    targets = Targets(pool=pool, data_mean=x.mean(0), about=about,
                      class_names=list(class_names) if class_names else None)
    if labels is None or len(labels) == 0 or bool((labels < 0).any()) or labels.unique().numel() < 2:
        return targets
    targets.head, targets.classes = fit_linear_head(x, labels, seed)
    targets.class_means = {c: x[labels == c].mean(0) for c in targets.classes}
    return targets


# ------------------------------------------------------------------------------------------
# the maps


@dataclass
class AttributionMaps:
    """Maps of a batch: ``maps[target][method]`` float32 ``[B, gh, gw]`` ≥ 0 (targets and methods
    as in :data:`TARGETS` / :data:`METHODS`); ``explained[target][b]`` says what image ``b``'s
    maps explain; ``scores[target]`` ``[B]`` the explained score itself."""

    maps: dict[str, dict[str, np.ndarray]]
    explained: dict[str, list[str]]
    scores: dict[str, np.ndarray]


def _grid_maps(score: nn.Module, images: Tensor, target: Tensor | None, patch: int, ig_steps: int) -> dict[str, np.ndarray]:
    depth = len(score.model.blocks)
    ig = A.integrated_gradients(score, images, target, steps=ig_steps, baseline="black",
                                internal_batch_size=images.shape[0] * min(ig_steps, 8))  # 8 steps per pass
    occ = A.occlusion(score, images, target, patch_size=patch, baseline="zero")
    cam = A.grad_cam(score, images, target, layer=-1, at="input" if depth > 1 else "output", upsample=None)
    out = {"IG": A.patch_scores(ig, patch, reduce="sum", absolute=True),
           "occlusion": A.patch_scores(occ, patch, reduce="mean").clamp_min(0), "Grad-CAM": cam}
    return {k: v.detach().float().cpu().numpy() for k, v in out.items()}


def attribution_maps(model: nn.Module, images: Tensor, targets: Targets, labels: Tensor | None = None, *,
                     ig_steps: int = 16) -> AttributionMaps:
    """IG, occlusion and Grad-CAM maps of ``images [B, 3, H, W]`` (normalised model input) for the
    probe-logit score (when ``targets`` has a head) and the embedding-similarity score.
    ``labels [B]`` (−1 = unknown) choose the class explained; the head's prediction otherwise."""
    model = model.eval()
    device = encoder.model_device(model)
    images = images.to(device)
    patch = encoder.patch_size(model)
    B = images.shape[0]
    known = labels.tolist() if labels is not None else [-1] * B
    maps, explained, scores = {}, {}, {}
    cls: list[int | None] = [None] * B
    if targets.head is not None:
        probe = A.HeadLogits(model, targets.head.to(device), pool=targets.pool)
        with torch.no_grad():
            logits = probe(images)
        pred = [targets.classes[int(i)] for i in logits.argmax(1)]
        cls = [k if k in targets.classes else p for k, p in zip(known, pred)]
        column = torch.tensor([targets.classes.index(c) for c in cls], device=device)
        maps["probe logit"] = _grid_maps(probe, images, column, patch, ig_steps)
        explained["probe logit"] = [f"logit of {targets.name(c)} ({'label' if c == k else 'predicted'})"
                                    for c, k in zip(cls, known)]
        scores["probe logit"] = logits.gather(1, column[:, None])[:, 0].float().cpu().numpy()
    refs = torch.stack([targets.class_means[c] if c is not None else targets.data_mean for c in cls]).to(device)
    sim = A.EmbeddingSimilarity(model, refs, pool=targets.pool)
    maps["embedding similarity"] = _grid_maps(sim, images, None, patch, ig_steps)
    explained["embedding similarity"] = [f"cosine to the mean of {targets.name(c)}" if c is not None else
                                         "cosine to the data mean" for c in cls]
    with torch.no_grad():
        scores["embedding similarity"] = sim(images)[:, 0].float().cpu().numpy()
    return AttributionMaps(maps, explained, scores)


# ------------------------------------------------------------------------------------------
# the report


def draw(images: np.ndarray, maps: AttributionMaps, title: str, path: Path) -> None:
    """One run's figure: rows = images; columns = the image, then IG, occlusion and Grad-CAM for
    each score, overlaid (min–max scaled per map, nearest-upsampled so patches stay visible).
    ``images``: ``[B, H, W, 3]`` in [0, 1]."""
    import torch.nn.functional as F
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, nothing to close

    targets = [t for t in TARGETS if t in maps.maps]
    n, cols = len(images), 1 + len(METHODS) * len(targets)
    fig = Figure(figsize=(1.55 * cols, 1.85 * n + 0.6))
    axes = fig.subplots(n, cols, squeeze=False)
    H, W = images.shape[1:3]
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_xlabel("\n".join(maps.explained[t][i] for t in targets), fontsize=5)
        for j, (t, m) in enumerate((t, m) for t in targets for m in METHODS):
            a = torch.from_numpy(maps.maps[t][m][i])
            a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
            up = F.interpolate(a[None, None], size=(H, W), mode="nearest")[0, 0].numpy()
            ax = axes[i, 1 + j]
            ax.imshow(images[i])
            ax.imshow(up, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(f"{t}\n{m}", fontsize=6)
    if n:
        axes[0, 0].set_title("image", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def training_targets(path: Path, model: nn.Module, train: str | None, eval_loader: Any, *, seed: int,
                     device: Any, progress: bool) -> Targets:
    """The targets of one run for ``rmae analyze``: fitted on the probe training data ``train``
    through the feature cache (run folders) or in memory (checkpoint files); without training data,
    the mean embedding of (up to 256) evaluation images is the only reference."""
    pool = pool_of(model)
    if train is not None:
        from .features import extract_features

        if path.is_dir():
            from .feature_cache import load_features

            feats = load_features(path, train, layer=-1, pool=pool, device=device, progress=progress)
        else:
            feats = extract_features(model, train, layer=-1, pool=pool, progress=progress)
        labelled = feats.has_labels
        about = (f"a linear head on the {pool} embedding fitted on {len(feats)} labelled images of {feats.spec}"
                 if labelled else f"{feats.spec} has no labels: no probe head; similarity to its mean embedding")
        return fit_targets(feats.features, feats.labels if labelled else None, pool=pool, about=about,
                           class_names=feats.class_names, seed=seed)
    embeddings, seen = [], 0
    with torch.no_grad():
        for batch in eval_loader:
            tokens = model.forward_features(batch["images"].to(encoder.model_device(model)))
            embeddings.append(encoder.pool_tokens(tokens, pool, encoder.num_prefix_tokens(model)).float().cpu())
            seen += len(embeddings[-1])
            if seen >= 256:
                break
    x = torch.cat(embeddings)
    return fit_targets(x, None, pool=pool, about=f"no labelled training data: similarity to the mean {pool} "
                                                  f"embedding of {len(x)} evaluation images")


def report_attributions(models: dict[str, nn.Module], paths: dict[str, Path], loader: Any, n: int, train: str | None,
                        figures: Path, *, seed: int, device: Any, progress: bool) -> dict[str, Any]:
    """``rmae analyze``'s attribution figures: the first ``n`` evaluation images, every run →
    ``figures/attributions_<run>.png``; returns what the report says about them (``results.meta``)."""
    from rmae.data import denormalize

    images, labels = first_images(loader, n)
    shown = denormalize(images).permute(0, 2, 3, 1).numpy()
    figures.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, model in models.items():
        targets = training_targets(paths[name], model, train, loader, seed=seed, device=device, progress=progress)
        maps = attribution_maps(model, images, targets, labels)
        file = f"attributions_{_slug(name)}.png"
        draw(shown, maps, f"{name}: {targets.about}", figures / file)
        runs[name] = {"figure": f"figures/{file}", "about": targets.about, "explained": maps.explained}
    return {"images": int(images.shape[0]), "runs": runs, "methods": dict(MEANING)}


def first_images(loader: Any, n: int) -> tuple[Tensor, Tensor | None]:
    """The first ``n`` images of an evaluation loader ``[n, 3, H, W]`` and their labels ``[n]``
    (None when the data have none), across batches."""
    images, labels = [], []
    for batch in loader:
        images.append(batch["images"])
        labels.append(batch.get("label"))
        if sum(len(x) for x in images) >= n:
            break
    y = None if any(v is None for v in labels) else torch.cat(labels)[:n]
    return torch.cat(images)[:n], y


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def markdown(meta: dict[str, Any]) -> list[str]:
    """The report's attribution section (from :func:`report_attributions`' meta)."""
    lines = ["## Attributions", "",
             f"For the first {meta.get('images', '?')} evaluation images, what two scores of each encoder depend on: a "
             "**probe logit** (a linear head on the pooled embedding; each image explains its labelled class) and the "
             "**embedding similarity** (cosine of the pooled embedding to its class mean, or to the data mean without "
             "labels). Columns: " + "; ".join(f"{k} — {v}" for k, v in (meta.get("methods") or {}).items()) +
             ". Every map is min–max scaled on its own.", ""]
    for name, run in (meta.get("runs") or {}).items():
        lines += [f"### {name}", "", f"Scores: {run.get('about', '')}.", "", f"![attributions {name}]({run.get('figure')})", ""]
    return lines
