"""Fine-tuning a pre-trained encoder: image classification and semantic segmentation.

MAE's fine-tuning recipe: AdamW (β 0.9/0.999, wd 0.05, none on norms/biases/tokens),
layer-wise lr decay (``layer_decay``, 0.75 for ViT-B in MAE), stochastic depth, linear warmup
then cosine, lr = base_lr × batch / 256.

- classify: the mean of the patch tokens → LayerNorm → Linear (MAE's global-pool head).
  Labels: image-folder class sub-folders; for ``scenes``, the class of the largest visible
  object in the crop.
- segment: patch tokens → LayerNorm → 1×1 conv → bilinear upsampling to pixels, cross-entropy
  against category maps (``scenes``, COCO; background is class 0); mIoU on the val split.

Results (``accuracy`` or ``miou``, per epoch and final) go to ``RUN/finetune-<task>/``:
``config.yaml``, ``metrics.jsonl``, ``results.json`` and the fine-tuned weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_model
from ..data import DataError, RegionDataset, RegionLoader, build_dataset, evaluation_loader
from ..device import resolve_device
from ..errors import TrainingDiverged
from ..evaluation import confusion_matrix, iou_from_confusion
from ..io import atomic_write_json, save_state_dict
from ..models import MaskedAutoencoderViT
from ..runfolder import RunFolder
from ..settings import ConfigError, add_arguments, from_args, keys_help, setting
from .optim import build_optimizer, lr_at, set_lr

TASKS = ("classify", "segment")


@dataclass
class FinetuneConfig:
    task: str = setting("classify", "classify (image labels) | segment (category maps)", choices=TASKS)
    data: str = setting("scenes:train", "training data spec")
    val_data: str | None = setting(None, "validation data spec (scenes → scenes:val; otherwise needed for a score)")
    epochs: float = setting(10, "epochs over the training data (when steps is not set)", low=0, low_open=True, high=1e6)
    steps: int | None = setting(None, "optimizer steps (wins over epochs)", low=1, high=10**9)
    batch_size: int = setting(64, "images per step", low=1, high=1 << 16)
    base_lr: float = setting(1e-3, "peak lr = base_lr × batch_size / 256 (MAE)", low=0, low_open=True, high=10)
    min_lr: float = setting(1e-6, "lr at the end of the cosine", low=0, high=10)
    warmup_steps: int = setting(50, "linear warmup steps", low=0)
    weight_decay: float = setting(0.05, "AdamW weight decay (none on norms, biases, tokens)", low=0, high=10)
    layer_decay: float = setting(0.75, "layer-wise lr decay (MAE: 0.75 for ViT-B)", low=0, low_open=True, high=1)
    drop_path_rate: float = setting(0.1, "stochastic depth", low=0, high=1, high_open=True)
    seed: int = setting(0, "seed of the head, data order and augmentation", low=0)
    num_workers: int = setting(2, "data-loader worker processes", low=0, high=256)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    log_every: int = setting(10, "steps between metrics.jsonl lines", low=1)

    def resolved_val(self) -> str | None:
        if self.val_data:
            return self.val_data
        if self.data.startswith("scenes"):
            return "scenes:val"
        return None


class FinetuneModel(nn.Module):
    """Pre-trained encoder + task head. images [B, 3, H, W] → logits [B, C] or [B, C, H, W]."""

    def __init__(self, encoder: MaskedAutoencoderViT, task: str, num_classes: int):
        super().__init__()
        self.encoder, self.task = encoder, task
        dim = encoder.config.embed_dim
        self.head_norm = nn.LayerNorm(dim, eps=1e-6)
        if task == "classify":
            self.head = nn.Linear(dim, num_classes)
        else:
            self.head = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.trunc_normal_(self.head.weight, std=2e-5 if task == "classify" else 0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)  # [B, 1+L, D]
        if self.task == "classify":  # MAE's global-pool head: mean of the patch tokens
            return self.head(self.head_norm(self.encoder.pool(tokens, "avg")))
        tokens = tokens[:, self.encoder.num_prefix_tokens:]
        gh, gw = self.encoder.patch_embed.grid_size
        x = self.head_norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
        return F.interpolate(self.head(x), size=images.shape[-2:], mode="bilinear", align_corners=False)

    def layer_scales(self, decay: float) -> dict[str, float]:
        """lr multiplier per parameter: decay^(depth + 1 − layer), embeddings are layer 0."""
        depth = self.encoder.config.depth
        scales = {}
        for name, _ in self.named_parameters():
            if name.startswith("encoder.blocks."):
                layer = int(name.split(".")[2]) + 1
            elif name.startswith(("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed")):
                layer = 0
            else:
                layer = depth + 1
            scales[name] = decay ** (depth + 1 - layer)
        return scales


def largest_object_class(instances: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """instances, classes [B, H, W] → [B] class id of the largest visible instance (0 if none)."""
    labels = []
    for inst, cls in zip(instances, classes):
        ids, counts = torch.unique(inst[inst > 0], return_counts=True)
        if len(ids) == 0:
            labels.append(0)
            continue
        biggest = ids[counts.argmax()]
        labels.append(int(cls[inst == biggest][0]))
    return torch.tensor(labels, dtype=torch.long)


def _targets(batch: dict, task: str, data: str) -> torch.Tensor:
    if task == "segment":
        if "classes" not in batch:
            raise DataError(f"{data}: segmentation needs category maps (scenes or coco:…), this data has none")
        return batch["classes"]
    if "label" in batch:
        return batch["label"]
    if "instances" in batch and "classes" in batch:
        return largest_object_class(batch["instances"], batch["classes"])
    raise DataError(f"{data}: classification needs labels (class sub-folders of a folder:…, or scenes)")


def _num_classes(base, task: str) -> int:
    """Output classes: category ids 0..C (0 = background) for segmentation and for scenes'
    largest-object labels; image-folder labels 0..C−1 otherwise."""
    if task == "classify" and base.num_classes:
        return base.num_classes
    if base.num_categories:
        return base.num_categories + 1
    raise DataError(f"{type(base).__name__} has neither image labels nor category maps to {task} on")


@torch.no_grad()
def evaluate(model: FinetuneModel, loader: RegionLoader, task: str, data: str, n: int, device) -> dict[str, float]:
    model.eval()
    correct = total = 0
    conf = torch.zeros(n, n, dtype=torch.long)
    for batch in loader:
        target = _targets(batch, task, data)
        logits = model(batch["images"].to(device)).cpu()
        if task == "classify":
            correct += int((logits.argmax(1) == target).sum())
            total += len(target)
        else:
            conf += confusion_matrix(logits.argmax(1), target.clamp(max=n - 1), n)
    model.train()
    return {"accuracy": correct / max(total, 1)} if task == "classify" else {"miou": iou_from_confusion(conf)[0]}


def finetune(run_dir: str | Path, cfg: FinetuneConfig, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    encoder = load_model(run_dir, drop_path_rate=cfg.drop_path_rate)
    c = encoder.config
    base = build_dataset(cfg.data, image_size=c.image_hw[0], seed=cfg.seed)
    n_cls = _num_classes(base, cfg.task)
    train_ds = RegionDataset(base, source=None, cache=None, image_size=c.image_hw, train=True, seed=cfg.seed,
                             scale=(0.08, 1.0) if cfg.task == "classify" else (0.5, 1.0))
    if len(train_ds) < cfg.batch_size:
        raise ConfigError(f"{cfg.data} has {len(train_ds)} images, fewer than one batch of {cfg.batch_size}; "
                          "lower batch_size or use more data")
    train_loader = RegionLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                num_workers=cfg.num_workers, seed=cfg.seed)
    val_spec = cfg.resolved_val()
    val_loader = None
    if val_spec:
        val_loader = evaluation_loader(val_spec, c.image_hw, batch_size=cfg.batch_size, seed=cfg.seed,
                                       num_workers=cfg.num_workers)

    model = FinetuneModel(encoder, cfg.task, n_cls).to(device)
    out_dir = RunFolder(out or Path(run_dir) / f"finetune-{cfg.task}")
    with out_dir.lock():
        out_dir.create("finetune")
        return _finetune_loop(run_dir, cfg, out_dir, model, train_loader, val_loader, val_spec, n_cls, device, progress)


def _finetune_loop(run_dir, cfg: FinetuneConfig, out_dir: RunFolder, model: "FinetuneModel", train_loader: RegionLoader,
                   val_loader: RegionLoader | None, val_spec: str | None, n_cls: int, device: torch.device,
                   progress: bool) -> dict[str, Any]:
    c = model.encoder.config
    steps_per_epoch = max(1, len(train_loader))
    total = cfg.steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    peak = cfg.base_lr * cfg.batch_size / 256
    opt = build_optimizer(model, peak, cfg.weight_decay, betas=(0.9, 0.999), layer_scales=model.layer_scales(cfg.layer_decay))
    out_dir.write_config({**asdict(cfg), "pretrained": str(run_dir), "num_classes": n_cls}, c.to_dict())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"finetune {cfg.task}", unit="step", dynamic_ncols=True)
    step, epoch, t0, record = 0, 0, time.time(), {}
    model.train()
    while step < total:
        for batch in train_loader:  # one epoch
            if step >= total:
                break
            lr = lr_at(step, total, peak, cfg.warmup_steps, cfg.min_lr)
            set_lr(opt, lr)
            target = _targets(batch, cfg.task, cfg.data).to(device)
            logits = model(batch["images"].to(device))
            loss = F.cross_entropy(logits, target.clamp(max=n_cls - 1))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"fine-tuning loss is not finite at step {step}; lower base_lr or add warmup_steps")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == total:
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": loss.item(), "lr": lr,
                          "time": round(time.time() - t0, 2)}
                out_dir.log(record)
        epoch += 1
        if val_loader is not None and (step >= total or epoch % max(1, int(cfg.epochs) // 5 or 1) == 0):
            scores = evaluate(model, val_loader, cfg.task, val_spec, n_cls, device)
            out_dir.log({"step": step, "epoch": epoch, **{f"val_{k}": v for k, v in scores.items()}})
    if bar is not None:
        bar.close()
    results = {"task": cfg.task, "pretrained": str(run_dir), "steps": step, "num_classes": n_cls,
               "train_loss": record.get("loss"), "wall_s": round(time.time() - t0, 1)}
    if val_loader is not None:
        results.update({f"val_{k}": v for k, v in evaluate(model, val_loader, cfg.task, val_spec, n_cls, device).items()})
        results["val_data"] = val_spec
    save_state_dict(model.state_dict(), out_dir.root / "finetuned.safetensors")
    atomic_write_json(out_dir.root / "results.json", _finite(results), indent=2)
    return results


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj


EPILOG = """\
examples:
  rmae finetune runs/demo-rmae --task classify                       # scenes: class of the largest object
  rmae finetune runs/demo-rmae --task segment epochs=20 layer_decay=0.65 base_lr=1e-3
  rmae finetune runs/vit --task classify --data folder:/data/train val_data=folder:/data/val

settings (key=value; --task and --data are flags for the same keys):
"""


def add_finetune_subcommand(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a run's encoder for classification or segmentation",
        description="MAE's fine-tuning recipe (layer-wise lr decay, warmup, cosine, drop path) on a run "
                    "folder's encoder; accuracy or mIoU on the val split goes to RUN/finetune-<task>/results.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG + keys_help(FinetuneConfig))
    p.add_argument("run")
    p.add_argument("--out", help="output folder (default RUN/finetune-<task>)")
    p.add_argument("--no-progress", action="store_true")
    add_arguments(p, FinetuneConfig, flags=("task", "data"))
    p.set_defaults(func=_finetune_cli)


def _finetune_cli(args) -> int:
    cfg = from_args(FinetuneConfig, args, "finetune settings")
    results = finetune(args.run, cfg, args.out, progress=not args.no_progress)  # errors: one line, by rmae.cli
    print(json.dumps(results, indent=2))
    return 0
