"""Interactive segmentation: clicked patches are the only visible patches of the region map; the
region decoder predicts the rest (the whole image is visible to the pixel encoder). With ground
truth, the IoU with the clicked instance is measured next to the baselines given the same clicks."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboards import compute as C
from dashboards import images as I
from dashboards import state, widgets


def _clicks(ctx: state.Ctx, ref: state.LoadedRun) -> list[int]:
    """The clicked patches of the reference run's grid (picture clicks toggle, the list edits)."""
    grid = ref.info.grid
    labels = [f"r{r}c{c}" for r in range(grid[0]) for c in range(grid[1])]
    st.session_state.setdefault("seg_patches", [])
    st.session_state["seg_patches"] = [p for p in st.session_state["seg_patches"] if p in labels]
    point = widgets.new_click("seg_click")
    if point is not None:
        lab = labels[I.point_to_patch(point, grid)]
        cur = list(st.session_state["seg_patches"])
        st.session_state["seg_patches"] = [p for p in cur if p != lab] if lab in cur else cur + [lab]

    def clear() -> None:
        st.session_state["seg_patches"] = []

    clicks = [labels.index(p) for p in st.session_state["seg_patches"]]
    c1, c2 = st.columns([1.1, 2])
    with c1:
        shown = I.to_display(ctx.prepared(ref).image)
        for q in clicks:
            shown = I.draw_box(shown, I.patch_box(q, grid), color=I.CLICK_COLOR)
        widgets.clickable(shown, "seg_click")
    with c2:
        st.multiselect("Clicked patches (row, column)", labels, key="seg_patches")
        st.button("Clear clicks", key="seg_clear", on_click=clear)
    return clicks


def _one_run(ctx: state.Ctx, run: state.LoadedRun, points: list[tuple[float, float]]) -> dict | None:
    """Predict, show, and score one run; returns its table row when ground truth exists."""
    prepared = ctx.prepared(run)
    g, p = run.info.grid, run.info.patch_size
    clicks = list(dict.fromkeys(I.point_to_patch(pt, g) for pt in points))
    target, inst, how = C.target_for_clicks(prepared, clicks, p, g)
    with state.forward_lock():
        prob = C.segment_from_clicks(run.model, prepared, target, clicks)
    pred = prob > 0.5
    st.subheader(run.title)
    cols = st.columns(3)
    with_clicks = I.tint(prepared.image, pred)
    for q in clicks:
        with_clicks = I.draw_box(with_clicks, I.patch_box(q, g), color=I.QUERY_COLOR)
    cols[0].image(with_clicks, caption=f"predicted mask ({len(clicks)} click(s))", width="stretch", output_format="PNG")
    cols[1].image(I.mask_image(prob), caption="region probability", width="stretch", output_format="PNG")
    cols[2].image(I.tint(prepared.image, target, color=(64, 200, 64)), caption=f"target: {how}", width="stretch",
                  output_format="PNG")
    if inst:
        score = C.iou(pred, target)
        base = C.baselines(prepared, clicks, p, g)
        b_clicked, b_fh = C.iou(base["clicked"], target), C.iou(base["fh"], target)
        st.markdown(f"**IoU {score:.3f}** with instance {inst} · baselines on the same clicks: "
                    f"clicked patches {b_clicked:.3f}, FH segments {b_fh:.3f}")
        return {"run": run.name, "clicks": len(clicks), "instance": inst, "IoU": round(score, 4),
                "baseline: clicked": round(b_clicked, 4), "baseline: FH": round(b_fh, 4)}
    if inst == 0:
        st.info("The first click is on background: click inside an object to measure IoU.")
    else:
        st.caption("No ground truth for this image: the prediction is shown without an IoU.")
    return None


def render(ctx: state.Ctx) -> None:
    st.header("Interactive segmentation")
    st.caption("Click patches of one object: they are the only visible patches of the region map; the region "
               "decoder predicts the rest (the whole image is visible to the pixel encoder).")
    runs = widgets.need(ctx, 1, requires="region decoder")
    if not runs:
        return
    grid = runs[0].info.grid
    clicks = _clicks(ctx, runs[0])
    if not clicks:
        st.info("Click a patch on an object (or pick patches above) to segment it.")
        return
    points = [I.patch_center(q // grid[1], q % grid[1], grid) for q in clicks]
    rows = [row for run in runs if (row := _one_run(ctx, run, points))]
    if rows:
        st.dataframe(pd.DataFrame(rows).set_index("run"))


if __name__ == "__main__":  # run by st.navigation
    state.show(render)
