"""The hostile-input corpus: bad configs, checkpoints, run folders, images and COCO files, each
built by its case (no binary fixtures), with the outcome the ``rmae`` command must show.

A :class:`Case` builds its inputs in a fresh folder and returns the ``rmae`` arguments;
``expect`` is ``"error"`` (exit 2 and exactly one stderr line ``rmae <command>: error: …``
matching ``pattern``) or ``"ok"`` (exit 0, stdout matching ``pattern`` and stderr matching
``stderr`` — the word a skipped input leaves). ``check`` runs afterwards and names anything
lost or changed. ``tests/hostile_driver.py`` runs them; ``tests/test_hostile_engine.py``
asserts. ``python tests/hostile_driver.py --table`` prints the corpus as a table: input → outcome,
time, peak memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pycocotools.mask  # noqa: F401 - imported once in the driver's parent
import skimage.segmentation  # noqa: F401
import torch
import torch._dynamo  # noqa: F401 - what the first optimizer imports (~2 s)
from PIL import Image
from safetensors.torch import save_file

import rmae
import rmae.cli  # noqa: F401
import rmae.train.trainer  # noqa: F401
from conftest import IMG, TINY_TRAIN, make_run, tiny_model

# The scenes' texture bank (~1.5 s per size) is built once in the driver's parent, like the
# imports; every forked case inherits it (as forked DataLoader workers do).
from rmae.data.photos import texture_bank  # noqa: E402

for _size in (IMG, 64):
    texture_bank(_size)

Build = Callable[[Path, dict], "list[str] | None"]
Check = Callable[[Path, dict], "str | None"]


@dataclass
class Case:
    name: str
    build: Build
    expect: str  # "error" | "ok"
    pattern: str  # regex on the error line's message, or on stdout for "ok"
    stderr: str | None = None  # "ok": regex stderr must match (the skip or warning word)
    check: Check | None = None
    timeout: float = 60.0
    summary: str = ""  # the input, in words, for the corpus table
    command: str = ""  # as the error line names it: "pretrain", "regions precompute", …


CASES: list[Case] = []


def case(name: str, command: str, expect: str, pattern: str, summary: str, *, stderr: str | None = None,
         check: Check | None = None, timeout: float = 60.0) -> Callable[[Build], Build]:
    """Register the decorated builder as a case."""

    def register(build: Build) -> Build:
        CASES.append(Case(name, build, expect, pattern, stderr, check, timeout, summary, command))
        return build

    return register


# ---------------------------------------------------------------------------------------------
# shared inputs (made once by SETUP; cases copy them)


class Shared:
    def __init__(self, root: Path):
        self.root = root

    def paths(self) -> dict[str, Path]:
        r = self.root
        return {"trained": r / "trained", "imported": r / "imported", "weights": r / "tiny.safetensors",
                "huge_png": r / "huge" / "huge.png", "huge_jpg": r / "huge" / "huge.jpg", "small_png": r / "small.png"}


def _setup(folder: Path, _: dict) -> None:
    from rmae.train import load_config, pretrain

    paths = Shared(folder).paths()
    cfg = load_config("demo", ["model=mae_vit_tiny_patch8", *TINY_TRAIN, "steps=2", "checkpoint_every=1",
                               "figure_every=0", "region_cache=none"])
    pretrain(cfg, paths["trained"], progress=False)
    model = tiny_model()
    make_run(paths["imported"], model)
    rmae.save_model(model, paths["weights"])
    # 9000×9000 (81 Mpx, under PIL's 89 Mpx guard): eight vertical bands, ~250 KB on disk
    paths["huge_png"].parent.mkdir()
    row = np.repeat(np.arange(8, dtype=np.uint8) * 30, 9000 // 8 + 1)[:9000]
    band = np.stack([row, 255 - row, row // 2], axis=-1)
    huge = Image.fromarray(np.broadcast_to(band, (9000, 9000, 3)).copy())
    huge.save(paths["huge_png"], compress_level=1)
    huge.save(paths["huge_jpg"], quality=50)
    _png(paths["small_png"], 48, 64, seed=1)
    return None


SETUP = Case("<setup>", _setup, "ok", "", timeout=300)
BASELINE = Case("<baseline>", lambda folder, shared: ["models"], "ok", "")


# ---------------------------------------------------------------------------------------------
# helpers


def _png(path: Path, h: int, w: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w×h pixels and holds none (a bomb's header costs nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


#: What the driver itself writes into a case's folder
DRIVER_FILES = {"stdout.txt", "stderr.txt", "check.txt", "driver.txt", "digest"}


def tree_digest(root: Path) -> str:
    """Names, kinds, link targets and bytes of everything under ``root`` (any change shows)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            if dirpath == str(root) and name in DRIVER_FILES:
                continue
            p = Path(dirpath, name)
            h.update(str(p.relative_to(root)).encode())
            if p.is_symlink():
                h.update(b"->" + os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _user_folder(folder: Path) -> Path:
    """A folder of a user's own files, some with names rmae also uses."""
    user = folder / "mine"
    (user / "checkpoints").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes\n")
    (user / "config.yaml").write_text("my: own config\n")
    (user / "checkpoints" / "draft.tmp").write_text("keep me\n")
    (folder / "digest").write_text(tree_digest(user))
    return user


def _unchanged(folder: Path, shared: dict) -> str | None:
    return None if tree_digest(folder / "mine") == (folder / "digest").read_text() else "the user's folder changed"


def _copy(shared: dict, key: str, folder: Path, name: str = "run") -> Path:
    dst = folder / name
    shutil.copytree(shared[key], dst) if shared[key].is_dir() else shutil.copy2(shared[key], dst)
    return dst


def _pretrain(*overrides: str) -> list[str]:
    return ["pretrain", "--config", "demo", "--out", "run", *TINY_TRAIN, "steps=1", "figure_every=0",
            "--no-progress", *overrides]


# ---------------------------------------------------------------------------------------------
# pretrain: settings


def _setting_case(name: str, override: str, pattern: str) -> None:
    case(f"pretrain-{name}", "pretrain", "error", pattern, f"pretrain {override}",
         check=lambda folder, shared: "a run folder was created" if (folder / "run").exists() else None)(
        lambda folder, shared, o=override: _pretrain(*o.split()))


for _name, _override, _pattern in [
    ("img-size-7", "img_size=7", r"img_size=7 is not divisible by patch_size=8"),
    ("img-size-huge", "img_size=99999", r"img_size=99999 is out of range; it must be <= 4096"),
    ("img-size-text", "img_size=abc", r"img_size='abc' is not a valid int \| tuple\[int, int\]"),
    ("img-size-pair-7", "img_size=[32,7]", r"img_size \(32, 7\)|img_size=\(32, 7\) is not divisible"),
    ("too-many-patches", "img_size=4096", r"makes 262144 patches, more than 65536"),
    ("patch-size-0", "patch_size=0", r"patch_size=0 is out of range; it must be >= 1"),
    ("decoder-heads-0", "decoder_heads=0", r"decoder_heads=0 is out of range; it must be >= 1"),
    ("num-heads-0", "num_heads=0", r"num_heads=0 is out of range; it must be >= 1"),
    ("depth-0", "depth=0", r"depth=0 is out of range; it must be >= 1"),
    ("depth-huge", "depth=100000", r"depth=100000 is out of range; it must be <= 128"),
    ("embed-dim-negative", "embed_dim=-4", r"embed_dim=-4 is out of range; it must be >= 4"),
    ("embed-dim-odd", "embed_dim=198", r"embed_dim=198 is not divisible by 4"),
    ("too-many-parameters", "embed_dim=16384 num_heads=16", r"would have [\d,]+ parameters, more than 2,000,000,000"),
    ("num-regions-0", "num_regions=0", r"num_regions=0 is out of range; it must be >= 1"),
    ("num-regions-huge", "num_regions=100000", r"num_regions=100000 is out of range; it must be <= 256"),
    ("mlp-ratio-0", "mlp_ratio=0", r"mlp_ratio=0.0 is out of range; it must be > 0"),
    ("mask-ratio-1", "mask_ratio=1.0", r"mask_ratio=1.0 is out of range; it must be < 1"),
    ("mask-ratio-0", "mask_ratio=0", r"mask_ratio=0.0 leaves nothing to predict"),
    ("mask-ratio-nan", "mask_ratio=.nan", r"mask_ratio=nan is not a finite number"),
    ("region-mask-ratio", "region_mask_ratio=1.5", r"region_mask_ratio=1.5 is out of range; it must be < 1"),
    ("bg-loss-weight", "bg_loss_weight=-1", r"bg_loss_weight=-1.0 is out of range; it must be >= 0"),
    ("drop-path-rate", "drop_path_rate=1.5", r"drop_path_rate=1.5 is out of range; it must be < 1"),
    ("num-workers", "num_workers=-1", r"num_workers=-1 is out of range; it must be >= 0"),
    ("steps-negative", "steps=-1", r"steps=-1 is out of range; it must be >= 1"),
    ("steps-inf", "steps=1.0e+400", r"steps=inf is not a valid int"),
    ("weight-decay", "weight_decay=-1", r"weight_decay=-1.0 is out of range; it must be >= 0"),
    ("batch-size-0", "batch_size=0", r"batch_size=0 is out of range; it must be >= 1"),
    ("device", "device=tpu", r"device=tpu: not a device"),
    ("precision", "precision=fp8", r"precision='fp8' is not one of fp32, bf16, fp16"),
    ("unknown-key", "batchsize=3", r"unknown key\(s\) batchsize \(did you mean batch_size\?\)"),
    ("long-value", "data=" + "x" * 5000, r"data=…: the value is 5000 characters"),
    ("data-spec", "data=nonsense:1", r"bad data spec 'nonsense:1'"),
    ("data-folder-missing", "data=folder:nowhere", r"folder:nowhere: directory '.*nowhere' does not exist"),
    ("scenes-length-huge", "data=scenes:train:99999999999", r"the length must be between 1 and 10000000"),
    ("region-source", "region_source=bogus", r"unknown region source 'bogus'"),
    ("fh-scale-inf", "region_source=fh:1e400", r"FH scales must be positive numbers of at most 1e\+07"),
    ("slic-huge", "region_source=slic:1e9", r"SLIC segment counts must be positive whole numbers of at most 10000"),
]:
    _setting_case(_name, _override, _pattern)


# ---------------------------------------------------------------------------------------------
# pretrain: --config files


def _config_case(name: str, summary: str, pattern: str, write: Callable[[Path], None]) -> None:
    def build(folder: Path, shared: dict, write=write) -> list[str]:
        write(folder / "cfg.yaml")
        return ["pretrain", "--config", str(folder / "cfg.yaml"), "--out", "run", "--no-progress"]

    case(f"config-{name}", "pretrain", "error", pattern, summary)(build)


_BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
for _name, _summary, _pattern, _write in [
    ("alias-bomb", "405-byte YAML alias bomb", r"cfg\.yaml: not valid YAML \(YAML anchors \(&a\) are not accepted",
     lambda p: p.write_text(_BOMB)),
    ("fifo", "--config is a FIFO", r"cfg\.yaml: cannot be read as a config \(is not a regular file",
     lambda p: os.mkfifo(p)),
    ("folder", "--config is a folder", r"cfg\.yaml: cannot be read as a config \(.*is a folder", lambda p: p.mkdir()),
    ("too-large", "--config of 2 MiB", r"cfg\.yaml: cannot be read as a config \(.*more than the 1048576-byte limit",
     lambda p: p.write_text("# " + "x" * (2 << 20))),
    ("not-utf8", "--config in Latin-1", r"cfg\.yaml: not UTF-8 text", lambda p: p.write_bytes(b"model: caf\xe9\n")),
    ("a-list", "--config holding a list", r"cfg\.yaml: expected a mapping of keys to values, got list",
     lambda p: p.write_text("- steps\n- 3\n")),
    ("number-keys", "--config with number keys", r"cfg\.yaml: keys must be names", lambda p: p.write_text("1: 2\n")),
    ("deep-nesting", "--config nested 100 000 deep", r"cfg\.yaml: (not valid YAML|cannot be read)",
     lambda p: p.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")),
]:
    _config_case(_name, _summary, _pattern, _write)


# ---------------------------------------------------------------------------------------------
# pretrain: run folders (--out, --resume, concurrency is in test_hostile_engine.py)


@case("out-user-folder", "pretrain", "error", r"mine: is a folder with files that is not an rmae run; refusing",
      "pretrain --out a folder of the user's files (its own config.yaml, checkpoints/*.tmp)", check=_unchanged)
def _(folder, shared):
    _user_folder(folder)
    return [*_pretrain()[:4], "mine", *_pretrain()[5:]]


@case("out-is-a-file", "pretrain", "error", r"afile: exists and is not a folder", "pretrain --out an existing file")
def _(folder, shared):
    (folder / "afile").write_text("data\n")
    return [*_pretrain()[:4], "afile", *_pretrain()[5:]]


def _resume_case(name: str, summary: str, pattern: str, damage: Callable[[Path], None],
                 expect: str = "error", check: Check | None = None, extra: tuple[str, ...] = ()) -> None:
    def build(folder: Path, shared: dict, damage=damage) -> list[str]:
        damage(_copy(shared, "trained", folder))
        return ["pretrain", "--resume", "run", "--no-progress", *extra]

    case(f"resume-{name}", "pretrain", expect, pattern, summary, check=check)(build)


def _latest(run: Path) -> Path:
    return run / "checkpoints" / "latest.json"


def _weights(run: Path) -> Path:
    return run / "checkpoints" / json.loads(_latest(run).read_text())["weights"]


def _state(run: Path) -> Path:
    return run / "checkpoints" / json.loads(_latest(run).read_text())["state"]


def _foreign_state(run: Path) -> None:
    """A trainer state from a model with other parameter shapes (copied from another run)."""
    state = torch.load(_state(run), weights_only=True)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    other.step()
    state["optimizer"] = other.state_dict()
    torch.save(state, _state(run))


def _pickle_payload(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    torch.save({"optimizer": {}, "step": 1, "rng": Payload()}, path)


for _name, _summary, _pattern, _damage in [
    ("latest-garbage", "latest.json of random bytes", r"latest\.json: unreadable \(not (UTF-8|JSON)\)",
     lambda r: _latest(r).write_bytes(os.urandom(300))),
    ("latest-not-utf8", "latest.json not UTF-8", r"latest\.json: unreadable \(not UTF-8\)",
     lambda r: _latest(r).write_bytes(b'{"step": 2, "weights": "\xff\xfe"}')),
    ("latest-list", "latest.json a JSON list", r"latest\.json: not a checkpoint pointer", lambda r: _latest(r).write_text("[1, 2]")),
    ("latest-escapes", 'latest.json weights "../../outside.safetensors"',
     r"latest\.json: weights='\.\./\.\./outside\.safetensors' is not a file name inside checkpoints/ \(refused\)",
     lambda r: _latest(r).write_text('{"step": 2, "weights": "../../outside.safetensors", "state": "x.state.pt"}')),
    ("latest-fifo", "latest.json is a FIFO", r"latest\.json: unreadable \(is not a regular file",
     lambda r: (_latest(r).unlink(), os.mkfifo(_latest(r)))),
    ("weights-truncated", "weights cut to half their size", r"step_000002\.safetensors: .*truncated",
     lambda r: _weights(r).write_bytes(_weights(r).read_bytes()[: _weights(r).stat().st_size // 2])),
    ("weights-garbage", "weights replaced by random bytes", r"step_000002\.safetensors: not a checkpoint",
     lambda r: _weights(r).write_bytes(os.urandom(4096))),
    ("weights-symlink", "weights a symlink to a file outside the run",
     r"step_000002\.safetensors: missing or not a regular file \(latest\.json points at it\)",
     lambda r: (_weights(r).unlink(), _weights(r).symlink_to(Path(r).parent / "outside.safetensors"),
                (Path(r).parent / "outside.safetensors").write_bytes(b"x"))),
    ("weights-fifo", "weights a FIFO", r"step_000002\.safetensors: missing or not a regular file",
     lambda r: (_weights(r).unlink(), os.mkfifo(_weights(r)))),
    ("model-switched", "config.yaml switched to another model (rmae weights stay mae)",
     r"step_000002\.safetensors: does not fit the model of this run's config",
     lambda r: (r / "config.yaml").write_text((r / "config.yaml").read_text().replace(
         "model: mae_vit_tiny_patch8", "model: rmae_vit_tiny_patch8").replace("family: mae", "family: rmae"))),
    ("config-garbage", "config.yaml of random bytes", r"config\.yaml: (not UTF-8 text|not valid YAML)",
     lambda r: (r / "config.yaml").write_bytes(os.urandom(200))),
    ("config-bad-value", "config.yaml with img_size: 7", r"config\.yaml: invalid model config: img_size=7 is not divisible",
     lambda r: (r / "config.yaml").write_text((r / "config.yaml").read_text().replace("img_size: 32", "img_size: 7", 1))),
    ("state-garbage", "trainer state of random bytes", r"step_000002\.state\.pt: cannot be read",
     lambda r: _state(r).write_bytes(os.urandom(1000))),
    ("state-pickle", "trainer state holding a pickle payload (os.system)",
     r"step_000002\.state\.pt: refused — it holds pickled objects other than tensors",
     lambda r: _pickle_payload(_state(r))),
    ("state-foreign", "trainer state of another model's optimizer", r"the trainer state of step 2 does not fit this run",
     _foreign_state),
    ("state-junk-fields", "trainer state with step 'x' and rng []", r"step_000002\.state\.pt: not a trainer state",
     lambda r: torch.save({"optimizer": {}, "step": "x", "rng": []}, _state(r))),
]:
    _resume_case(_name, _summary, _pattern, _damage,
                 check=(lambda folder, shared: "the payload ran" if (folder / "run" / "checkpoints" / "PWNED").exists()
                        else None))


def _user_checkpoint_files(run: Path) -> None:
    for name in ("notes.txt", "mine.safetensors", "step_1.safetensors.bak", "draft.tmp"):
        (run / "checkpoints" / name).write_text("user file\n")


def _user_files_kept(folder: Path, shared: dict) -> str | None:
    ck = folder / "run" / "checkpoints"
    lost = [n for n in ("notes.txt", "mine.safetensors", "step_1.safetensors.bak", "draft.tmp") if not (ck / n).is_file()]
    steps = sorted(p.name for p in ck.glob("step_*.safetensors"))
    if lost:
        return f"user files deleted: {lost}"
    return None if steps == ["step_000003.safetensors", "step_000004.safetensors"] else f"checkpoints kept: {steps}"


_resume_case("keeps-user-files", "resume a run whose checkpoints/ holds user files (pruning, temp cleaning)",
             r"run folder: run +\(step 4", _user_checkpoint_files, expect="ok", check=_user_files_kept,
             extra=("steps=4", "checkpoint_every=1"))


def _victim_intact(folder: Path, shared: dict) -> str | None:
    return None if (folder / "victim.txt").read_text() == "precious\n" else "a file outside the run was written through"


def _plant_link(name: str) -> Callable[[Path], None]:
    """The run's own file ``name`` replaced by a link to a user's file beside the run."""
    def plant(run: Path) -> None:
        (run.parent / "victim.txt").write_text("precious\n")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(run.parent / "victim.txt")
    return plant


_resume_case("lock-symlink", "the run's .rmae-lock a symlink to a user's file",
             r"run/\.rmae-lock: is a symbolic link; rmae writes only its own plain files", _plant_link(".rmae-lock"),
             check=_victim_intact)
_resume_case("metrics-symlink", "the run's metrics.jsonl a symlink to a user's file",
             r"run/metrics\.jsonl: is a symbolic link", _plant_link("metrics.jsonl"), check=_victim_intact)


@case("out-through-a-file", "pretrain", "error", r"^/dev/null/run: Not a directory$", "pretrain --out /dev/null/run")
def _(folder, shared):
    return [*_pretrain()[:4], "/dev/null/run", *_pretrain()[5:]]


@case("resume-nothing", "pretrain", "error", r"nowhere: no such run folder", "pretrain --resume a missing folder")
def _(folder, shared):
    return ["pretrain", "--resume", "nowhere", "--no-progress"]


# ---------------------------------------------------------------------------------------------
# import


def _import_case(name: str, summary: str, pattern: str, write: Callable[[Path], None],
                 extra: tuple[str, ...] = (), check: Check | None = None, file: str = "ck.pth") -> None:
    def build(folder: Path, shared: dict, write=write) -> list[str]:
        write(folder / file)
        return ["import", str(folder / file), "--out", "imp", *extra]

    def no_run(folder: Path, shared: dict) -> str | None:
        problem = check(folder, shared) if check else None
        return problem or ("a run folder was left behind" if (folder / "imp").exists() else None)

    case(f"import-{name}", "import", "error", pattern, summary, check=no_run)(build)


def _timm_like(**changes) -> dict:
    sd = {k: v for k, v in tiny_model("mae_vit_tiny_patch8").state_dict().items()
          if k.startswith(("cls_token", "pos_embed", "patch_embed", "blocks", "norm"))}
    sd.update(changes)
    return {k: v for k, v in sd.items() if v is not None}


def _safetensors_meta(path: Path, meta: str) -> None:
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, path,
              metadata={"format": "rmae", "rmae_config": meta})


def _deep(n: int) -> dict:
    d: dict = {"leaf": 1}
    for _ in range(n):
        d = {"x": d}
    return d


for _name, _summary, _pattern, _write in [
    ("non-tensors", "a dict of non-tensors", r"no state dict found \(top level holds \['a', 'b'\]\)",
     lambda p: torch.save({"a": 1, "b": "two"}, p)),
    ("empty-dict", "an empty dict", r"no state dict found \(top level holds \[\]\)", lambda p: torch.save({}, p)),
    ("number-keys", "a dict of tensors under number keys", r"no state dict found",
     lambda p: torch.save({1: torch.zeros(2)}, p)),
    ("wrong-rank", "tensors of the wrong rank under the right keys",
     r"patch_embed\.proj\.weight has shape \[192\], not a 4-d tensor",
     lambda p: torch.save(_timm_like(**{"patch_embed.proj.weight": torch.zeros(192)}), p)),
    ("zero-width", "patch_embed of width 0", r"patch_embed\.proj\.weight has shape \[0, 3, 8, 8\]",
     lambda p: torch.save(_timm_like(**{"patch_embed.proj.weight": torch.zeros(0, 3, 8, 8)}), p)),
    ("no-pos-embed", "a ViT without pos_embed", r"missing pos_embed", lambda p: torch.save(_timm_like(pos_embed=None), p)),
    ("depth-huge", "a state dict with a block numbered 100000",
     r"the model it describes cannot be built \(invalid model config: depth=100001 is out of range",
     lambda p: torch.save(_timm_like(**{"blocks.100000.attn.qkv.bias": torch.zeros(3)}), p)),
    ("pickle", "a pickle payload (os.system)", r"refused — the file contains pickled objects",
     lambda p: _pickle_payload(p)),
    ("meta-not-json", "rmae_config metadata that is not JSON", r"its rmae_config metadata is not a JSON object",
     lambda p: _safetensors_meta(p, "{not json")),
    ("meta-a-list", "rmae_config metadata a JSON list", r"its rmae_config metadata is not a JSON object",
     lambda p: _safetensors_meta(p, "[1, 2]")),
    ("meta-bad-value", "rmae_config metadata with depth 10^6",
     r"its saved config does not build a model \(invalid model config: .*depth=1000000 is out of range",
     lambda p: _safetensors_meta(p, json.dumps({**tiny_model().config.to_dict(), "depth": 10**6}))),
    ("meta-unknown-key", "rmae_config metadata with an unknown key", r"unknown model config keys \['bogus'\]",
     lambda p: _safetensors_meta(p, json.dumps({**tiny_model().config.to_dict(), "bogus": 1}))),
    ("safetensors-truncated", "safetensors cut short", r"truncated",
     lambda p: (_safetensors_meta(p, "{}"), p.write_bytes(p.read_bytes()[:300]))),
    ("safetensors-bad-header", "safetensors with a garbage header",
     r"cannot be read as safetensors", lambda p: p.write_bytes(struct.pack("<Q", 20) + b"{" + b"\x00" * 19 + b"pad")),
    ("zip-not-torch", "a zip file that is not a torch checkpoint", r"cannot be read as a torch checkpoint",
     lambda p: zipfile.ZipFile(p, "w").writestr("x.txt", "hello")),
    ("empty-file", "an empty file", r"not a checkpoint \(neither safetensors nor a torch\.save file\)", lambda p: p.write_bytes(b"")),
    ("fifo", "a FIFO", r"ck\.pth: not a regular file", lambda p: os.mkfifo(p)),
]:
    _import_case(_name, _summary, _pattern, _write,
                 check=lambda folder, shared: "the payload ran" if (folder / "PWNED").exists() else None)

_import_case("bad-override", "import with img_size=7", r"img_size=7 is not divisible by patch_size=8",
             lambda p: torch.save(_timm_like(), p), extra=("img_size=7",))


@case("import-device-node", "import", "error", r"/dev/zero: not a regular file", "import /dev/zero")
def _(folder, shared):
    return ["import", "/dev/zero", "--out", "imp"]


@case("import-out-user-folder", "import", "error", r"mine: is a folder with files that is not an rmae run",
      "import --out a folder of the user's files", check=_unchanged)
def _(folder, shared):
    _user_folder(folder)
    return ["import", str(shared["weights"]), "--out", "mine"]


# ---------------------------------------------------------------------------------------------
# finetune


_FINETUNE = ["--task", "classify", "--no-progress", "data=scenes:train:32", "batch_size=16", "steps=1", "num_workers=0"]


@case("finetune-missing-run", "finetune", "error", r"^nowhere: no such file or folder$", "finetune a missing run")
def _(folder, shared):
    return ["finetune", "nowhere", *_FINETUNE]


@case("finetune-out-user-folder", "finetune", "error", r"mine: is a folder with files that is not an rmae run",
      "finetune --out a folder of the user's files", check=_unchanged)
def _(folder, shared):
    _user_folder(folder)
    return ["finetune", str(_copy(shared, "imported", folder)), "--out", "mine", *_FINETUNE]


@case("finetune-layer-decay-0", "finetune", "error", r"finetune settings: layer_decay=0\.0 is out of range; it must be > 0",
      "finetune layer_decay=0")
def _(folder, shared):
    return ["finetune", str(_copy(shared, "imported", folder)), *_FINETUNE, "layer_decay=0"]


# ---------------------------------------------------------------------------------------------
# export


def _export_case(name: str, summary: str, pattern: str, build_out: Callable[[Path, dict], tuple[str, str]],
                 check: Check | None = None) -> None:
    def build(folder: Path, shared: dict, build_out=build_out) -> list[str]:
        src, out = build_out(folder, shared)
        (folder / "digest").write_text(tree_digest(folder))
        return ["export", src, "--format", "timm", "--out", out]

    def unchanged(folder: Path, shared: dict) -> str | None:
        problem = None if tree_digest(folder) == (folder / "digest").read_text() else "files changed"
        return (check(folder, shared) if check else None) or problem

    case(f"export-{name}", "export", "error", pattern, summary, check=unchanged)(build)


def _out_folder(folder: Path, shared: dict) -> tuple[str, str]:
    (folder / "out").mkdir()
    return str(_copy(shared, "imported", folder)), "out"


def _out_symlink(folder: Path, shared: dict) -> tuple[str, str]:
    (folder / "target.txt").write_text("precious\n")
    (folder / "link.safetensors").symlink_to(folder / "target.txt")
    return str(_copy(shared, "imported", folder)), "link.safetensors"


def _out_fifo(folder: Path, shared: dict) -> tuple[str, str]:
    os.mkfifo(folder / "pipe.safetensors")
    return str(_copy(shared, "imported", folder)), "pipe.safetensors"


def _out_input(folder: Path, shared: dict) -> tuple[str, str]:
    src = str(_copy(shared, "weights", folder, "w.safetensors"))
    return src, src


def _out_hard_link(folder: Path, shared: dict) -> tuple[str, str]:
    src = _copy(shared, "weights", folder, "w.safetensors")
    os.link(src, folder / "same.safetensors")
    return str(src), "same.safetensors"


def _out_in_run(name: str) -> Callable[[Path, dict], tuple[str, str]]:
    return lambda folder, shared: (str(_copy(shared, "imported", folder)), f"run/{name}")


for _name, _summary, _pattern, _out in [
    ("onto-folder", "export --out an existing folder", r"out: is a folder; give a file name inside it", _out_folder),
    ("onto-symlink", "export --out a symlink", r"link\.safetensors: is a symbolic link", _out_symlink),
    ("onto-dev-null", "export --out /dev/null", r"/dev/null: is not a regular file",
     lambda folder, shared: (str(_copy(shared, "imported", folder)), "/dev/null")),
    ("onto-fifo", "export --out a FIFO", r"pipe\.safetensors: is not a regular file", _out_fifo),
    ("onto-input", "export w.safetensors --out w.safetensors", r"w\.safetensors: is the input's weights file", _out_input),
    ("onto-hard-link", "export --out a hard link to the input", r"same\.safetensors: is the input's weights file",
     _out_hard_link),
    ("onto-run-weights", "export RUN --out RUN/model.safetensors", r"model\.safetensors: is the input's weights file",
     _out_in_run("model.safetensors")),
    ("into-run", "export RUN --out RUN/config.yaml", r"config\.yaml: is inside the run folder", _out_in_run("config.yaml")),
    ("missing-run", "export a missing run", r"nowhere: no such file or folder",
     lambda folder, shared: ("nowhere", "out.safetensors")),
]:
    _export_case(_name, _summary, _pattern, _out,
                 check=(lambda folder, shared: None if (folder / "target.txt").read_text() == "precious\n"
                        else "the link's target changed") if _name == "onto-symlink" else None)


# ---------------------------------------------------------------------------------------------
# regions precompute: specs, caches


def _precompute(data: str, source: str = "fh", *extra: str) -> list[str]:
    return ["regions", "precompute", "--data", data, "--source", source, "--cache", "cache", "--no-progress", *extra]


for _name, _argv, _pattern in [
    ("bad-spec", _precompute("nonsense"), r"bad data spec 'nonsense'"),
    ("bad-source", _precompute("scenes:train:4", "bogus"), r"unknown region source 'bogus'"),
    ("no-source", _precompute("scenes:train:4", "none"), r"needs a region source, e\.g\. --source fh"),
    ("fh-nan", _precompute("scenes:train:4", "fh:nan"), r"FH scales must be positive numbers"),
    ("too-many-scales", _precompute("scenes:train:4", "fh:" + ",".join(["9"] * 20)), r"give 1 to 8 FH scales"),
    ("limit-negative", _precompute("scenes:train:4", "fh", "--limit", "-1"), r"--limit -1: must be at least 1"),
    ("image-size-0", _precompute("scenes:train:4", "fh", "--image-size", "0"), r"--image-size 0: must be between 8 and 4096"),
    ("folder-missing", _precompute("folder:nowhere"), r"folder:nowhere: directory '.*nowhere' does not exist"),
    ("unwritable-cache", ["regions", "precompute", "--data", "scenes:train:4", "--cache", "/dev/null/cache",
                          "--no-progress"],
     r"cache folder /dev/null/cache is not writable \(.*\); pass --cache DIR or region_cache=DIR"),
]:
    case(f"precompute-{_name}", "regions precompute", "error", _pattern,
         "regions precompute " + " ".join(_argv[2:]))(lambda folder, shared, a=_argv: a)


def _damaged_cache(folder: Path, shared: dict) -> list[str]:
    """A filled cache, then three of its four entries damaged: truncated, another shape, and a
    header claiming [3, 50000, 50000] (what a zip bomb would say) with no data behind it."""
    from rmae.data import precompute_regions

    precompute_regions("scenes:train:4", "fh", folder / "cache", progress=False)
    entries = sorted((folder / "cache" / "fh").rglob("*.npz"))
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    with open(entries[1], "wb") as f:
        np.savez_compressed(f, labels=np.zeros((3, 8, 8), np.uint16))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<u2", "fortran_order": False, "shape": (3, 50000, 50000)})
    with zipfile.ZipFile(entries[2], "w") as z:
        z.writestr("labels.npy", b"\x93NUMPY\x01\x00" + header.getvalue())
    return _precompute("scenes:train:4")


case("precompute-damaged-cache", "regions precompute", "ok", r"4 images .*: 3 computed, 1 already cached",
     "regions precompute over a cache with a truncated entry, one of another shape and a bomb header")(_damaged_cache)


@case("precompute-self-symlink", "regions precompute", "ok", r"^3 images .*3 computed",
      "folder:F where F/loop → F and F/a/up → F (symlink loops)", timeout=30)
def _(folder, shared):
    f = folder / "imgs"
    for i, sub in enumerate(["", "a", "b"]):
        _png(f / sub / f"{i}.png", 24, 24, seed=i)
    (f / "loop").symlink_to(f)
    (f / "a" / "up").symlink_to("..")
    (f / "b" / "twin").symlink_to(f / "a")
    return _precompute(f"folder:{f}", "slic")


@case("precompute-fifo-image", "regions precompute", "ok", r"^2 images .*1 computed, 0 already cached, 1 skipped",
      "folder:F holding a FIFO named b.png", stderr=r"skipping .*b\.png: cannot decode image \(is not a regular file",
      timeout=30)
def _(folder, shared):
    _png(folder / "imgs" / "a.png", 24, 24)
    os.mkfifo(folder / "imgs" / "b.png")
    return _precompute(f"folder:{folder / 'imgs'}", "slic")


@case("precompute-fifo-labelmap", "regions precompute", "ok", r"^2 images .*1 computed.*1 skipped",
      "labelmaps:DIR holding a FIFO for one image", stderr=r"skipping .*b\.png: cannot decode image \(is not a regular file",
      timeout=30)
def _(folder, shared):
    for i, name in enumerate("ab"):
        _png(folder / "imgs" / f"{name}.png", 24, 24, seed=i)
    (folder / "imgs_labelmaps").mkdir()
    Image.fromarray(np.ones((24, 24), np.uint8)).save(folder / "imgs_labelmaps" / "a.png")
    os.mkfifo(folder / "imgs_labelmaps" / "b.png")
    return _precompute(f"folder:{folder / 'imgs'}", "labelmaps")


@case("precompute-bomb-header", "regions precompute", "ok", r"^2 images .*1 computed.*1 skipped",
      "a PNG whose header claims 20000×20000 pixels",
      stderr=r"skipping .*bomb\.png: decompression bomb: Image size \(400000000 pixels\) exceeds limit",
      timeout=30)
def _(folder, shared):
    _png(folder / "imgs" / "a.png", 24, 24)
    _png_header_only(folder / "imgs" / "bomb.png", 20000, 20000)
    return _precompute(f"folder:{folder / 'imgs'}", "slic")


@case("precompute-huge-jpeg", "regions precompute", "ok", r"^1 images .*1 computed",
      "a 9000×9000 JPEG segmented with SLIC", timeout=120)
def _(folder, shared):
    (folder / "imgs").mkdir()
    os.symlink(shared["huge_jpg"], folder / "imgs" / "huge.jpg")
    return _precompute(f"folder:{folder / 'imgs'}", "slic:16")


@case("pretrain-huge-png", "pretrain", "ok", r"run folder: run +\(step 1",
      "pretrain R-MAE (FH regions) on a folder with a 9000×9000 PNG (~1 MB)", timeout=180)
def _(folder, shared):
    (folder / "imgs").mkdir()
    os.symlink(shared["huge_png"], folder / "imgs" / "huge.png")
    os.symlink(shared["small_png"], folder / "imgs" / "small.png")
    # one FH scale: each scale is a separate pass of the same size, so one shows the bound
    return _pretrain(f"data=folder:{folder / 'imgs'}", "batch_size=2", "region_source=fh:1000")


@case("pretrain-unwritable-cache", "pretrain", "ok", r"run folder: run +\(step 1",
      "pretrain with region_cache=/dev/null/cache",
      stderr=r"rmae\.data: cache folder /dev/null/cache is not writable .*; region maps are computed but not cached")
def _(folder, shared):
    return _pretrain("region_cache=/dev/null/cache")


@case("pretrain-no-readable-image", "pretrain", "error", r"ImageFolderDataset: none of its 2 files could be read",
      "pretrain on a folder whose images are all broken (num_workers=2)",
      stderr=r"^rmae\.data: skipping .*/imgs/(a\.png|b\.jpg): not an image file")
def _(folder, shared):
    (folder / "imgs").mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / "imgs" / name).write_bytes(b"not an image")
    return _pretrain(f"data=folder:{folder / 'imgs'}", "batch_size=1", "num_workers=2", "model=mae_vit_tiny_patch8")


# ---------------------------------------------------------------------------------------------
# COCO


def _coco(folder: Path, bad_ann: dict | None = None, bad_image: dict | None = None, doc=None) -> Path:
    """Two 40×60 images, one good polygon annotation each, plus the hostile entry."""
    for seed, name in enumerate(("a.png", "b.png")):
        _png(folder / "imgs" / name, 40, 60, seed=seed)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[5, 5, 30, 5, 30, 30, 5, 30]],
             "bbox": [5, 5, 25, 25], "area": 625},
            {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 20, 1, 20, 20]],
             "bbox": [1, 1, 19, 19], "area": 180}]
    if bad_ann is not None:
        anns.append({"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1, **bad_ann})
    images = [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
              {"id": 2, "file_name": "b.png", "height": 40, "width": 60}]
    if bad_image is not None:
        images.append({"id": 9, "file_name": "a.png", "height": 40, "width": 60, **bad_image})
    path = folder / "instances.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc if doc is not None else {
        "images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _coco_spec(folder: Path) -> str:
    return f"coco:{folder / 'imgs'}:{folder / 'instances.json'}"


_RLE_SUM = "annotation id 2\\): its RLE counts add up to"
for _name, _summary, _bad, _reason in [
    ("polygon-1e12", "a polygon coordinate of 1e12", {"segmentation": [[0, 0, 1e12, 0, 10, 10]]},
     r"a polygon coordinate \(1e\+12\) lies far outside the 60x40 image"),
    ("polygon-nan", "a polygon coordinate NaN", {"segmentation": [[0, 0, float("nan"), 0, 10, 10]]},
     r"a polygon coordinate is not a finite number"),
    ("polygon-strings", "a polygon of strings", {"segmentation": [["a", "b", "c", "d", "e", "f"]]},
     r"a polygon holds something other than numbers"),
    ("polygon-odd", "a polygon with an odd number of values", {"segmentation": [[1, 2, 3, 4, 5, 6, 7]]},
     r"a polygon is not a flat list of x, y pairs"),
    ("polygon-long-outline", "a polygon zig-zagging 30 000 times across the image",
     {"segmentation": [[v for i in range(30_000) for v in (0 if i % 2 else 59, i % 40)]]},
     r"its polygons' outline is \d+ pixels long, more than 1048576"),
    ("rle-float-count", "an RLE with a fractional count", {"segmentation": {"size": [40, 60], "counts": [5, 2394.5]}},
     r"its RLE counts hold something other than whole numbers"),
    ("rle-negative", "an RLE with negative counts", {"segmentation": {"size": [40, 60], "counts": [2500, -100]}},
     r"its RLE counts include a negative run length"),
    ("rle-too-long", "an RLE longer than the image", {"segmentation": {"size": [40, 60], "counts": [2400, 10**9]}},
     r"its RLE counts add up to 1000002400, not to the image's 60x40 = 2400 pixels"),
    ("rle-string-cut", "a compressed RLE string cut mid-number", {"segmentation": {"size": [40, 60], "counts": "0k"}},
     r"its RLE string ends in the middle of a number"),
    ("rle-string-chars", "a compressed RLE string with foreign characters",
     {"segmentation": {"size": [40, 60], "counts": "\u00e9\u00e9"}}, r"its RLE string holds 'é'"),
    ("rle-wrong-size", "an RLE of another size", {"segmentation": {"size": [4, 6], "counts": [24]}},
     r"its RLE size \[4, 6\] is not the image's \[height, width\] = \[40, 60\]"),
    ("segmentation-int", "segmentation an integer", {"segmentation": 7}, r"its segmentation is a int, not polygons or an RLE"),
    ("segmentation-missing", "no segmentation", {}, r"its segmentation is a NoneType"),
    ("bbox-junk", "bbox a string", {"segmentation": [[1, 1, 5, 1, 5, 5]], "bbox": "wide"},
     r"its bbox wide is not four finite numbers"),
    ("area-junk", "area a string (never read)", {"segmentation": [[1, 1, 5, 1, 5, 5]], "area": "big"}, None),
    ("category-unknown", "category_id not among the categories", {"category_id": 77, "segmentation": [[1, 1, 5, 1, 5, 5]]},
     r"category_id 77 is not among the categories"),
    ("iscrowd-junk", "iscrowd 'maybe'", {"iscrowd": "maybe", "segmentation": [[1, 1, 5, 1, 5, 5]]}, r"iscrowd maybe is not 0 or 1"),
]:
    case(f"coco-{_name}", "regions precompute", "ok", r"^2 images .*2 computed", f"COCO annotation: {_summary}",
         stderr=None if _reason is None else r"skipping .*instances\.json \(annotation id 2\): " + _reason + ".*; annotation skipped$",
         timeout=30)(lambda folder, shared, bad=_bad: (_coco(folder, bad_ann=bad), _precompute(_coco_spec(folder), "panoptic"))[1])

for _name, _summary, _bad, _reason in [
    ("image-no-size", "image entry without height/width", {"height": None}, r"height=None, width=60 are not positive whole numbers"),
    ("image-size-text", "image height 'tall'", {"height": "tall"}, r"height='tall', width=60 are not positive whole numbers"),
    ("image-size-absurd", "image 10^9 × 60", {"height": 10**9}, r"60x1000000000 is more than the 16777216 pixels"),
    ("image-no-file-name", "image without file_name", {"file_name": 5}, r"file_name 5 is not a file name"),
]:
    case(f"coco-{_name}", "regions precompute", "ok", r"^3 images .*2 computed.*1 skipped", f"COCO {_summary}",
         stderr=r"skipping .*instances\.json \(image id 9\): " + _reason, timeout=30)(
        lambda folder, shared, bad=_bad: (_coco(folder, bad_image=bad), _precompute(_coco_spec(folder), "panoptic"))[1])

case("coco-entries-without-ids", "regions precompute", "ok", r"^2 images .*2 computed",
     "COCO entries that are not records (a string, an annotation without id, an orphan annotation)",
     stderr=r"skipping .*instances\.json: left out 3 entries that are not COCO records", timeout=30)(
    lambda folder, shared: (_coco(folder, doc={
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 2, "file_name": "b.png", "height": 40, "width": 60}, "junk"],
        "annotations": [{"image_id": 1, "category_id": 1}, {"id": 5, "image_id": 99, "category_id": 1}],
        "categories": [{"id": 1, "name": "thing"}]}), _precompute(_coco_spec(folder), "panoptic"))[1])

