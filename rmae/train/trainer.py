"""The pre-training loop: data → model → AdamW → run folder, resumable to the same result.

Reproducibility contract (CPU, same seed): the batches of step s, and the masking noise of
step s, are functions of (seed, s) alone — batch indices come from a per-epoch permutation,
augmentation from a per-item generator (``rmae.data.pipeline``), noise from a per-step
generator sliced per process. So a run resumed from a checkpoint, or run on 1 or N processes
with the same global batch, sees the same data and masks as an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from ..data import RegionDataset, RegionLoader, build_dataset, collate_regions
from ..errors import CheckpointError, TrainingDiverged
from ..models import MaskedAutoencoderViT, create_model
from ..runfolder import RunFolder
from .config import ConfigError, TrainConfig, config_from_dict
from .distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from .figures import save_reconstruction_figure
from .optim import build_optimizer, lr_at, set_lr
from .rng import capture_rng, restore_rng

# keys that may change when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = {"steps", "epochs", "num_workers", "device", "log_every", "checkpoint_every",
                     "figure_every", "keep_checkpoints", "region_cache", "compile"}


@dataclass
class TrainResult:
    run: Path
    step: int
    last: dict[str, Any]  # last metrics record
    wall_s: float


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([0x7A1A, *parts]).generate_state(1)[0])


def build_train_dataset(cfg: TrainConfig, model: MaskedAutoencoderViT, train: bool = True,
                        data: str | None = None) -> RegionDataset:
    c = model.config
    base = build_dataset(data or cfg.data, image_size=c.image_hw[0], seed=cfg.seed)
    source = cfg.region_source if c.has_region_branch else None
    cache = None if cfg.region_cache in ("none", None) else cfg.region_cache
    return RegionDataset(base, source=source, cache=cache, num_regions=c.num_regions, image_size=c.image_hw,
                         train=train, patch_size=c.patch_size, seed=cfg.seed, scale=cfg.scale,
                         min_region_size=cfg.min_region_size)


class BatchPlan:
    """Which samples every process sees at every step (see module docstring)."""

    def __init__(self, num_samples: int, cfg: TrainConfig, dist: DistInfo):
        self.n, self.batch, self.accum, self.dist = num_samples, cfg.batch_size, cfg.accum_steps, dist
        if self.batch % (dist.world_size * self.accum):
            raise ConfigError(f"batch_size {self.batch} must be divisible by world size {dist.world_size} × "
                              f"accum_steps {self.accum}")
        self.micro = self.batch // (dist.world_size * self.accum)
        self.steps_per_epoch = self.n // self.batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the dataset has {self.n} images, fewer than one batch of {self.batch}; "
                              "lower batch_size or use more data")
        self.seed = cfg.seed

    def micro_batches(self, epoch: int, first_step: int) -> list[list[int]]:
        """This process's micro-batches for steps ``first_step …`` of ``epoch``, in order."""
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_seed_for(self.seed, epoch)))
        per_rank = self.batch // self.dist.world_size
        out = []
        for j in range(first_step, self.steps_per_epoch):
            step_idx = perm[j * self.batch:(j + 1) * self.batch]
            mine = step_idx[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
            out.extend(mine[a * self.micro:(a + 1) * self.micro].tolist() for a in range(self.accum))
        return out

    def noise(self, step: int, num_patches: int) -> torch.Tensor:
        """This process's masking noise for ``step``: ``[accum, micro, L]`` sliced from the
        global ``[batch, L]`` drawn from a per-step generator."""
        g = torch.Generator().manual_seed(_seed_for(self.seed, 1_000_003, step))
        full = torch.rand(self.batch, num_patches, generator=g)
        per_rank = self.batch // self.dist.world_size
        mine = full[self.dist.rank * per_rank:(self.dist.rank + 1) * per_rank]
        return mine.reshape(self.accum, self.micro, num_patches)


def _batches(ds: RegionDataset, plan: BatchPlan, start_step: int, num_workers: int) -> Iterator[tuple[int, dict]]:
    """Yield (epoch, micro-batch) from ``start_step`` on, epoch after epoch."""
    first_epoch, offset = divmod(start_step, plan.steps_per_epoch)
    loader = RegionLoader(ds, num_workers=num_workers, start_epoch=first_epoch,
                          batch_plan=lambda e: plan.micro_batches(e, offset if e == first_epoch else 0))
    while True:
        epoch = loader.epoch
        for batch in loader:  # one epoch; skips reported by workers are merged by the loader
            yield epoch, batch
        if ds.skips.count:
            print(f"epoch {epoch}: {ds.summary()}", flush=True)


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = (set(old) | set(new)) - RESUMABLE_CHANGES - {"model_config"}
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(keys) if old.get(k) != new.get(k)]


