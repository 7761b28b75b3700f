"""The ``rmae`` command. Every subcommand's ``--help`` has examples."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MAIN_EPILOG = """\
examples:
  rmae demo                                   # MAE and R-MAE on the embedded scenes, ~10 min on a laptop CPU
  rmae pretrain --config demo --out runs/my-rmae steps=1000 region_variant=batch
  rmae pretrain --resume runs/my-rmae         # continue a stopped run exactly
  torchrun --nproc_per_node 2 -m rmae pretrain --config small --out runs/small
  rmae finetune runs/my-rmae --task segment --data scenes
  rmae import mae_pretrain_vit_base.pth --out runs/mae-official
  rmae export runs/my-rmae --format timm --out rmae_tiny_encoder.safetensors
  rmae regions precompute --data scenes:train:4096 --source fh --workers 2
  rmae models                                 # registered model names

A run folder (config.yaml, checkpoints/, metrics.jsonl, figures/) is what every command
reads and writes; any checkpoint rmae can load becomes one with `rmae import`.
"""


OUT_OF_MEMORY = "out of memory; use a smaller batch_size, num_workers, image size or model"


def _err(command: str, exc: BaseException) -> int:
    """One line naming the command and what is wrong, exit status 2 (never a traceback)."""
    msg = " ".join(str(exc).split())
    print(f"rmae {command}: error: {msg or type(exc).__name__}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# pretrain


def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train MAE / RAE / R-MAE into a run folder",
        description="Pre-train a model. Settings come from a YAML config (a path or a preset name: "
                    "demo, small, base) and key=value overrides; every model keyword is a key.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
examples:
  rmae pretrain --config demo                            # runs/demo-rmae_vit_tiny_patch8
  rmae pretrain --config demo model=mae_vit_tiny_patch8 --out runs/mae
  rmae pretrain --config base data=coco:/coco/train2017:/coco/annotations/instances_train2017.json
  rmae pretrain --config demo steps=50 batch_size=32 num_regions=16 region_variant=channel
  rmae pretrain --resume runs/mae                        # or rerun the same command: it resumes
  torchrun --nproc_per_node 4 -m rmae pretrain --config small --out runs/small   # DDP

{keys}
model keywords: img_size mask_ratio norm_pix_loss decoder_dim decoder_depth decoder_heads
  num_regions region_variant region_enc_dim region_enc_depth region_dec_dim region_dec_depth
  region_neck_depth region_heads bg_loss_weight region_loss_weight drop_path_rate
batch_size is the global batch per optimizer step; lr = base_lr × batch_size / 256.
""".format(keys="training keys:\n" + _train_keys_help()))
    p.add_argument("--config", help="YAML file or preset name (demo, small, base; shipped in the package)")
    p.add_argument("--out", help="run folder (default runs/<preset>-<model>)")
    p.add_argument("--resume", metavar="RUN", help="continue this run folder with its own config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_pretrain)


def _train_keys_help() -> str:
    from .settings import keys_help
    from .train.config import TrainConfig

    return keys_help(TrainConfig, skip=("model_args",))


def _pretrain(args) -> int:
    from .train.config import ConfigError, config_from_dict, load_config, parse_override, validate
    from .train.trainer import config_of_run, pretrain

    if args.resume:
        cfg = config_of_run(args.resume)
        source = f"{args.resume}/config.yaml"
        if args.overrides:  # e.g. steps=2000 to extend a finished run
            values = cfg.to_flat_dict()
            values.update(dict(parse_override(o) for o in args.overrides))
            source += " + overrides"
            cfg = config_from_dict(values, source)
        validate(cfg, source)
        out = Path(args.resume)
    else:
        if not args.config:
            raise ConfigError("give --config (a YAML file or preset: demo, small, base) or --resume RUN")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out or f"runs/{Path(args.config).stem}-{cfg.model}")
    result = pretrain(cfg, out, progress=not args.no_progress, resume=True if args.resume else None)
    last = result.last
    print(f"run folder: {result.run}  (step {result.step}, {result.wall_s:.0f} s)")
    if last:
        print("final: " + ", ".join(f"{k}={last[k]:.4f}" for k in ("loss", "loss_pixel", "loss_region") if last.get(k) is not None))
    return 0


# ---------------------------------------------------------------------------------------------
# import / export / models


