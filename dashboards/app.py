"""The Streamlit script: ``streamlit run dashboards/app.py -- --runs DIR [--device D]`` (what
``rmae dashboard`` starts). The runs root comes from ``--runs`` after ``--``, or from
``$RMAE_DASHBOARD_RUNS`` (used by tests, where the script runs inside pytest); the device from
``--device`` or ``$RMAE_DASHBOARD_DEVICE`` (default ``auto``).

Each run of the script draws the navigation and the shared sidebar (:mod:`dashboards.state`)
and then the chosen page, one file each under ``dashboards/views/``. (Not ``pages/``: Streamlit
treats a ``pages/`` folder beside the main script as a legacy multipage app and, on a server's
first run and on every ``AppTest`` run, executes a page file by its URL without this script —
so without the sidebar and its context.)
"""

from __future__ import annotations

import argparse
import os
import sys

import streamlit as st

from dashboards import state

#: (file under dashboards/, title, url path, icon, whether the page shows an image from the picker)
PAGES = [
    ("views/attention.py", "Attention explorer", "attention", ":material/center_focus_strong:", True),
    ("views/reconstruction.py", "Reconstruction", "reconstruction", ":material/auto_fix_high:", True),
    ("views/segmentation.py", "Interactive segmentation", "segmentation", ":material/touch_app:", True),
    ("views/attribution.py", "Attributions", "attributions", ":material/gradient:", True),
    ("views/featuremaps.py", "Feature maps", "feature-maps", ":material/palette:", True),
    ("views/metrics.py", "Metrics and probes", "metrics", ":material/monitoring:", False),
    ("views/runs.py", "Runs", "runs", ":material/folder_open:", False),
]

def arguments(argv: list[str]) -> tuple[str | None, str]:
    """(runs root, device) from the script's arguments or the environment."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs", default=None)
    parser.add_argument("--device", default=None)
    args, _ = parser.parse_known_args(argv)
    return (args.runs or os.environ.get("RMAE_DASHBOARD_RUNS"),
            args.device or os.environ.get("RMAE_DASHBOARD_DEVICE") or "auto")


def main() -> None:
    st.set_page_config(page_title="rmae — MAE vs R-MAE explorer", page_icon="🔍", layout="wide")
    page = st.navigation([st.Page(path, title=title, url_path=url, icon=icon, default=i == 0)
                          for i, (path, title, url, icon, _) in enumerate(PAGES)])
    with_image = next(image for _, title, _, _, image in PAGES if title == page.title)
    runs, device = arguments(sys.argv[1:])
    ctx = state.sidebar(runs, device, with_image)
    if ctx is not None:
        state.run_page(page, ctx)


if __name__ == "__main__":  # run by Streamlit (importing this module draws nothing)
    main()
