"""What every page shares: the sidebar's choices (runs, image), the cached loaders, the forward lock.

``app.py`` calls :func:`sidebar` on every run, which returns a :class:`Ctx`, and then runs the
chosen page with it (:func:`run_page`); a page file's ``render(ctx)`` reads it.

Caching: models live in ``st.cache_resource`` keyed on (run path, :meth:`RunFolder.digest` — the
content identity of its weights and model config —, device); the attention of every layer for
one image lives in ``st.cache_data`` keyed on (run path, digest, device, digest of the prepared
image). Changing layer, head or query then only slices cached arrays, runs one small rollout and
encodes three PNGs per run. Models are shared by every browser session, and recording attention
is state on the model, so forward passes run one at a time (:func:`forward_lock`).

Every sidebar input has a path that does not need a mouse or a file (number inputs, selects),
because ``streamlit.testing`` cannot drive custom components or uploads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st
import torch.nn as nn

from analysis.encoder import EncoderInfo, describe, load_encoder
from analysis.results import Results
from rmae.data import PhotosDataset, build_dataset, load_image
from rmae.device import resolve_device
from rmae.errors import UserError

from . import compute as C
from . import images as I
from .jobs import JobBoard
from .discovery import Discovery, RunEntry
from .discovery import discover as discover_runs
from .runs import RunsRoot, UnsafePathError

SOURCES = ["scenes", "photos", "folder", "upload"]
SCENES_SPLIT, SCENES_LENGTH = "val", 1000

# ------------------------------------------------------------------------------------------
# cached loaders


@st.cache_resource(show_spinner=False)
def runs_root(path: str) -> RunsRoot:
    return RunsRoot(path)


@st.cache_data(ttl=10, show_spinner=False)
def discover(root_path: str) -> Discovery:
    return discover_runs(runs_root(root_path))


@st.cache_resource(max_entries=8, show_spinner="Loading model…")
def model(path: str, digest: str, device: str) -> nn.Module:
    return load_encoder(path, device)


@st.cache_resource(show_spinner=False)
def forward_lock() -> threading.Lock:
    return threading.Lock()


@st.cache_resource(show_spinner=False)
def jobs() -> JobBoard:
    """The background analyses of this dashboard process (shared by its sessions)."""
    return JobBoard()


@st.cache_data(max_entries=32, show_spinner="Computing attention…")
def attention(path: str, digest: str, device: str, image_digest: str, _prepared: I.Prepared) -> np.ndarray:
    net = model(path, digest, device)
    with forward_lock():
        return C.attention_stack(net, _prepared)


@st.cache_data(max_entries=64, show_spinner=False)
def prepare(source_digest: str, size: tuple[int, int], _image: np.ndarray, _instances: np.ndarray | None) -> I.Prepared:
    return I.prepare(_image, _instances, size)


@st.cache_resource(show_spinner=False)
def _scenes(size: int):
    ds = build_dataset(f"scenes:{SCENES_SPLIT}:{SCENES_LENGTH}", image_size=size)
    ds.prepare()
    return ds


@st.cache_data(max_entries=64, show_spinner=False)
def scene(size: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    s = _scenes(size).load(int(index))
    return s["image"], s["instances"].astype(np.int32)


@st.cache_data(max_entries=16, show_spinner=False)
def photo(index: int) -> tuple[str, np.ndarray]:
    s = PhotosDataset().load(int(index))
    return s["key"], s["image"]


@st.cache_data(max_entries=1, show_spinner=False)
def photo_names() -> list[str]:
    return list(PhotosDataset().names)


@st.cache_data(max_entries=16, show_spinner=False)
def file_image(path: str, mtime_ns: int) -> np.ndarray:
    return load_image(path, max_pixels=I.MAX_UPLOAD_PIXELS)


@st.cache_data(max_entries=4, show_spinner=False)
def upload(data_digest: str, _data: bytes, name: str) -> np.ndarray:
    return I.decode_upload(_data, name)


@st.cache_data(max_entries=32, show_spinner=False)
def fh(image_digest: str, _image: np.ndarray) -> np.ndarray:
    return C.fh_segments(_image)


@st.cache_data(max_entries=32, show_spinner=False)
def results(path: str, mtime_ns: int) -> Results:
    """A results file; ``path`` comes from :meth:`RunsRoot.file` (checked just before)."""
    return Results.load(path)


@st.cache_data(max_entries=64, show_spinner=False)
def training_log(run_name: str, root_path: str, mtime_ns: int) -> tuple[list[dict], int]:
    root = runs_root(root_path)
    return root.run_metrics(root.run_folder(run_name))


# ------------------------------------------------------------------------------------------
# selection


@dataclass
class Source:
    image: np.ndarray  # uint8 [H, W, 3]
    instances: np.ndarray | None
    label: str
    digest: str


@dataclass
class LoadedRun:
    entry: RunEntry
    model: nn.Module
    digest: str
    device: str
    info: EncoderInfo

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def path(self) -> str:
        return str(self.entry.path)

    @property
    def title(self) -> str:
        i = self.info
        h, w = i.input_size
        return f"{self.name} — {i.name} · {i.family} · {f'{h}²' if h == w else f'{h}×{w}'}/p{i.patch_size}"


class Ctx:
    """What the sidebar chose; pages read it."""

    def __init__(self, root: RunsRoot, disc: Discovery, selected: list[RunEntry], source: Source | None, device: str):
        self.root, self.disc, self.selected, self.source, self.device = root, disc, selected, source, device
        self._loaded: list[LoadedRun] | None = None

    def loaded(self) -> list[LoadedRun]:
        """Models of the selected runs; a broken one shows an error and is left out."""
        if self._loaded is None:
            self._loaded = [run for entry in self.selected if (run := load_run(self.root, entry, self.device))]
        return self._loaded

    def prepared(self, run: LoadedRun) -> I.Prepared:
        s = self.source
        return prepare(s.digest, run.info.input_size, s.image, s.instances)


def load_run(root: RunsRoot, entry: RunEntry, device: str) -> LoadedRun | None:
    if entry.problem:
        st.error(f"Run **{entry.name}** cannot be used: {entry.problem}")
        return None
    try:
        folder = root.run_folder(entry.name)  # re-resolved at use: nothing outside the root is read
        if os.path.lexists(folder.config_path):
            root.run_config(folder)
        root.weights(folder)  # the files the loader opens (latest.json, the weights), checked now
        digest = folder.digest()
        net = model(str(folder.root), digest, device)
    except UnsafePathError as e:
        st.error(f"Run **{entry.name}** refused: {e}")
        return None
    except UserError as e:  # RootFileError, RunFolderError, CheckpointError: say which file and why
        st.error(f"Run **{entry.name}** cannot be loaded: {root.relativize(str(e))}")
        return None
    except Exception as e:  # noqa: BLE001 - a foreign folder must not take the page down
        st.error(f"Run **{entry.name}** cannot be loaded ({type(e).__name__}): {e}. "
                 "Is this a run folder written by `rmae pretrain` / `rmae import`?")
        return None
    return LoadedRun(entry, net, digest, device, describe(net))


def still_there(chosen: list[str] | None, options: list[str]) -> list[str]:
    """A multiselect's choice kept across reports: the chosen options that still exist; all of
    them the first time, or when none of another report's choice exists here."""
    kept = [o for o in chosen or [] if o in options]
    return list(options) if chosen is None or (chosen and not kept) else kept