for _name, _summary, _doc, _pattern in [
    ("not-json", "annotation file that is not JSON", "{not json", r"instances\.json: is not a COCO instances JSON \(Expecting property name"),
    ("a-list", "annotation file holding a list", "[1, 2]", r"is not a COCO instances JSON \(expected a mapping with an \"images\" list, got list\)"),
    ("images-dict", "\"images\" a mapping", '{"images": {}}', r"expected a mapping with an \"images\" list, got dict"),
    ("annotations-string", "\"annotations\" a string", '{"images": [], "annotations": "x"}', r"\"annotations\" is a str, not a list"),
    ("deep-nesting", "JSON nested 100 000 deep", '{"images": ' + "[" * 100_000 + "]" * 100_000 + "}",
     r"is not a COCO instances JSON \(maximum recursion depth"),
    ("huge-number", "a 5000-digit number", '{"images": [{"id": ' + "9" * 5000 + "}]}", r"is not a COCO instances JSON \(Exceeds the limit"),
    ("not-utf8", "annotation file in Latin-1", b'{"images": [], "x": "caf\xe9"}', r"is not a COCO instances JSON \(.*codec can't decode"),
]:
    case(f"coco-file-{_name}", "regions precompute", "error", _pattern, _summary)(
        lambda folder, shared, doc=_doc: (
            _coco(folder, doc="{}"), (folder / "instances.json").write_bytes(doc if isinstance(doc, bytes) else doc.encode()),
            _precompute(_coco_spec(folder), "panoptic"))[2])


@case("coco-file-fifo", "regions precompute", "error", r"instances\.json: is not a COCO instances JSON \(is not a regular file",
      "annotation file a FIFO", timeout=30)
def _(folder, shared):
    _coco(folder)
    (folder / "instances.json").unlink()
    os.mkfifo(folder / "instances.json")
    return _precompute(_coco_spec(folder), "panoptic")


@case("pretrain-coco-hostile", "pretrain", "ok", r"run folder: run +\(step 1",
      "pretrain R-MAE (gt regions, 2 workers) on COCO with a polygon coordinate of 1e12",
      stderr=r"skipping .*instances\.json \(annotation id 2\): a polygon coordinate \(1e\+12\) lies far outside")
def _(folder, shared):
    _coco(folder, bad_ann={"segmentation": [[0, 0, 1e12, 0, 10, 10]]})
    return _pretrain(f"data={_coco_spec(folder)}", "batch_size=2", "region_source=gt", "num_workers=2")