def _add_import(sub) -> None:
    p = sub.add_parser(
        "import", help="turn any checkpoint rmae can load into a run folder",
        description="Load a checkpoint (official MAE .pth, official R-MAE .ckpt/.pth, timm ViT state dict, "
                    "our .safetensors, or a foreign encoder: DINO, DINOv2, iBOT, MoCo v3, DeiT, BEiT, MAE "
                    "fine-tuned, Hugging Face ViTMAE), detected by content, and write it as a run folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
examples:
  rmae import mae_visualize_vit_base.pth --out runs/mae-vis
  rmae import model_144000.ckpt --out runs/rmae-official
  rmae import timm_vit_small.pth --out runs/timm-small img_size=224
  rmae import mae_visualize_vit_base.pth --out runs/mae-vis norm_pix_loss=false
  rmae import dinov2_vits14_reg4_pretrain.pth --out runs/dinov2-reg img_size=224
  rmae import dino_checkpoint.pth --out runs/dino-student checkpoint_key=student
  rmae import moco_v3_vit_small.pth.tar --out runs/mocov3
  rmae import beitv2_base_patch16_224_pt1k_ft1k.pth --out runs/beitv2 source=beit-v2

key=value: model keywords the file cannot tell (norm_pix_loss, num_regions, num_heads, img_size).
Foreign encoders become timm models; their keys:
{keys}
""".format(keys=_import_keys_help()))
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_import)


def _import_keys_help() -> str:
    from .foreign.options import ImportOptions
    from .settings import keys_help

    return keys_help(ImportOptions)


def _import(args) -> int:
    from .checkpoint import load_model, save_model
    from .errors import RunFolderError
    from .runfolder import RunFolder
    from .settings import parse_overrides

    overrides = parse_overrides(args.overrides)
    run = RunFolder(args.out)
    if run.is_run():
        raise RunFolderError(f"{args.out} already exists as a run folder; choose another --out")
    run.refuse_foreign()  # a file, or a folder of the user's files, is never written into
    try:
        model = load_model(args.checkpoint, **overrides)
    except TypeError as e:  # an unknown model keyword
        from .settings import ConfigError

        raise ConfigError(str(e)) from None
    foreign = getattr(model, "timm_arch", None)  # a foreign encoder held by timm (rmae.foreign)
    with run.lock():
        run.create("import")
        if foreign is not None:
            from .foreign import save_run

            save_run(run, model, args.checkpoint)
        else:
            run.write_config({"imported_from": str(Path(args.checkpoint).resolve()), "source_kind": model.source_kind},
                             model.config.to_dict())
            save_model(model, run.model_path, metadata={"imported_from": str(args.checkpoint)})
    if foreign is not None:
        attn = model.blocks[0].attn
        print(f"{args.checkpoint}: {model.imported.how}")
        print(f"  → {run.root}: {foreign.kind} as timm {foreign.timm}, width {model.embed_dim}, depth {len(model.blocks)}, "
              f"{attn.num_heads} heads, patch {foreign.patch}, {model.num_prefix_tokens} prefix token(s), image "
              f"{foreign.img_size[0]}×{foreign.img_size[1]} (trained at {foreign.native_size[0]}; positions follow "
              f"the {foreign.resample.get('pos_embed')} rule)")
        for note in model.imported.notes:
            print(f"  {note}")
        from .data.transforms import IMAGENET_MEAN

        norm = getattr(model, "input_normalization", None)
        if norm and norm["mean"] != list(IMAGENET_MEAN):
            print(f"  trained on inputs normalised with mean {norm['mean']}, std {norm['std']}: rmae maps its "
                  "ImageNet-normalised images to that before the patch embedding")
        return 0
    c = model.config
    print(f"{args.checkpoint}: {model.source_kind}")
    print(f"  → {run.root}: {c.family} ViT width {c.embed_dim}, depth {c.depth}, patch {c.patch_size}, "
          f"image {c.img_size}" + (f", region branch ({c.region_variant}, neck depth {c.region_neck_depth})"
                                   if c.has_region_branch else ""))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a run's weights as a timm encoder or our safetensors",
        description="Export a run folder (or any loadable checkpoint).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
examples:
  rmae export runs/demo-rmae --format timm --out encoder.safetensors
      then: vit = timm.create_model(NAME, **KWARGS); vit.load_state_dict(load_file(...), strict=True)
  rmae export runs/demo-rmae --format safetensors --out rmae_demo.safetensors

A run of a foreign encoder (DINO, DINOv2, BEiT, … imported by `rmae import`) exports its timm
state dict as it is, with the timm name and keywords in the file (either format).
""")
    p.add_argument("run")
    p.add_argument("--format", choices=["timm", "safetensors"], default="timm")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_export)


def _export(args) -> int:
    from .checkpoint import load_model, save_model
    from .export import export_timm
    from .io import OutputPathError, check_output_path
    from .runfolder import RunFolder

    out = check_output_path(args.out)
    src = Path(args.run)
    weights = RunFolder(src).weights_path() if src.is_dir() else src
    if out.exists() and weights.exists() and out.samefile(weights):
        raise OutputPathError(f"{args.out}: is the input's weights file; write the export to another file")
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise OutputPathError(f"{args.out}: is inside the run folder {src}; write the export outside it")
    model = load_model(args.run)
    if getattr(model, "timm_arch", None) is not None:  # a foreign encoder: its timm state dict as it is
        from .foreign import export

        name, kwargs = export(model, args.out)
        print(f"wrote {args.out}: timm.create_model({name!r}, **{json.dumps(kwargs)}); rmae.load_model reads it too")
        return 0
    if args.format == "timm":
        name, kwargs = export_timm(model, args.out)
        print(f"wrote {args.out}: timm.create_model({name!r}, **{json.dumps(kwargs)})")
    else:
        save_model(model, args.out)
        print(f"wrote {args.out} (weights + model config; rmae.load_model reads it)")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered model names and keywords")
    p.set_defaults(func=_models)


