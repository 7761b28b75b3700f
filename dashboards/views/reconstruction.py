"""Reconstruction: each run reconstructs the same masked image (the same mask seed masks the same
patches in every run of one grid); runs with a region decoder also reconstruct a region map, from
the ground-truth instances or FH segments."""

from __future__ import annotations

import numpy as np
import streamlit as st

from dashboards import compute as C
from dashboards import images as I
from dashboards import state, widgets

PANELS = ["masked image", "pixel reconstruction", "original", "masked region", "region reconstruction", "original region"]


def _region_choice(ctx: state.Ctx, ref: I.Prepared, column) -> tuple[np.ndarray | None, int]:
    """The label map the region runs reconstruct (at the reference size) and the region shown."""
    choices = (["ground-truth instances"] if ref.instances is not None else []) + ["FH segments"]
    which = column.radio("Region maps for R-MAE / RAE", choices, key="region_src", horizontal=True)
    labels = ref.instances if which == "ground-truth instances" else state.fh(ref.digest, ref.image)
    segs = C.region_list(labels)
    if not segs:
        st.warning("No regions in this image.")
        return None, 0
    ids = [s[0] for s in segs]
    if st.session_state.get("region_id") not in ids:
        st.session_state["region_id"] = ids[0]
    areas = dict(segs)
    column.selectbox("Region shown", ids, key="region_id", format_func=lambda i: f"#{i} ({areas[i]} px)")
    return labels, int(st.session_state["region_id"])


def render(ctx: state.Ctx) -> None:
    st.header("Reconstruction")
    runs = widgets.need(ctx, 1, requires="decoder")
    if not runs:
        return
    st.session_state.setdefault("mask_seed", 0)
    c1, c2, c3 = st.columns([2, 1, 2])
    ratio = c1.slider("Mask ratio", 0.0, 0.95, 0.75, 0.05, key="mask_ratio")
    if c2.button("Resample mask", key="resample"):
        st.session_state["mask_seed"] += 1
    seed = st.session_state["mask_seed"]
    ref = ctx.prepared(runs[0])
    labels, region_id = (None, 0)
    if any(r.info.has_region_decoder for r in runs):
        labels, region_id = _region_choice(ctx, ref, c3)
    for run in runs:
        prepared = ctx.prepared(run)
        L = run.info.grid[0] * run.info.grid[1]
        lab = labels
        if lab is not None and lab.shape != prepared.size:  # the run sees another size: resize the map with it
            lab = I.prepare(np.zeros((*lab.shape, 3), np.uint8), lab, prepared.size).instances
        with state.forward_lock():
            panels = C.reconstruct(run.model, prepared, lab, region_id, ratio, seed)
        st.subheader(run.title)
        st.caption(f"{int(L * (1 - ratio))} of {L} patches visible (mask ratio {ratio:.2f}, mask seed {seed})")
        cols = st.columns(len(PANELS))  # the same slots for every run, so panels line up across runs
        for name, img in panels.items():
            cols[PANELS.index(name) if name in PANELS else -1].image(
                I.to_display(img, 192, nearest=True), caption=name, width="stretch", output_format="PNG")


if __name__ == "__main__":  # run by st.navigation
    state.show(render)
