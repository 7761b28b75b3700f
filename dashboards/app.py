"""The Streamlit script: ``streamlit run dashboards/app.py -- --runs DIR`` (what ``rmae dashboard``
starts). The runs root comes from ``--runs`` after ``--``, or from ``$RMAE_DASHBOARD_RUNS``
(used by tests, where the script runs inside pytest)."""

from __future__ import annotations

import argparse
import os
import sys

import streamlit as st

st.set_page_config(page_title="rmae — MAE vs R-MAE explorer", page_icon="🔍", layout="wide")

from dashboards.pages import main  # noqa: E402  (after set_page_config)


def _runs_root() -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.runs or os.environ.get("RMAE_DASHBOARD_RUNS")


main(_runs_root())
