"""Attributions: for the chosen image, what two scores of each run depend on — a probe logit (a linear
head on the pooled embedding, fitted on labelled scenes) and the embedding's cosine to its class
mean — by Integrated Gradients, patch-aligned occlusion and Grad-CAM on the token grid."""

from __future__ import annotations

import streamlit as st

from analysis.attribution_views import MEANING, METHODS, TARGETS, Targets
from dashboards import attributions as C
from dashboards import images as I
from dashboards import state, widgets
from dashboards.images import Prepared


@st.cache_resource(max_entries=8, show_spinner="Fitting the probe head (features from the run's cache)…")
def targets(path: str, digest: str, device: str, data: str) -> Targets:
    net = state.model(path, digest, device)
    with state.forward_lock():
        return C.probe_targets(path, net, data, device)


@st.cache_data(max_entries=32, show_spinner="Computing attributions…")
def view(path: str, digest: str, device: str, data: str, image_digest: str, steps: int, _prepared: Prepared) -> C.AttributionView:
    net = state.model(path, digest, device)
    fitted = targets(path, digest, device, data)
    with state.forward_lock():
        return C.attribution_view(net, _prepared, fitted, steps)


def render(ctx: state.Ctx) -> None:
    st.header("Attributions")
    runs = widgets.need(ctx, 1)
    if not runs:
        return
    c1, c2, c3 = st.columns([1.2, 1, 1])
    n = int(c1.number_input("Labelled scenes the probe head and class means are fitted on", 50, 5000, 500, step=50,
                            key="att_train"))
    steps = int(c2.selectbox("IG steps", [8, 16, 32, 64], index=1, key="att_steps"))
    alpha = c3.slider("Overlay opacity", 0.0, 1.0, 0.6, 0.05, key="att_alpha")
    data = f"scenes:train:{n}"
    st.caption("Maps on the token grid, each min–max scaled; bright = the score depends more on that patch. "
               + " · ".join(f"**{m}**: {MEANING[m]}" for m in METHODS) + ". The image has no label here: each run "
               "explains the class its probe head predicts.")
    for i, run in enumerate(runs):
        prepared = ctx.prepared(run)
        got = view(run.path, run.digest, run.device, data, prepared.digest, steps, prepared)
        fitted = targets(run.path, run.digest, run.device, data)
        st.subheader(run.title)
        st.caption(f"Scores: {fitted.about}.")
        if "probe logit" not in got.maps:
            st.info(f"No probe logit: {fitted.about}.")
        for t in TARGETS:
            if t not in got.maps:
                continue
            with st.container(key=f"att-{i}-{t.replace(' ', '-')}"):
                cols = st.columns(len(METHODS))
                for col, m in zip(cols, METHODS):
                    col.image(I.png_bytes(I.overlay(prepared.image, got.maps[t][m], alpha)), width="stretch",
                              caption=f"{t} · {m} — {got.explained[t]} (score {got.scores[t]:.3f})", output_format="PNG")


if __name__ == "__main__":  # run by st.navigation
    state.show(render)
