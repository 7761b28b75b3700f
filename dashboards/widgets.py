"""What the image pages share below the sidebar: which loaded runs a page can show, and the
clickable picture.

Every input has a path that does not need a mouse (number inputs, selects), because
``streamlit.testing`` cannot drive custom components; the clickable image is the primary input
in a browser, and a click is read from ``st.session_state`` on the next run.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from analysis.encoder import EncoderInfo

from . import images as I
from .state import Ctx, LoadedRun


def need(ctx: Ctx, at_least: int = 1, requires: str | None = None) -> list[LoadedRun] | None:
    """The loaded runs a page can show, or None after saying what is missing.
    ``requires``: ``"decoder"`` (pixel or region) or ``"region decoder"``."""
    if not ctx.selected:
        st.info("Choose runs to compare in the sidebar.")
        return None
    if ctx.source is None:
        st.info("Choose an image in the sidebar.")
        return None
    runs = ctx.loaded()
    if requires is not None:
        def fits(i: EncoderInfo) -> bool:
            return i.has_region_decoder or (requires == "decoder" and i.has_pixel_decoder)

        left_out = [r.name for r in runs if not fits(r.info)]
        runs = [r for r in runs if fits(r.info)]
        if left_out:
            st.caption(f"Without a {requires} (left out here): {', '.join(left_out)}")
        if not runs:
            st.warning(f"This page needs a {requires}: choose "
                       + ("an mae_*, rae_* or rmae_* run." if requires == "decoder" else "an rae_* or rmae_* run."))
            return None
    if not runs:
        return None
    if len(runs) < at_least:
        st.info(f"Choose {at_least} or more runs to compare them side by side (e.g. MAE and R-MAE).")
    return runs


def clickable(image: np.ndarray, key: str) -> None:
    """The clickable picture (its value is read from ``st.session_state[key]`` on the next run)."""
    try:
        from streamlit_image_coordinates import streamlit_image_coordinates
    except ImportError:  # pragma: no cover - dev extra missing: the fallback inputs still work
        st.image(image)
        return
    streamlit_image_coordinates(image, key=key, cursor="crosshair")


def new_click(key: str) -> tuple[float, float] | None:
    """A click not seen before on the clickable image ``key`` → relative point."""
    value = st.session_state.get(key)
    if not value or value == st.session_state.get(f"{key}__seen"):
        return None
    st.session_state[f"{key}__seen"] = value
    return I.click_to_point(value)

