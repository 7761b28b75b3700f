"""Feature maps: the DINOv2-style PCA view of each run's patch features at a chosen layer (first three
components → RGB, one fit over the shown images and runs, background removed by the first
component), and a 2-D embedding of the image features of many scenes, coloured by class."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from analysis.featuremaps import umap_available
from dashboards import featuremaps as C
from dashboards import images as I
from dashboards import state, widgets
from dashboards.images import Prepared


@st.cache_data(max_entries=64, show_spinner="Extracting patch features…")
def features(path: str, digest: str, device: str, layer: int, image_digests: tuple[str, ...],
             _prepared: list[Prepared]) -> np.ndarray:
    net = state.model(path, digest, device)
    with state.forward_lock():
        return C.run_patch_features(net, _prepared, layer)


@st.cache_data(max_entries=16, show_spinner="Embedding the image features…")
def embedding(path: str, digest: str, device: str, data: str, method: str):
    net = state.model(path, digest, device)
    with state.forward_lock():
        return C.image_embedding(net, data, method)


def _images(ctx: state.Ctx, run: state.LoadedRun, count: int) -> list[Prepared]:
    """The chosen image, and for scenes the ``count − 1`` scenes after it, prepared for ``run``."""
    out = [ctx.prepared(run)]
    if ctx.source.digest.startswith("scene:") and count > 1:
        first = int(st.session_state.get("scene", 0))
        size = int(ctx.source.digest.split(":")[1])
        for k in range(1, count):
            image, inst = state.scene(size, (first + k) % state.SCENES_LENGTH)
            out.append(state.prepare(f"scene:{size}:{(first + k) % state.SCENES_LENGTH}", run.info.input_size, image, inst))
    return out


def _pca(ctx: state.Ctx, runs: list[state.LoadedRun]) -> None:
    depth = min(r.info.depth for r in runs)
    c1, c2, c3 = st.columns([1.2, 1, 1])
    if not 1 <= int(st.session_state.get("fm_layer", depth)) <= depth:
        st.session_state["fm_layer"] = depth
    st.session_state.setdefault("fm_layer", depth)
    layer = c1.slider("Layer", 1, depth, key="fm_layer")
    scenes = ctx.source.digest.startswith("scene:")
    if int(st.session_state.get("fm_images", 1)) > (8 if scenes else 1):  # another source: fewer images
        st.session_state["fm_images"] = 1
    count = int(c2.number_input("Images (this scene and the next ones)" if scenes else "Images", 1, 8 if scenes else 1,
                                4 if scenes else 1, key="fm_images"))
    background = c3.checkbox("Remove background (first component ≤ 0)", True, key="fm_bg")
    joint = c3.checkbox("One PCA over all runs", True, key="fm_joint")
    shown = {r.name: _images(ctx, r, count) for r in runs}
    feats = [features(r.path, r.digest, r.device, layer - 1, tuple(p.digest for p in shown[r.name]), shown[r.name])
             for r in runs]
    rgb, how = C.pca_rgb(feats, background, joint)
    st.caption(f"Layer {layer}: first three principal components of the patch features → RGB, {how}. "
               "Colours are comparable across images (one fit); across runs only as structure — two encoders' "
               "feature axes are unrelated, so each run is centred and scaled before a joint fit.")
    for i, run in enumerate(runs):
        st.subheader(run.title)
        with st.container(key=f"pca-{i}"):
            cols = st.columns(count)
            for k, col in enumerate(cols):
                col.image(I.to_display(shown[run.name][k].image), width="stretch", output_format="PNG")
                col.image(I.to_display(rgb[i][k], nearest=True), width="stretch", output_format="PNG",
                          caption=f"PCA · layer {layer} · image {k + 1}")


def _embedding(runs: list[state.LoadedRun]) -> None:
    st.divider()
    st.subheader("2-D embedding of the image features")
    c1, c2, c3 = st.columns(3)
    n = int(c1.number_input("Scenes (scenes:val)", 20, 2000, 200, step=20, key="emb_n"))
    methods = ["tsne"] + (["umap"] if umap_available() else [])
    method = c2.selectbox("Method", methods, key="emb_method", format_func=lambda m: {"tsne": "t-SNE", "umap": "UMAP"}[m])
    if not umap_available():
        c2.caption("UMAP needs `pip install umap-learn`.")
    # a forward pass over every scene and a fit per run: computed when asked for
    if not c3.toggle("Show the embedding", key="emb_on"):
        return
    data = f"scenes:val:{n}"
    cols = st.columns(len(runs))
    for col, run in zip(cols, runs):
        xy, labels, names = embedding(run.path, run.digest, run.device, data, method)
        fig = go.Figure()
        groups = sorted(set(labels.tolist())) if labels is not None else [None]
        for c in groups:
            pick = labels == c if c is not None else np.ones(len(xy), bool)
            name = (names[c] if names and c < len(names) else str(c)) if c is not None else "images"
            fig.add_trace(go.Scattergl(x=xy[pick, 0].tolist(), y=xy[pick, 1].tolist(), mode="markers", name=name, marker=dict(size=5)))
        fig.update_layout(title=f"{run.name}: {'t-SNE' if method == 'tsne' else 'UMAP'} of {len(xy)} images",
                          template="plotly_white", height=380, margin=dict(l=10, r=10, t=40, b=10),
                          xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False))
        col.plotly_chart(fig, key=f"emb-{run.name}")
    st.caption(f"The cls embedding (the mean patch token for encoders without one) of {data}, coloured by class; "
               "one embedding per run.")


def render(ctx: state.Ctx) -> None:
    st.header("Feature maps")
    runs = widgets.need(ctx, 1)
    if not runs:
        return
    _pca(ctx, runs)
    _embedding(runs)


if __name__ == "__main__":  # run by st.navigation
    state.show(render)
