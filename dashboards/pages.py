"""The dashboard's pages (Streamlit). ``main(root)`` draws the sidebar and the chosen page.

Caching: models live in ``st.cache_resource`` keyed on (run path, fingerprint of its weights and
config); per-image attention of every layer lives in ``st.cache_data`` keyed on (run path,
fingerprint, digest of the prepared image). Changing layer, head or query then only slices
cached arrays, runs one small rollout and encodes three PNGs per run.

Every input has a path that does not need a mouse (number inputs, selects), because
``streamlit.testing`` cannot drive custom components or uploads; the clickable image is the
primary input in a browser.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from . import compute as C
from . import results as R
from .runs import Discovery, RunEntry, RunsRoot, UnsafePathError, read_config, read_metrics

PAGES = ["Attention explorer", "Reconstruction", "Interactive segmentation", "Metrics and probes", "Runs"]
SOURCES = ["scenes", "photos", "folder", "upload"]
SCENES_SPLIT, SCENES_LENGTH = "val", 1000
HEAD_LABELS = {"mean": "mean over heads", "max": "max over heads"}
PANELS = ["masked image", "pixel reconstruction", "original", "masked region", "region reconstruction", "original region"]


def head_label(option: str) -> str:
    return HEAD_LABELS[option] if option in HEAD_LABELS else f"head {int(option) + 1}"


# ------------------------------------------------------------------------------------------
# cached loaders


@st.cache_resource(show_spinner=False)
def _root(path: str) -> RunsRoot:
    return RunsRoot(path)


@st.cache_data(ttl=10, show_spinner=False)
def _discover(root_path: str) -> Discovery:
    return _root(root_path).discover()


@st.cache_resource(max_entries=8, show_spinner="Loading model…")
def _model(path: str, fingerprint: str):
    import rmae

    model = rmae.load_model(path).eval()
    return model


@st.cache_resource(show_spinner=False)
def _forward_lock() -> threading.Lock:
    """Models are shared by every browser session (cache_resource) and the explicit-attention
    recorder is state on the model, so forward passes run one at a time (CPU-bound anyway)."""
    return threading.Lock()


@st.cache_data(max_entries=32, show_spinner="Computing attention…")
def _attention(path: str, fingerprint: str, image_digest: str, _prepared: C.Prepared) -> np.ndarray:
    model = _model(path, fingerprint)
    with _forward_lock():
        return C.attention_stack(model, _prepared)


@st.cache_data(max_entries=64, show_spinner=False)
def _prepare(source_digest: str, size: int, _image: np.ndarray, _instances: np.ndarray | None) -> C.Prepared:
    return C.prepare(_image, _instances, size)


@st.cache_resource(show_spinner=False)
def _scenes(size: int):
    from rmae.data import build_dataset

    ds = build_dataset(f"scenes:{SCENES_SPLIT}:{SCENES_LENGTH}", image_size=size)
    ds.prepare()
    return ds


@st.cache_data(max_entries=64, show_spinner=False)
def _scene(size: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    s = _scenes(size).load(int(index))
    return s["image"], s["instances"].astype(np.int32)


@st.cache_data(max_entries=16, show_spinner=False)
def _photo(index: int) -> tuple[str, np.ndarray]:
    from rmae.data import PhotosDataset

    s = PhotosDataset().load(int(index))
    return s["key"], s["image"]


@st.cache_data(max_entries=1, show_spinner=False)
def _photo_names() -> list[str]:
    from rmae.data import PhotosDataset

    return list(PhotosDataset().names)


@st.cache_data(max_entries=16, show_spinner=False)
def _file_image(path: str, mtime_ns: int) -> np.ndarray:
    from rmae.data import load_image

    return load_image(path, max_pixels=C.MAX_UPLOAD_PIXELS)


@st.cache_data(max_entries=4, show_spinner=False)
def _upload(data_digest: str, _data: bytes, name: str) -> np.ndarray:
    return C.decode_upload(_data, name)


@st.cache_data(max_entries=32, show_spinner=False)
def _fh(image_digest: str, _image: np.ndarray) -> np.ndarray:
    return C.fh_segments(_image)


@st.cache_data(max_entries=16, show_spinner=False)
def _results(path: str, mtime_ns: int) -> dict:
    return R.load_results(path)


@st.cache_data(max_entries=64, show_spinner=False)
def _metrics_log(run_path: str, mtime_ns: int) -> tuple[list[dict], int]:
    return read_metrics(Path(run_path))


# ------------------------------------------------------------------------------------------
# selection state


@dataclass
class Source:
    image: np.ndarray  # uint8 [H, W, 3]
    instances: np.ndarray | None
    label: str
    digest: str


@dataclass
class LoadedRun:
    entry: RunEntry
    model: Any
    fingerprint: str
    info: dict

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def path(self) -> str:
        return str(self.entry.path)


class Ctx:
    """What the sidebar chose; pages read it."""

    def __init__(self, root: RunsRoot, disc: Discovery, selected: list[RunEntry], source: Source | None):
        self.root, self.disc, self.selected, self.source = root, disc, selected, source
        self._loaded: list[LoadedRun] | None = None

    def loaded(self) -> list[LoadedRun]:
        """Models of the selected runs; a broken one shows an error and is left out."""
        if self._loaded is None:
            self._loaded = []
            for entry in self.selected:
                run = load_run(self.root, entry)
                if run is not None:
                    self._loaded.append(run)
        return self._loaded

    def prepared(self, run: LoadedRun) -> C.Prepared:
        s = self.source
        return _prepare(s.digest, run.info["img_size"], s.image, s.instances)


def load_run(root: RunsRoot, entry: RunEntry) -> LoadedRun | None:
    import rmae

    if entry.problem:
        st.error(f"Run **{entry.name}** cannot be used: {entry.problem}")
        return None
    try:
        path = root.inside(entry.name)  # re-resolved at use: nothing outside the root is read
        root.check_run(path)
        fp = root.fingerprint(path)
        model = _model(str(path), fp)
    except UnsafePathError as e:
        st.error(f"Run **{entry.name}** refused: {e}")
        return None
    except rmae.CheckpointError as e:
        st.error(f"Run **{entry.name}** cannot be loaded: {e}")
        return None
    except Exception as e:  # noqa: BLE001 - a foreign folder must not take the page down
        st.error(f"Run **{entry.name}** cannot be loaded ({type(e).__name__}): {e}. "
                 "Is this a run folder written by `rmae pretrain` / `rmae import`?")
        return None
    return LoadedRun(entry, model, fp, C.describe(model))


def _default_runs(runs: list[RunEntry]) -> list[str]:
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


def _image_picker(root: RunsRoot, disc: Discovery, size: int) -> Source | None:
    sb = st.sidebar
    src = sb.radio("Image source", SOURCES, key="src", horizontal=True)
    if src == "scenes":
        idx = int(sb.number_input(f"Scene (scenes:{SCENES_SPLIT}, 0–{SCENES_LENGTH - 1})", 0, SCENES_LENGTH - 1,
                                  key="scene", step=1))
        image, inst = _scene(size, idx)
        return Source(image, inst, f"scenes:{SCENES_SPLIT} #{idx}", f"scene:{size}:{idx}")
    if src == "photos":
        names = _photo_names()
        idx = sb.selectbox("Photo", range(len(names)), format_func=lambda i: names[i], key="photo")
        key, image = _photo(int(idx))
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
            path = root.inside(rel)
            image = _file_image(str(path), path.stat().st_mtime_ns)
        except UnsafePathError as e:
            sb.error(str(e))
            return None
        except Exception as e:  # noqa: BLE001 - BadSampleError and friends: say which file
            sb.error(f"{rel}: {e}")
            return None
        return Source(image, None, rel, f"file:{rel}:{C.digest(image)}")
    up = sb.file_uploader(f"Upload an image (≤ {C.MAX_UPLOAD_BYTES // 2**20} MiB, ≤ {C.MAX_UPLOAD_PIXELS // 10**6} Mpx)",
                          type=["png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff"], key="upload")
    if up is None:
        sb.info("Choose a file to upload.")
        return None
    if up.size > C.MAX_UPLOAD_BYTES:
        sb.error(f"{up.name}: {up.size / 2**20:.1f} MiB is over the {C.MAX_UPLOAD_BYTES // 2**20} MiB limit.")
        return None
    data = up.getvalue()
    try:
        image = _upload(C.digest(np.frombuffer(data, np.uint8)), data, up.name)
    except Exception as e:  # noqa: BLE001 - ValueError / BadSampleError: shown, not raised
        sb.error(str(e))
        return None
    return Source(image, None, f"upload: {up.name}", f"upload:{C.digest(image)}")


def main(root_arg: str | None) -> None:
    if not root_arg:
        st.error("No runs root. Start the dashboard with `rmae dashboard --runs DIR`.")
        return
    try:
        root = _root(str(root_arg))
    except FileNotFoundError as e:
        st.error(str(e))
        return
    sb = st.sidebar
    sb.title("rmae explorer")
    page = sb.radio("Page", PAGES, key="page")
    disc = _discover(str(root.root))
    if sb.button("Rescan runs", key="rescan"):
        _discover.clear()
        disc = _discover(str(root.root))
    sb.caption(f"Runs root: `{root.root}` · {len(disc.runs)} run folder(s)")
    for r in disc.rejected:
        sb.warning(f"Ignored a symlink leaving the runs root: {r}")
    by_name = {r.name: r for r in disc.runs}
    if "runs" not in st.session_state:
        st.session_state["runs"] = _default_runs(disc.runs)
    else:  # runs that vanished since (rescan) are dropped instead of breaking the widget
        st.session_state["runs"] = [n for n in st.session_state["runs"] if n in by_name]
    names = sb.multiselect("Runs to compare", list(by_name), key="runs",
                           format_func=lambda n: by_name[n].label if n in by_name else n)
    selected = [by_name[n] for n in names]
    size = max([r.img_size for r in selected if isinstance(r.img_size, int)] or [64])
    source = None
    if page in PAGES[:3]:
        source = _image_picker(root, disc, size)
    ctx = Ctx(root, disc, selected, source)
    if not disc.runs:
        st.warning(f"No run folders under `{root.root}`. Train some with `rmae demo` or `rmae pretrain`, "
                   "or import a checkpoint with `rmae import`.")
    render = {
        PAGES[0]: page_attention,
        PAGES[1]: page_reconstruction,
        PAGES[2]: page_segmentation,
        PAGES[3]: page_metrics,
        PAGES[4]: page_runs,
    }[page]
    if os.environ.get("RMAE_DASHBOARD_DEBUG") == "1":  # tests: let exceptions surface
        render(ctx)
        return
    try:
        render(ctx)
    except Exception as e:  # noqa: BLE001 - one message, details folded away, the app stays up
        st.error(f"The {page} page failed: {type(e).__name__}: {e}")
        with st.expander("Details"):
            st.exception(e)


# ------------------------------------------------------------------------------------------
# helpers


def _need(ctx: Ctx, at_least: int = 1, region: bool = False) -> list[LoadedRun] | None:
    if not ctx.selected:
        st.info("Choose runs to compare in the sidebar.")
        return None
    if ctx.source is None:
        st.info("Choose an image in the sidebar.")
        return None
    runs = ctx.loaded()
    if region:
        no_region = [r.name for r in runs if not r.info["regions"]]
        runs = [r for r in runs if r.info["regions"]]
        if no_region:
            st.caption(f"Without a region decoder (left out here): {', '.join(no_region)}")
        if not runs:
            st.warning("Interactive segmentation needs a region decoder: choose an rae_* or rmae_* run.")
            return None
    if not runs:
        return None
    if len(runs) < at_least:
        st.info(f"Choose {at_least} or more runs to compare them side by side (e.g. MAE and R-MAE).")
    return runs


def _clickable(image: np.ndarray, key: str) -> None:
    """The clickable picture (its value is read from ``st.session_state[key]`` on the next run)."""
    try:
        from streamlit_image_coordinates import streamlit_image_coordinates
    except ImportError:  # pragma: no cover - dev extra missing: the fallback inputs still work
        st.image(image)
        return
    streamlit_image_coordinates(image, key=key, cursor="crosshair")


def _new_click(key: str) -> tuple[float, float] | None:
    """A click not seen before on the clickable image ``key`` → relative point."""
    value = st.session_state.get(key)
    if not value or value == st.session_state.get(f"{key}__seen"):
        return None
    st.session_state[f"{key}__seen"] = value
    return C.click_to_point(value)


def _run_title(run: LoadedRun) -> str:
    i = run.info
    return f"{run.name} — {i['model']} · {i['family']} · {i['img_size']}²/p{i['patch_size']}"


# ------------------------------------------------------------------------------------------
# pages


def page_attention(ctx: Ctx) -> None:
    st.header("Attention explorer")
    runs = _need(ctx, 2)
    if not runs:
        return
    ref = runs[0]
    grid = ref.info["grid"]
    depth = min(r.info["depth"] for r in runs)
    heads = min(r.info["heads"] for r in runs)
    st.session_state.setdefault("query", (0.5, 0.5))
    point = _new_click("q_click")
    if point is not None:
        st.session_state["query"] = point
    fy, fx = st.session_state["query"]
    qref = C.point_to_patch((fy, fx), grid)
    st.session_state["q_row"], st.session_state["q_col"] = divmod(qref, grid[1])

    def rc_changed() -> None:
        st.session_state["query"] = C.patch_center(int(st.session_state["q_row"]), int(st.session_state["q_col"]), grid)

    c1, c2, c3 = st.columns([1.1, 1, 1])
    with c1:
        st.caption(f"Click a query patch ({ctx.source.label})")
        ref_img = ctx.prepared(ref)
        _clickable(C.draw_box(C.to_display(ref_img.image), C.patch_box(qref, grid)), "q_click")
    with c2:
        if not 1 <= int(st.session_state.get("layer", depth)) <= depth:
            st.session_state["layer"] = depth
        st.session_state.setdefault("layer", depth)
        layer = st.slider("Layer", 1, depth, key="layer")
        options = ["mean", "max"] + [str(h) for h in range(heads)]
        if st.session_state.get("head") not in options:
            st.session_state["head"] = "mean"
        how = st.selectbox("Heads", options, key="head", format_func=head_label)
        alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.6, 0.05, key="alpha")
    with c3:
        st.number_input(f"Query row (0–{grid[0] - 1})", 0, grid[0] - 1, key="q_row", step=1, on_change=rc_changed)
        st.number_input(f"Query column (0–{grid[1] - 1})", 0, grid[1] - 1, key="q_col", step=1, on_change=rc_changed)
        st.caption(f"Query patch ({qref // grid[1]}, {qref % grid[1]}) of {grid[0]}×{grid[1]} on {ref.name}; "
                   "other runs query the patch under the same point. Maps: bright = more attention, each "
                   "min–max scaled; the box marks the query.")
    lname = f"layer {layer}"
    hname = head_label(how)
    rows = []
    t0 = time.perf_counter()
    for i, run in enumerate(runs):
        prepared = ctx.prepared(run)
        g = run.info["grid"]
        q = C.point_to_patch((fy, fx), g)
        attn = _attention(run.path, run.fingerprint, prepared.digest, prepared)
        views = C.attention_views(attn, layer - 1, how, q, g)
        box = C.patch_box(q, g)
        st.subheader(_run_title(run))
        with st.container(key=f"overlays-{i}"):
            cols = st.columns(3)
            captions = {"patch query": f"patch query ({q // g[1]}, {q % g[1]}) · {lname} · {hname}",
                        "CLS": f"CLS → patches · {lname} · {hname}",
                        "rollout": f"rollout from the query · layers 1–{layer} · {hname}"}
            for col, (name, amap) in zip(cols, views.items()):
                col.image(C.png_bytes(C.overlay(prepared.image, amap, alpha, box=box if name != "CLS" else None)),
                          caption=captions[name], width="stretch", output_format="PNG")
        if prepared.instances is not None:
            s = C.instance_stats(C.query_row(attn, layer - 1, how, q), prepared.instances, run.info["patch_size"], q)
            on = s["instance"] > 0  # on background the instance terms are undefined

            def num(v: float) -> float | None:
                return round(v, 4) if on else None

            rows.append({"run": run.name, "query (row, col)": f"({q // g[1]}, {q % g[1]})", "instance": s["instance"],
                         "instance mass": num(s["mass"]), "leak": num(s["leak"]),
                         "background": num(s["background"]), "Jaccard (60 %)": num(s["jaccard"]),
                         "query patch purity": round(s["purity"], 2) if on else None, "valid query": s["valid"]})
    st.session_state["_render_ms"] = (time.perf_counter() - t0) * 1000
    st.divider()
    if rows:
        st.subheader("Instance-awareness of this query")
        if not any(r["instance"] for r in rows):
            st.info("The query patch lies on background (instance 0): instance-awareness is defined for queries "
                    "inside an object. Click on an object.")
        else:
            best = max(rows, key=lambda r: r["instance mass"] or 0.0)
            st.markdown("\n".join(f"- **{r['run']}**: instance mass {r['instance mass']:.3f}, leak {r['leak']:.3f}, "
                                   f"background {r['background']:.3f}, Jaccard {r['Jaccard (60 %)']:.3f}" for r in rows))
            if len(rows) > 1:
                st.caption(f"Highest mass on the query's own instance: {best['run']}. Mass + leak + background = 1 "
                           "over patch keys (the cls key is left out and each row renormalised, as in analysis.metrics); "
                           "a query patch is valid (counted by `rmae analyze`) when ≥ 50 % of its pixels are in the instance (purity).")
        import pandas as pd

        st.dataframe(pd.DataFrame(rows).set_index("run"))
    else:
        st.caption("No ground-truth instances for this image: instance-awareness numbers need `scenes` "
                   "(or another source with instance masks).")
    st.caption(f"Render time for {len(runs)} run(s): {st.session_state['_render_ms']:.0f} ms "
               "(cached attention; first view of an image includes the forward pass).")


def page_reconstruction(ctx: Ctx) -> None:
    st.header("Reconstruction")
    runs = _need(ctx, 1)
    if not runs:
        return
    st.session_state.setdefault("mask_seed", 0)
    c1, c2, c3 = st.columns([2, 1, 2])
    ratio = c1.slider("Mask ratio", 0.0, 0.95, 0.75, 0.05, key="mask_ratio")
    if c2.button("Resample mask", key="resample"):
        st.session_state["mask_seed"] += 1
    seed = st.session_state["mask_seed"]
    ref = ctx.prepared(runs[0])
    region_runs = [r for r in runs if r.info["regions"]]
    labels = None
    if region_runs:
        choices = (["ground-truth instances"] if ref.instances is not None else []) + ["FH segments"]
        which = c3.radio("Region maps for R-MAE / RAE", choices, key="region_src", horizontal=True)
        labels = ref.instances if which == "ground-truth instances" else _fh(ref.digest, ref.image)
        segs = C.region_list(labels)
        if not segs:
            st.warning("No regions in this image.")
            labels = None
        else:
            ids = [s[0] for s in segs]
            if st.session_state.get("region_id") not in ids:
                st.session_state["region_id"] = ids[0]
            c3.selectbox("Region shown", ids, key="region_id",
                         format_func=lambda i: f"#{i} ({dict(segs)[i]} px)")
    for run in runs:
        prepared = ctx.prepared(run)
        L = run.model.num_patches
        keep = int(L * (1 - ratio))
        regions = None
        if labels is not None and run.info["regions"]:
            lab = labels if labels.shape[0] == prepared.size else C.prepare(
                np.zeros((*labels.shape, 3), np.uint8), labels, prepared.size).instances
            k = run.model.config.num_regions
            regions = C.region_stack(lab, int(st.session_state["region_id"]), k)
        with _forward_lock():
            panels = C.reconstruct(run.model, prepared, regions, ratio, seed)
        st.subheader(_run_title(run))
        st.caption(f"{keep} of {L} patches visible (mask ratio {ratio:.2f}, mask seed {seed})")
        cols = st.columns(len(PANELS))  # the same slots for every run, so panels line up across runs
        for name, img in panels.items():
            cols[PANELS.index(name) if name in PANELS else -1].image(C.to_display(img, 192, nearest=True), caption=name, width="stretch", output_format="PNG")


def page_segmentation(ctx: Ctx) -> None:
    st.header("Interactive segmentation")
    st.caption("Click patches of one object: they are the only visible patches of the region map; the region "
               "decoder predicts the rest (the whole image is visible to the pixel encoder).")
    runs = _need(ctx, 1, region=True)
    if not runs:
        return
    ref = runs[0]
    grid, patch = ref.info["grid"], ref.info["patch_size"]
    labels = [f"r{r}c{c}" for r in range(grid[0]) for c in range(grid[1])]
    st.session_state.setdefault("seg_patches", [])
    st.session_state["seg_patches"] = [p for p in st.session_state["seg_patches"] if p in labels]
    point = _new_click("seg_click")
    if point is not None:
        lab = labels[C.point_to_patch(point, grid)]
        cur = list(st.session_state["seg_patches"])
        st.session_state["seg_patches"] = [p for p in cur if p != lab] if lab in cur else cur + [lab]

    def clear() -> None:
        st.session_state["seg_patches"] = []

    prepared_ref = ctx.prepared(ref)
    clicks_ref = [labels.index(p) for p in st.session_state["seg_patches"]]
    c1, c2 = st.columns([1.1, 2])
    with c1:
        shown = C.to_display(prepared_ref.image)
        for q in clicks_ref:
            shown = C.draw_box(shown, C.patch_box(q, grid), color=C.CLICK_COLOR)
        _clickable(shown, "seg_click")
    with c2:
        st.multiselect("Clicked patches (row, column)", labels, key="seg_patches")
        st.button("Clear clicks", key="seg_clear", on_click=clear)
    if not clicks_ref:
        st.info("Click a patch on an object (or pick patches above) to segment it.")
        return
    points = [C.patch_center(q // grid[1], q % grid[1], grid) for q in clicks_ref]
    rows = []
    for run in runs:
        prepared = ctx.prepared(run)
        g, p = run.info["grid"], run.info["patch_size"]
        clicks = list(dict.fromkeys(C.point_to_patch(pt, g) for pt in points))
        target, inst, how = C.target_for_clicks(prepared, clicks, p, g)
        with _forward_lock():
            prob = C.segment_from_clicks(run.model, prepared, target, clicks)
        pred = prob > 0.5
        st.subheader(_run_title(run))
        cols = st.columns(3)
        with_clicks = C.tint(prepared.image, pred)
        for q in clicks:
            with_clicks = C.draw_box(with_clicks, C.patch_box(q, g), color=C.QUERY_COLOR)
        cols[0].image(with_clicks, caption=f"predicted mask ({len(clicks)} click(s))", width="stretch", output_format="PNG")
        cols[1].image(C.mask_image(prob), caption="region probability", width="stretch", output_format="PNG")
        cols[2].image(C.tint(prepared.image, target, color=(64, 200, 64)), caption=f"target: {how}", width="stretch", output_format="PNG")
        if inst:
            score = C.iou(pred, target)
            base = C.baselines(prepared, clicks, p, g)
            b_clicked, b_fh = C.iou(base["clicked"], target), C.iou(base["fh"], target)
            st.markdown(f"**IoU {score:.3f}** with instance {inst} · baselines on the same clicks: "
                        f"clicked patches {b_clicked:.3f}, FH segments {b_fh:.3f}")
            rows.append({"run": run.name, "clicks": len(clicks), "instance": inst, "IoU": round(score, 4),
                         "baseline: clicked": round(b_clicked, 4), "baseline: FH": round(b_fh, 4)})
        elif inst == 0:
            st.info("The first click is on background: click inside an object to measure IoU.")
        else:
            st.caption("No ground truth for this image: the prediction is shown without an IoU.")
    if rows:
        import pandas as pd

        st.dataframe(pd.DataFrame(rows).set_index("run"))


def page_metrics(ctx: Ctx) -> None:
    st.header("Metrics and probes")
    root, disc = ctx.root, ctx.disc
    reports = disc.reports
    data = None
    if "_flash" in st.session_state:
        st.success(st.session_state.pop("_flash"))
    if st.session_state.get("_report_next") in reports:
        st.session_state["report"] = st.session_state.pop("_report_next")
    if not reports:
        st.info("No `results.json` under the runs root yet: compute one below (or run "
                "`rmae analyze RUN_A RUN_B --data scenes:val --out <runs root>/reports/NAME`).")
    else:
        if st.session_state.get("report") not in reports:
            st.session_state["report"] = reports[0]
        report = st.selectbox("Report", reports, key="report")
        try:
            path = root.inside(Path(report) / "results.json")
            data = _results(str(path), path.stat().st_mtime_ns)
        except (UnsafePathError, OSError, R.ResultsError) as e:
            st.error(f"{report}: {e}")
    if data is not None:
        runs_all = list(data["runs"])
        st.caption(f"data `{data.get('data', '?')}` · {data.get('n_images', '?')} images · seed {data.get('seed', '?')}")
        runs = st.multiselect("Runs in this report", runs_all, default=runs_all, key="report_runs")
        present = R.layer_metrics_present(data, runs)
        if present:
            st.subheader("Per layer (bootstrap 95 % CI over images)")
            cols = st.columns(2)
            for i, name in enumerate(present):
                cols[i % 2].plotly_chart(R.layer_figure(data, name, runs), key=f"fig-{name}")
        st.subheader("Probes and last-layer values")
        st.dataframe(R.scalar_table(data, runs))
        fig = R.interactive_figure(data, runs)
        if fig is not None:
            st.subheader("Interactive segmentation")
            st.plotly_chart(fig, key="fig-interactive")
        diff = R.differences_table(data)
        if diff is not None:
            st.subheader("Differences")
            st.dataframe(diff, hide_index=True)
        for j, entry in enumerate(R.cka_entries(data)):
            st.plotly_chart(R.cka_figure(entry), key=f"fig-cka-{j}")
    _probe_files(ctx)
    _compute_missing(ctx, data)


def _probe_files(ctx: Ctx) -> None:
    """Probe results that ``rmae probe`` stored in the selected run folders."""
    import json

    found: dict[str, list[dict]] = {}
    for entry in ctx.selected:
        if entry.problem:
            continue
        try:
            folder = ctx.root.inside(Path(entry.name) / "analysis" / "probes")
        except UnsafePathError:
            continue
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.json"))[:200]:
            if not ctx.root.is_inside(f):
                continue
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(d, dict):
                found.setdefault(entry.name, []).append(d)
    table = R.probe_files_table(found)
    if table is not None:
        st.subheader("Probe results stored in the run folders (`rmae probe`)")
        st.dataframe(table, hide_index=True)


EXPECTED = [*R.LAYER_METRICS, "corloc", *R.PROBE_METRICS]


def _missing(data: dict | None, entries: list[RunEntry]) -> dict[str, list[str]]:
    """For each selected run, the report's metrics it lacks (all of them when it is not in the
    report). Runs are matched by name, folder name (what ``analyze`` names them) or path."""
    out: dict[str, list[str]] = {}
    by_key: dict[str, dict] = {}
    for name, info in ((data or {}).get("runs") or {}).items():
        info = info or {}
        by_key[name] = info
        if info.get("path"):
            by_key[str(info["path"])] = info
    for e in entries:
        info = by_key.get(e.name) or by_key.get(Path(e.name).name) or by_key.get(str(e.path))
        expected = EXPECTED + (["interactive_iou"] if e.family in ("rae", "rmae") else [])
        metrics = (info or {}).get("metrics") or {}
        out[e.name] = [k for k in dict.fromkeys(expected) if not isinstance(metrics.get(k), dict)]
    return out


def _compute_missing(ctx: Ctx, data: dict | None) -> None:
    with st.expander("Compute what is missing", expanded=data is None):
        entries = [r for r in ctx.selected if not r.problem]
        selected = [r.name for r in entries]
        if not selected:
            st.info("Choose runs in the sidebar first.")
            return
        missing = _missing(data, entries)
        lines = [f"- **{run}**: " + (", ".join(keys) if keys else "nothing missing") for run, keys in missing.items()]
        st.markdown("Missing from this report for the selected runs:\n" + "\n".join(lines))
        c1, c2, c3 = st.columns(3)
        n = int(c1.number_input("Images (scenes:val)", 8, 5000, 200, step=8, key="an_n"))
        name = c2.text_input("Report name (under reports/)", "dashboard", key="an_name")
        probes = c3.multiselect("Probes", ["linear", "knn", "attentive", "dense"], ["linear", "knn", "attentive", "dense"],
                                key="an_probes")
        st.caption("Writes (or overwrites) `reports/<name>/` under the runs root with every metric of `rmae analyze` "
                   "for the selected runs on the same images. Probes train on scenes:train and dominate the time.")
        go = st.button("Compute", key="an_go", type="primary")
        if not go:
            return
        try:
            out = ctx.root.report_dir(name.strip())
        except UnsafePathError as e:
            st.error(str(e))
            return
        paths = [ctx.root.inside(r) for r in selected]
        try:
            from analysis.report import analyze
        except ImportError as e:
            st.error(f"analysis.report is not available ({e}).")
            return
        with st.spinner(f"Analysing {len(paths)} run(s) on scenes:val:{n} …"):
            try:
                analyze([str(p) for p in paths], f"scenes:val:{n}", str(out), probes=tuple(probes), progress=False)
            except Exception as e:  # noqa: BLE001 - AnalysisError & co. are shown, not raised
                st.error(f"Analysis failed ({type(e).__name__}): {e}")
                return
        _discover.clear()
        _results.clear()
        rel = ctx.root.rel(out)
        st.session_state["_report_next"] = rel  # selected on the next run (the selectbox exists already)
        st.session_state["_flash"] = f"Wrote {rel}/results.json ({', '.join(Path(p).name for p in paths)}, scenes:val:{n})"
        st.rerun()


def page_runs(ctx: Ctx) -> None:
    import pandas as pd

    st.header("Runs")
    root, disc = ctx.root, ctx.disc
    overview = []
    logs: dict[str, list[dict]] = {}
    for entry in disc.runs:
        row = {"run": entry.name, "family": entry.family or "—", "model": entry.model or "—",
               "img_size": entry.img_size, "steps logged": 0, "last step": None, "last loss": "—",
               "status": entry.problem or "ok"}
        if not entry.problem:
            try:
                path = root.inside(entry.name)
                mfile = path / "metrics.jsonl"
                if mfile.is_file():
                    rows, bad = _metrics_log(str(path), mfile.stat().st_mtime_ns)
                    if rows:
                        logs[entry.name] = rows
                        row["steps logged"] = len(rows)
                        row["last step"] = rows[-1].get("step")
                        loss = rows[-1].get("loss")
                        row["last loss"] = f"{loss:.4f}" if isinstance(loss, (int, float)) else "—"
                    if bad:
                        row["status"] = f"ok ({bad} unreadable log line(s) skipped)"
                else:
                    row["status"] = "no metrics.jsonl"
            except (UnsafePathError, OSError) as e:
                row["status"] = str(e)
        overview.append(row)
    if overview:
        st.dataframe(pd.DataFrame(overview).set_index("run"))
    chosen = [r.name for r in ctx.selected]
    if not chosen:
        st.info("Choose runs in the sidebar to plot their training curves and compare their configs.")
        return
    sel_logs = {n: logs[n] for n in chosen if n in logs}
    if sel_logs:
        keys = R.numeric_keys([r for rows in sel_logs.values() for r in rows])
        if keys:
            c1, c2 = st.columns([3, 1])
            if st.session_state.get("train_metric") not in keys:
                st.session_state["train_metric"] = "loss" if "loss" in keys else keys[0]
            key = c1.selectbox("Training curve", keys, key="train_metric")
            log_y = c2.checkbox("log y", key="train_log")
            st.plotly_chart(R.training_figure(sel_logs, key, log_y), key="fig-train")
    else:
        st.caption("The selected runs have no training log.")
    st.subheader("Configs side by side")
    only = st.checkbox("Only keys that differ", key="cfg_diff")
    configs = {}
    for name in chosen:
        try:
            configs[name] = read_config(root.inside(name))
        except Exception as e:  # noqa: BLE001 - a broken config.yaml is shown as such
            st.error(f"{name}/config.yaml: {type(e).__name__}: {e}")
    if configs:
        table = R.config_table(configs, only)
        st.dataframe(table, height=min(36 * (len(table) + 1) + 4, 900))
    figures = []
    for name in chosen:
        try:
            folder = root.inside(Path(name) / "figures")
        except UnsafePathError:
            continue
        pngs = sorted((p for p in folder.glob("*.png") if root.is_inside(p)), key=lambda p: p.stat().st_mtime) \
            if folder.is_dir() else []
        if pngs:
            figures.append((name, pngs[-1]))
    if figures:
        with st.expander("Latest training figures (reconstructions written by the trainer)"):
            for name, png in figures:
                st.image(str(png), caption=f"{name}: {png.name}")