def _models(args) -> int:
    from .models import list_models, model_keywords

    print("\n".join(list_models()))
    print("\nkeywords: " + ", ".join(model_keywords()))
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="pre-train MAE and R-MAE on the embedded scenes (same seed and budget)",
        description="The main job on the embedded default: ViT-Tiny/8 MAE and R-MAE, 64² generated "
                    "scenes with exact instance masks, FH regions, the same seed, data and steps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  rmae demo\n  rmae demo --out /tmp/demo steps=50\n")
    p.add_argument("--out", default="runs", help="folder for the two run folders (default runs/)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo preset")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from .train.config import load_config
    from .train.trainer import pretrain

    t0 = time.time()
    results = {}
    for family in ("mae", "rmae"):
        cfg = load_config("demo", list(args.overrides) + [f"model={family}_vit_tiny_patch8"])
        print(f"\n== {family.upper()}: {cfg.model}, {cfg.data}, {cfg.steps} steps × batch {cfg.batch_size}, seed {cfg.seed}")
        results[family] = pretrain(cfg, Path(args.out) / f"demo-{family}", progress=not args.no_progress)
    print(f"\nrmae demo finished in {time.time() - t0:.0f} s")
    for family, r in results.items():
        last = r.last or {}
        losses = ", ".join(f"{k}={last[k]:.4f}" for k in ("loss", "loss_pixel", "loss_region") if last.get(k) is not None)
        figs = sorted((r.run / "figures").glob("*.png"))
        print(f"  {family:>4}: {r.run}  step {r.step}  {losses}" + (f"\n        figure: {figs[-1]}" if figs else ""))
    mae_run, rmae_run = results["mae"].run, results["rmae"].run
    # Packages built on rmae (analysis, dashboards) extend the demo through the
    # ``rmae.demo`` entry-point group: each hook gets the runs and prints what it made.
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="rmae.demo"), key=lambda e: e.name):
        try:
            lines = ep.load()({"mae": mae_run, "rmae": rmae_run}, Path(args.out))
        except Exception as e:  # noqa: BLE001 - the runs are made; a failing extra step is reported, not fatal
            print(f"rmae demo: {ep.name} step failed: {e}", file=sys.stderr)
            continue
        print("\n".join(lines or []))
    print(f"""
This compared ONE seed of each method: its intervals describe these two checkpoints, not MAE
against R-MAE (another seed would land elsewhere). For a verdict about the methods, train several
seeds of each at a budget where they learn and compare across seeds:
  rmae study --config study --out studies/paper --seeds 3 --families mae,rmae,rae,scratch --grid rmae:region_source=fh,gt

next:
  rmae export {rmae_run} --format timm --out rmae_demo_encoder.safetensors
  rmae pretrain --resume {rmae_run} steps=1000          # train longer
  python -c "import rmae; m = rmae.load_model('{rmae_run}'); print(m.config)"
  (MAE run for comparison: {mae_run})""")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .data.cli import add_regions_subcommand

    parser = argparse.ArgumentParser(
        prog="rmae", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Region-aware masked autoencoders (MAE, RAE, R-MAE): pre-train, fine-tune, "
                    "import/export checkpoints, regions.",
        epilog=MAIN_EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_pretrain(sub)
    _add_finetune(sub)
    _add_import(sub)
    _add_export(sub)
    add_regions_subcommand(sub)
    _add_models(sub)
    _add_plugins(sub)
    return parser


def _add_plugins(sub) -> None:
    """Subcommands of packages built on rmae (``analyze``, ``probe``, ``dashboard``), found
    through the ``rmae.commands`` entry-point group: rmae itself never imports them."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="rmae.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the whole CLI down
            print(f"rmae: warning: subcommand plugin {ep.name!r} ({ep.value}) failed to load: {e}", file=sys.stderr)
            continue
        register(sub)


def _add_finetune(sub) -> None:
    from .train.finetune import add_finetune_subcommand

    add_finetune_subcommand(sub)


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError

    parser = build_parser()
    # key=value overrides may come before or after options (argparse alone would only take
    # them in one place): collect stray key=value words into args.overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides or []) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    command = " ".join(filter(None, [args.command, getattr(args, "regions_command", None)]))
    try:
        return int(args.func(args) or 0)
    except UserError as e:  # every input problem: one line, exit 2
        return _err(command, e)
    except KeyboardInterrupt:
        print(f"rmae {command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        return _err(command, MemoryError(OUT_OF_MEMORY))
    except RuntimeError as e:  # torch's allocators: "can't allocate memory", "CUDA out of memory. Tried to allocate"
        if "allocate" in str(e) and "memory" in str(e):
            return _err(command, MemoryError(OUT_OF_MEMORY))
        raise
    except OSError as e:  # the file system said no: permissions, a full disk, a path through a file…
        where = f"{e.filename}: " if e.filename else ""
        return _err(command, OSError(f"{where}{e.strerror or e}"))


if __name__ == "__main__":
    raise SystemExit(main())
