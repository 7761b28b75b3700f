"""Run folders: the unit every tool exchanges.

    RUN/
      config.yaml                       resolved training config + model_config (rebuilds the model)
      metrics.jsonl                     one JSON object per logging step
      checkpoints/step_000100.safetensors   weights (+ model config in the metadata)
      checkpoints/step_000100.state.pt      optimizer, scaler, RNG, data position — tensors and
                                            plain containers only (torch.load(weights_only=True))
      checkpoints/latest.json           points at the newest complete pair; written last
      figures/recon_step_000100.png     reconstructions (masked | prediction | original)

Every file is written atomically (temp file, fsync, rename) and ``latest.json`` moves only
after both files of a checkpoint are complete, so a run killed at any instant resumes from a
whole checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..checkpoint import CheckpointError, atomic_write, save_model
from ..models import MaskedAutoencoderViT


class RunFolder:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.figures = self.root / "figures"
        self.metrics_path = self.root / "metrics.jsonl"
        self.config_path = self.root / "config.yaml"

    def create(self) -> "RunFolder":
        for d in (self.root, self.checkpoints, self.figures):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # -- config ------------------------------------------------------------------------------

    def write_config(self, flat: dict[str, Any], model_config: dict[str, Any]) -> None:
        doc = dict(flat)
        doc["model_config"] = model_config
        text = "# written by rmae; edit a copy, not this file (it rebuilds the model)\n" + yaml.safe_dump(doc, sort_keys=False)
        atomic_write(self.config_path, lambda tmp: Path(tmp).write_text(text))

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            raise CheckpointError(f"{self.root}: not a run folder (no config.yaml)")
        try:
            return yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise CheckpointError(f"{self.config_path}: not valid YAML ({e})") from None

    # -- metrics -----------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after ``after_step`` (a resumed run logs them again)."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.metrics_path, lambda tmp: Path(tmp).write_text(text))

    # -- checkpoints -------------------------------------------------------------------------

    def latest(self) -> dict[str, Any] | None:
        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        return json.loads(pointer.read_text())

    def save_checkpoint(self, model: MaskedAutoencoderViT, state: dict[str, Any], step: int, keep: int = 2) -> Path:
        name = f"step_{step:06d}"
        weights = self.checkpoints / f"{name}.safetensors"
        state_file = self.checkpoints / f"{name}.state.pt"
        save_model(model, weights, metadata={"step": str(step)})
        atomic_write(state_file, lambda tmp: torch.save(state, tmp))
        pointer = {"step": step, "weights": weights.name, "state": state_file.name}
        atomic_write(self.checkpoints / "latest.json", lambda tmp: Path(tmp).write_text(json.dumps(pointer)))
        self._prune(keep)
        return weights

    def clean_partial(self) -> list[str]:
        """Delete temp files a killed save left behind (ours: ``.<name>.*.tmp``; safetensors'
        own: ``.tmp*``). They were never renamed into place, so nothing refers to them."""
        removed = []
        if self.checkpoints.exists():
            for p in self.checkpoints.iterdir():
                if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith(".tmp")):
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        return removed

    def _prune(self, keep: int) -> None:
        steps = sorted({int(p.name[5:11]) for p in self.checkpoints.glob("step_*.safetensors")})
        for s in steps[:-keep] if keep > 0 else []:
            for p in self.checkpoints.glob(f"step_{s:06d}.*"):
                p.unlink(missing_ok=True)

    def load_state(self) -> tuple[Path, dict[str, Any]] | None:
        latest = self.latest()
        if latest is None:
            return None
        weights = self.checkpoints / latest["weights"]
        state_path = self.checkpoints / latest["state"]
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means an unusable state file
            raise CheckpointError(f"{state_path}: cannot be read ({e}); delete checkpoints/latest.json to "
                                  "start over, or point it at an older step") from None
        return weights, state


# -- RNG state as plain tensors/lists (no numpy objects: weights_only loading refuses them) ----


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(_python_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(s: tuple) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _python_state_from_list(s: list) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)