def default_runs(runs: list[RunEntry]) -> list[str]:
    """One MAE and one R-MAE (or RAE) run when there are, else the first two usable runs."""
    ok = [r for r in runs if not r.problem]
    picked: list[RunEntry] = []
    for fam in ("mae", "rmae", "rae"):
        for r in ok:
            if r.family == fam and r not in picked:
                picked.append(r)
                break
        if len(picked) == 2:
            break
    for r in ok:
        if len(picked) >= 2:
            break
        if r not in picked:
            picked.append(r)
    return [r.name for r in picked]


def image_picker(root: RunsRoot, disc: Discovery, size: int) -> Source | None:
    sb = st.sidebar
    src = sb.radio("Image source", SOURCES, key="src", horizontal=True)
    if src == "scenes":
        idx = int(sb.number_input(f"Scene (scenes:{SCENES_SPLIT}, 0–{SCENES_LENGTH - 1})", 0, SCENES_LENGTH - 1,
                                  key="scene", step=1))
        image, inst = scene(size, idx)
        return Source(image, inst, f"scenes:{SCENES_SPLIT} #{idx}", f"scene:{size}:{idx}")
    if src == "photos":
        names = photo_names()
        idx = sb.selectbox("Photo", range(len(names)), format_func=lambda i: names[i], key="photo")
        key, image = photo(int(idx))
        return Source(image, None, key, f"photo:{key}")
    if src == "folder":
        if not disc.image_folders:
            sb.info("No image folders under the runs root. Put images in a folder inside it "
                    f"(e.g. {root.root}/images/) and press Rescan.")
            return None
        folder = sb.selectbox("Folder (under the runs root)", disc.image_folders, key="folder")
        try:
            files = root.images_in(folder)
        except (UnsafePathError, OSError) as e:
            sb.error(str(e))
            return None
        if not files:
            sb.info("No images in this folder.")
            return None
        rel = sb.selectbox("Image", files, format_func=lambda f: Path(f).name, key="folder_file")
        try:
            path = root.file(rel, "image")
            image = file_image(str(path), path.stat().st_mtime_ns)
        except UserError as e:
            sb.error(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - BadSampleError and friends: say which file
            sb.error(f"{rel}: {e}")
            return None
        return Source(image, None, rel, f"file:{rel}:{I.digest(image)}")
    up = sb.file_uploader(f"Upload an image (≤ {I.MAX_UPLOAD_BYTES // 2**20} MiB, ≤ {I.MAX_UPLOAD_PIXELS // 10**6} Mpx)",
                          type=["png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff"], key="upload")
    if up is None:
        sb.info("Choose a file to upload.")
        return None
    if up.size > I.MAX_UPLOAD_BYTES:
        sb.error(f"{up.name}: {up.size / 2**20:.1f} MiB is over the {I.MAX_UPLOAD_BYTES // 2**20} MiB limit.")
        return None
    data = up.getvalue()
    try:
        image = upload(I.digest(np.frombuffer(data, np.uint8)), data, up.name)
    except Exception as e:  # noqa: BLE001 - ValueError / BadSampleError: shown, not raised
        sb.error(str(e))
        return None
    return Source(image, None, f"upload: {up.name}", f"upload:{I.digest(image)}")


def _study_picker(disc: Discovery, by_name: dict[str, RunEntry]) -> None:
    """A study and a button that selects its (usable) runs for comparison."""

    def select() -> None:  # a callback: runs before the multiselect below is drawn
        study = disc.studies.get(st.session_state.get("study_pick"))
        if study is not None:
            st.session_state["runs"] = [n for n in study.runs if n in by_name and not by_name[n].problem]

    sb = st.sidebar
    sb.selectbox("Study", list(disc.studies), key="study_pick",
                 format_func=lambda s: f"{s}  ({len(disc.studies[s].runs)} runs)" if s in disc.studies else s)
    sb.button("Compare this study's runs", key="study_select", on_click=select)


def sidebar(root_arg: str | None, device_arg: str, with_image: bool) -> Ctx | None:
    """Draw the sidebar (runs root, rescan, runs to compare and, for image pages, the image)."""
    if not root_arg:
        st.error("No runs root. Start the dashboard with `rmae dashboard --runs DIR`.")
        return None
    try:
        root = runs_root(str(root_arg))
        device = str(resolve_device(device_arg))
    except (FileNotFoundError, UserError) as e:
        st.error(str(e))
        return None
    sb = st.sidebar
    sb.title("rmae explorer")
    disc = discover(str(root.root))
    if sb.button("Rescan runs", key="rescan"):
        discover.clear()
        disc = discover(str(root.root))
    sb.caption(f"Runs root: `{root.root}` · {len(disc.runs)} run folder(s) · device `{device}`")
    for r in disc.rejected:
        sb.warning(f"Ignored a symlink leaving the runs root: {r}")
    for note in disc.notes:
        sb.warning(note)
    by_name = {r.name: r for r in disc.runs}
    if disc.studies:
        _study_picker(disc, by_name)
    if "runs" not in st.session_state:
        st.session_state["runs"] = default_runs(disc.runs)
    else:  # runs that vanished since (rescan) are dropped instead of breaking the widget
        st.session_state["runs"] = [n for n in st.session_state["runs"] if n in by_name]
    names = sb.multiselect("Runs to compare", list(by_name), key="runs",
                           format_func=lambda n: by_name[n].label if n in by_name else n)
    selected = [by_name[n] for n in names]
    size = max([r.img_size for r in selected if isinstance(r.img_size, int)] or [64])
    source = image_picker(root, disc, size) if with_image else None
    if not disc.runs:
        st.warning(f"No run folders under `{root.root}`. Train some with `rmae demo` or `rmae pretrain`, "
                   "or import a checkpoint with `rmae import`.")
    return Ctx(root, disc, selected, source, device)


# ------------------------------------------------------------------------------------------
# running a page


_current = threading.local()  # each session's script run has its own thread


def debug() -> bool:
    """``RMAE_DASHBOARD_DEBUG=1`` (tests): errors a page would show as one message are raised."""
    return os.environ.get("RMAE_DASHBOARD_DEBUG") == "1"


def run_page(page: Any, ctx: Ctx) -> None:
    """Run the ``st.navigation`` page with ``ctx``; an error is one message with details folded
    away and the app stays up (:func:`debug`: raised, for tests)."""
    _current.ctx = ctx
    try:
        if debug():
            page.run()
            return
        try:
            page.run()
        except Exception as e:  # noqa: BLE001 - one message, details folded away, the app stays up
            st.error(f"The {page.title} page failed: {type(e).__name__}: {e}")
            with st.expander("Details"):
                st.exception(e)
    finally:
        _current.ctx = None


def show(render: Callable[[Ctx], None]) -> None:
    """A page file's entry: ``render`` with the context of this run."""
    ctx = getattr(_current, "ctx", None)
    if ctx is not None:
        render(ctx)