def pretrain(cfg: TrainConfig, out: str | Path, progress: bool = True, resume: bool | None = None) -> TrainResult:
    """Pre-train ``cfg.model`` into the run folder ``out`` (created, or resumed if it holds a
    checkpoint of the same config). ``resume=True`` requires a checkpoint; ``False`` refuses one.

    The main process holds the run folder's writer lock for the whole run, so a second
    ``rmae pretrain`` on the same folder stops at once with a clear error."""
    run = RunFolder(out).refuse_foreign()  # a file, or a folder of the user's files, is never written into
    dist, device = init_distributed(cfg.device)
    try:
        with run.lock() if dist.is_main else contextlib.nullcontext():
            return _pretrain(cfg, run, dist, device, progress, resume)
    finally:
        cleanup(dist)


def _pretrain(cfg: TrainConfig, run: RunFolder, dist: DistInfo, device: torch.device, progress: bool,
              resume: bool | None) -> TrainResult:
    t_start = time.time()
    out = run.root
    flat = cfg.to_flat_dict()
    previous = run.latest() if run.is_run() else None
    if previous is not None:
        if resume is False:
            raise ConfigError(f"{out} already holds a run (step {previous['step']}); choose another --out or resume it")
        old = run.read_config()
        diff = _config_differences({k: v for k, v in old.items()}, flat)
        if diff:
            raise ConfigError(f"{out} holds a run with a different config ({'; '.join(diff)}); use another --out "
                              f"for a new run, or `rmae pretrain --resume {out}` to continue it as it was")
    elif resume:
        raise CheckpointError(f"{out}: nothing to resume (no checkpoints/latest.json)")

    torch.manual_seed(cfg.seed)  # the same initial weights on every process (DDP checks)
    model = create_model(cfg.model, **cfg.model_args)
    model.to(device)
    c = model.config
    peak_lr = cfg.base_lr * cfg.batch_size / 256
    optimizer = build_optimizer(model, peak_lr, cfg.weight_decay, cfg.betas)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    state = None
    if previous is not None:  # read and check the checkpoint before the (slower) data is prepared
        weights, state = run.load_state()
        _load_resume_weights(model, weights, device)
        _resume_check(lambda: _load_optimizer_state(optimizer, scaler, state), state, run)
    ds = build_train_dataset(cfg, model)
    plan = BatchPlan(len(ds), cfg, dist)
    total_steps = cfg.steps if cfg.steps is not None else max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))

    step = 0
    if state is not None:
        _resume_check(lambda: restore_rng(state["rng"]), state, run)
        step = state["step"]
        if dist.is_main:
            run.truncate_metrics(step)
            print(f"resuming {out} from step {step}", flush=True)
    if dist.is_main:
        run.create("pretrain")
        run.clean_partial()
        run.write_config(flat, c.to_dict())
    barrier(dist)

    if step >= total_steps:
        if dist.is_main:
            print(f"{out} is already complete ({step}/{total_steps} steps)")
        return TrainResult(out, step, (run.read_metrics()[0] or [{}])[-1], time.time() - t_start)

    net: torch.nn.Module = model
    if cfg.compile:
        net = torch.compile(net)
    if dist.enabled:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    figure_batch = _figure_batch(cfg, model) if dist.is_main else None
    writer = SummaryWriter(str(run.tensorboard)) if dist.is_main else None
    bar = None
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {c.name or cfg.model}", unit="step", dynamic_ncols=True)

    batches = _batches(ds, plan, step, cfg.num_workers)
    window_t, window_imgs, last_record = time.time(), 0, {}
    net.train()
    while step < total_steps:
        lr = lr_at(step, total_steps, peak_lr, cfg.warmup_steps, cfg.min_lr)
        set_lr(optimizer, lr)
        noise = plan.noise(step, c.num_patches)
        sums = torch.zeros(3)  # loss, loss_pixel, loss_region over micro-batches
        optimizer.zero_grad(set_to_none=True)
        for a in range(cfg.accum_steps):
            epoch, batch = next(batches)
            images = batch["images"].to(device, non_blocking=True)
            regions = batch["regions"].to(device, non_blocking=True) if "regions" in batch else None
            sync = contextlib.nullcontext() if (a == cfg.accum_steps - 1 or not dist.enabled) else net.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out_ = net(images, regions=regions, noise=noise[a].to(device))
                loss = out_.loss / cfg.accum_steps
                if not torch.isfinite(out_.loss):
                    _diverged(run, step, out_, latest=run.latest())
                (scaler.scale(loss) if scaler is not None else loss).backward()
            sums += torch.tensor([out_.loss.item(),
                                  out_.loss_pixel.item() if out_.loss_pixel is not None else float("nan"),
                                  out_.loss_region.item() if out_.loss_region is not None else float("nan")])
        if scaler is not None:
            scaler.unscale_(optimizer)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        window_imgs += cfg.batch_size

        if step % cfg.log_every == 0 or step == total_steps:
            losses = all_reduce_mean((sums / cfg.accum_steps).to(device), dist).cpu().tolist()
            elapsed = time.time() - window_t
            record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), "loss": losses[0],
                      "loss_pixel": None if math.isnan(losses[1]) else losses[1],
                      "loss_region": None if math.isnan(losses[2]) else losses[2],
                      "lr": lr, "images_per_s": round(window_imgs / max(elapsed, 1e-9), 2),
                      "time": round(time.time() - t_start, 2)}
            window_t, window_imgs, last_record = time.time(), 0, record
            if dist.is_main:
                run.log(record)
                if writer is not None:
                    for k in ("loss", "loss_pixel", "loss_region", "lr", "images_per_s"):
                        if record[k] is not None:
                            writer.add_scalar(f"train/{k}", record[k], step)
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[0]:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            if dist.is_main:
                state = {"optimizer": optimizer.state_dict(), "step": step,
                         "scaler": scaler.state_dict() if scaler is not None else {},
                         "rng": capture_rng(), "config": flat}
                run.save_checkpoint(model, state, step, keep=cfg.keep_checkpoints)
            barrier(dist)
        if dist.is_main and figure_batch is not None and (
                (cfg.figure_every and step % cfg.figure_every == 0) or step == total_steps):
            png = _save_figure(model, figure_batch, run, step, device)
            if writer is not None:
                writer.add_image("reconstruction", np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
            net.train()
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.flush()
        writer.close()
    return TrainResult(out, step, last_record, time.time() - t_start)


def _diverged(run: RunFolder, step: int, out, latest: dict | None) -> None:
    parts = ", ".join(f"{n}={getattr(out, n).item():.4g}" for n in ("loss", "loss_pixel", "loss_region")
                      if getattr(out, n) is not None)
    keep = (f"the last good checkpoint is step {latest['step']} in {run.checkpoints}" if latest
            else "no checkpoint was written before it")
    raise TrainingDiverged(f"loss is not finite at step {step + 1} ({parts}); stopped without updating the "
                           f"weights — {keep}. Lower base_lr, add warmup_steps, or set clip_grad=1.0")


def _figure_batch(cfg: TrainConfig, model: MaskedAutoencoderViT, n: int = 4) -> dict[str, torch.Tensor] | None:
    """A fixed set of images (deterministic eval crop) shown in every reconstruction figure."""
    try:
        ds = build_train_dataset(cfg, model, train=False)
    except Exception:  # noqa: BLE001 - figures are a convenience; training goes on without them
        return None
    items = [ds[i] for i in range(min(n, len(ds)))]
    return collate_regions(items)


def _save_figure(model: MaskedAutoencoderViT, batch: dict, run: RunFolder, step: int, device: torch.device) -> Path:
    g = torch.Generator().manual_seed(1234)  # the same masks in every figure of a run
    noise = torch.rand(batch["images"].shape[0], model.num_patches, generator=g).to(device)
    regions = batch.get("regions")
    return save_reconstruction_figure(model, batch["images"].to(device),
                                      None if regions is None else regions.to(device),
                                      run.figures / f"recon_step_{step:06d}.png",
                                      title=f"{run.root.name} — step {step}", noise=noise)


def _load_resume_weights(model: MaskedAutoencoderViT, weights: Path, device: torch.device) -> None:
    from ..checkpoint import read_checkpoint

    sd, _, _ = read_checkpoint(weights)  # clear errors for truncated or foreign files
    own = model.state_dict()
    bad = sorted(set(own) ^ set(sd)) + sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if bad:
        raise CheckpointError(f"{weights}: does not fit the model of this run's config ({len(bad)} keys differ, "
                              f"e.g. {bad[:3]}); the weights belong to another model — delete checkpoints/latest.json "
                              "to start over")
    model.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, scaler, state: dict[str, Any]) -> None:
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def _resume_check(load, state: dict[str, Any], run: RunFolder) -> None:
    """``load()`` a part of a checkpoint's trainer state (optimizer, RNG), or one clear error when
    it does not belong to this run's model (a state file copied from another run, or edited)."""
    try:
        load()
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        why = " ".join(str(e).split())[:160]
        raise CheckpointError(f"{run.checkpoints}: the trainer state of step {state['step']} does not fit this run "
                              f"({type(e).__name__}: {why}); delete checkpoints/latest.json to start over") from None


def config_of_run(run_dir: str | Path) -> TrainConfig:
    """The training config a run folder was made with (for --resume)."""
    run = RunFolder(run_dir)
    if not run.root.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    doc = run.read_config()
    return config_from_dict(doc, source=str(Path(run_dir) / "config.yaml"))
