"""Foreign encoders: the ViT checkpoints researchers hold, as timm models behind rmae's surface.

``rmae.load_model`` / ``rmae import`` recognise these files by content (:mod:`.detect`), read
without unpickling code (``torch.load(weights_only=True)`` or safetensors):

=================  ===============================================================  ===========
source_kind        files                                                            timm model
=================  ===============================================================  ===========
dino               release state dicts; training checkpoints (teacher, or student)  vit_*
dinov2             release files with and without registers; teacher checkpoints    vit_*_dinov2
ibot               ``checkpoint_teacher.pth``; full training checkpoints            vit_*
moco-v3            training checkpoints (base or momentum encoder); DeiT-converted  vit_* (12 heads at S)
deit               ``{"model": …}`` with a classifier head                          vit_*
deit-distilled     the same with a distillation token (two prefix tokens)           deit_*_distilled
beit, beit-v2      pre-training and fine-tuned files                                beit*_*
mae-finetuned      MAE fine-tuned with global pooling (``fc_norm``)                 vit_* (avg pool)
hf-vitmae          Hugging Face ``ViTMAEModel`` / ``ViTMAEForPreTraining``            vit_*
timm               any timm ViT state dict, with ``arch=NAME``                      NAME
=================  ===============================================================  ===========

Conversion uses timm's own ``checkpoint_filter_fn`` wherever one exists (:mod:`.vit`,
:mod:`.dinov2`, :mod:`.beit`; Hugging Face's layout has none: :mod:`.hf_vitmae`). A run folder
of such an encoder records the timm architecture in ``config.yaml`` (``arch:``,
:mod:`.timm_arch`) and the weights in timm's layout at their native grid (``model.safetensors``);
loading it at any image size resamples position tables by the original project's rule
(:mod:`.resample`). The model comes back in eval mode on the CPU with ``source_kind`` set, and
``analysis.encoder`` reaches it exactly as it reaches rmae's own models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import CheckpointError
from ..io import save_state_dict
from ..runfolder import RunFolder
from .detect import detect
from .options import KINDS, NAMES, OPTION_KEYS, ImportOptions, import_options
from .timm_arch import Imported, TimmArch, build


def _converter(kind: str):
    from . import beit, dinov2, hf_vitmae, vit

    return {"dinov2": dinov2.convert, "beit": beit.convert, "beit-v2": beit.convert,
            "hf-vitmae": hf_vitmae.convert}.get(kind, vit.convert)


def from_object(obj: Any, meta: dict[str, str], path: Path, overrides: dict[str, Any]) -> Imported | None:
    """The foreign encoder in a loaded checkpoint, converted to timm's layout; None when the file
    is one rmae's own model holds (and no option asks otherwise). ``overrides``: import settings
    (:class:`ImportOptions`) and, for rmae's own files, model keywords."""
    options = import_options({k: v for k, v in overrides.items() if k in OPTION_KEYS}, f"{path}: import settings")
    found = detect(obj, meta, path, options)
    if found is None:
        for key in ("interpolate_offset", "interpolate_antialias"):
            if getattr(options, key) is not None:
                raise CheckpointError(f"{path}: {key} applies to DINOv2 files; this file is not one")
        return None
    # half-precision files run — and convert: DINOv2's cls token takes its position — in float32
    found.state_dict = {k: v.float() if v.is_floating_point() else v for k, v in found.state_dict.items()}
    model_keywords = sorted(set(overrides) - set(OPTION_KEYS))  # rmae's own model keywords
    if model_keywords:
        raise CheckpointError(f"{path}: a {found.how}, imported as a timm architecture: {', '.join(model_keywords)} "
                              f"do not apply to it (its settings: {', '.join(OPTION_KEYS)})")
    if found.kind != "dinov2" and (options.interpolate_offset is not None or options.interpolate_antialias is not None):
        raise CheckpointError(f"{path}: interpolate_offset / interpolate_antialias apply to DINOv2; this is a {found.how}")
    if "arch" in found.extra:  # an `rmae export` of a foreign run: the architecture is in its metadata
        try:
            doc = json.loads(found.extra["arch"])
        except ValueError:
            doc = None  # from_config names the problem
        arch = TimmArch.from_config(doc.get("kind") if isinstance(doc, dict) else None, doc, f"{path} metadata")
        if options.arch is not None:
            arch.timm = options.arch
        return Imported(arch, dict(found.state_dict), [], f"{NAMES.get(arch.kind, arch.kind)} ({found.how})", str(path))
    imported = _converter(found.kind)(found, options, path)
    imported.how, imported.source = found.how, str(path)
    return imported


def is_timm_run(run: RunFolder) -> bool:
    """A run folder of a foreign encoder (its config.yaml records ``arch``)."""
    return run.config_path.is_file() and "arch" in run.read_config()


def load_run(run: RunFolder, overrides: dict[str, Any]) -> nn.Module:
    """The timm model a foreign run records, at its ``img_size`` (or ``overrides["img_size"]``)."""
    from ..checkpoint import read_checkpoint

    bad = sorted(set(overrides) - {"img_size"})
    if bad:
        raise CheckpointError(f"{run.root}: a foreign encoder run ({', '.join(bad)} do not apply; img_size does)")
    size = import_options({k: v for k, v in overrides.items()}, f"{run.root}: load settings").img_size
    cfg = run.read_config()
    arch = TimmArch.from_config(cfg.get("source_kind"), cfg.get("arch"), str(run.config_path))
    weights = run.weights_path()
    sd, _, _ = read_checkpoint(weights)
    model = build(Imported(arch, sd, [], NAMES.get(arch.kind, arch.kind), str(weights)), size)
    model.source = str(weights)
    return model


def _file_metadata(arch: TimmArch) -> dict[str, str]:
    """safetensors metadata: what timm needs (``timm_model``, ``timm_kwargs``) and what rmae needs
    to read the file back as this foreign encoder (``rmae_arch``)."""
    return {"format": "timm", "timm_model": arch.timm, "timm_kwargs": json.dumps(arch.to_config()["kwargs"]),
            "rmae_arch": json.dumps({"kind": arch.kind, **arch.to_config()})}


def save_run(run: RunFolder, model: nn.Module, imported_from: str | os.PathLike) -> None:
    """Write a foreign encoder built by :func:`build` as a run folder (caller holds the lock):
    ``config.yaml`` with ``arch`` and ``model.safetensors`` with its native weights."""
    imp, arch = model.imported, model.timm_arch
    native = TimmArch(arch.kind, arch.timm, arch.kwargs, arch.native_size, arch.resample, arch.layer_norm_eps)
    run.write_config({"imported_from": str(Path(imported_from).resolve()), "source_kind": arch.kind, "model": arch.timm,
                      "arch": arch.to_config()}, None)
    save_state_dict(imp.state_dict, run.model_path, _file_metadata(native))


def export(model: nn.Module, path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """A foreign encoder's timm state dict at the size it was built (``timm.create_model(name,
    **kwargs).load_state_dict(load_file(path))`` reads it; so does ``rmae.load_model``)."""
    arch = model.timm_arch
    at_size = TimmArch(arch.kind, arch.timm, {**arch.kwargs, "img_size": list(arch.img_size)}, arch.img_size,
                       arch.resample, arch.layer_norm_eps)
    save_state_dict(model.state_dict(), path, _file_metadata(at_size) if Path(path).suffix == ".safetensors" else None)
    return arch.timm, at_size.to_config()["kwargs"]


__all__ = ["KINDS", "OPTION_KEYS", "ImportOptions", "Imported", "TimmArch", "build", "export", "from_object",
           "is_timm_run", "load_run", "save_run"]
