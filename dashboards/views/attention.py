"""Attention explorer: click a query patch; each run shows its patch-query, CLS and rollout maps
at the chosen layer and heads, and — with ground truth — how much of the query's attention stays
on its own instance."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from dashboards import compute as C
from dashboards import images as I
from dashboards import state, widgets

HEAD_LABELS = {"mean": "mean over heads", "max": "max over heads"}


def head_label(option: str) -> str:
    return HEAD_LABELS[option] if option in HEAD_LABELS else f"head {int(option) + 1}"


def _controls(ctx: state.Ctx, ref: state.LoadedRun, depth: int, heads: int) -> tuple[tuple[float, float], int, str, float]:
    """The query point (click or row/column), layer (1-based), heads and opacity."""
    grid = ref.info.grid
    st.session_state.setdefault("query", (0.5, 0.5))
    point = widgets.new_click("q_click")
    if point is not None:
        st.session_state["query"] = point
    qref = I.point_to_patch(st.session_state["query"], grid)
    st.session_state["q_row"], st.session_state["q_col"] = divmod(qref, grid[1])

    def rc_changed() -> None:
        st.session_state["query"] = I.patch_center(int(st.session_state["q_row"]), int(st.session_state["q_col"]), grid)

    c1, c2, c3 = st.columns([1.1, 1, 1])
    with c1:
        st.caption(f"Click a query patch ({ctx.source.label})")
        widgets.clickable(I.draw_box(I.to_display(ctx.prepared(ref).image), I.patch_box(qref, grid)), "q_click")
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
    return st.session_state["query"], layer, how, alpha


def _instance_row(run: state.LoadedRun, attn, layer: int, how: str, q: int, instances) -> dict:
    g = run.info.grid
    s = C.instance_stats(C.query_row(attn, layer - 1, how, q, run.info.num_prefix_tokens), instances,
                         run.info.patch_size, q)
    on = s["instance"] > 0  # on background the instance terms are undefined

    def num(v: float) -> float | None:
        return round(v, 4) if on else None

    return {"run": run.name, "query (row, col)": f"({q // g[1]}, {q % g[1]})", "instance": s["instance"],
            "instance mass": num(s["mass"]), "leak": num(s["leak"]), "background": num(s["background"]),
            "Jaccard (60 %)": num(s["jaccard"]), "query patch purity": round(s["purity"], 2) if on else None,
            "valid query": s["valid"]}


def _instance_summary(rows: list[dict]) -> None:
    st.subheader("Instance-awareness of this query")
    if not any(r["instance"] for r in rows):
        st.info("The query patch lies on background (instance 0): instance-awareness is defined for queries "
                "inside an object. Click on an object.")
    else:
        # runs with different grids query different patches under the same point: one may land on
        # an object and another on background, where the instance terms are undefined
        on = [r for r in rows if r["instance mass"] is not None]
        best = max(on, key=lambda r: r["instance mass"])
        st.markdown("\n".join(
            f"- **{r['run']}**: instance mass {r['instance mass']:.3f}, leak {r['leak']:.3f}, "
            f"background {r['background']:.3f}, Jaccard {r['Jaccard (60 %)']:.3f}" if r["instance mass"] is not None
            else f"- **{r['run']}**: its query patch lies on background (its grid differs): not defined" for r in rows))
        if len(rows) > 1:
            st.caption(f"Highest mass on the query's own instance: {best['run']}. Mass + leak + background = 1 "
                       "over patch keys (prefix keys are left out and each row renormalised, as in analysis.metrics); "
                       "a query patch is valid (counted by `rmae analyze`) when ≥ 50 % of its pixels are in the "
                       "instance (purity).")
    st.dataframe(pd.DataFrame(rows).set_index("run"))


def render(ctx: state.Ctx) -> None:
    st.header("Attention explorer")
    runs = widgets.need(ctx, 2)
    if not runs:
        return
    depth = min(r.info.depth for r in runs)
    heads = min(r.info.heads for r in runs)
    point, layer, how, alpha = _controls(ctx, runs[0], depth, heads)
    lname, hname = f"layer {layer}", head_label(how)
    rows = []
    t0 = time.perf_counter()
    for i, run in enumerate(runs):
        prepared = ctx.prepared(run)
        g = run.info.grid
        q = I.point_to_patch(point, g)
        attn = state.attention(run.path, run.digest, run.device, prepared.digest, prepared)
        views = C.attention_views(attn, layer - 1, how, q, run.info)
        box = I.patch_box(q, g)
        st.subheader(run.title)
        with st.container(key=f"overlays-{i}"):
            captions = {"patch query": f"patch query ({q // g[1]}, {q % g[1]}) · {lname} · {hname}",
                        "CLS": f"CLS → patches · {lname} · {hname}",
                        "rollout": f"rollout from the query · layers 1–{layer} · {hname}"}
            for col, (name, amap) in zip(st.columns(3), views.items()):
                col.image(I.png_bytes(I.overlay(prepared.image, amap, alpha, box=box if name != "CLS" else None)),
                          caption=captions[name], width="stretch", output_format="PNG")
        if prepared.instances is not None:
            rows.append(_instance_row(run, attn, layer, how, q, prepared.instances))
    st.session_state["_render_ms"] = (time.perf_counter() - t0) * 1000
    st.divider()
    if rows:
        _instance_summary(rows)
    else:
        st.caption("No ground-truth instances for this image: instance-awareness numbers need `scenes` "
                   "(or another source with instance masks).")
    st.caption(f"Render time for {len(runs)} run(s): {st.session_state['_render_ms']:.0f} ms "
               "(cached attention; the first view of an image includes the forward pass).")


if __name__ == "__main__":  # run by st.navigation
    state.show(render)
