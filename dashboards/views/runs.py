"""Runs: every run folder under the root with its training progress, the selected runs' training
curves, their configs side by side and their latest reconstruction figures."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.results import DASH, finite
from dashboards import results as R
from dashboards import state
from dashboards.runs import RunEntry, UnsafePathError
from rmae.errors import RunFolderError


def _overview_row(ctx: state.Ctx, entry: RunEntry, logs: dict[str, list[dict]]) -> dict:
    """One line of the overview; the run's training log goes into ``logs``."""
    row = {"run": entry.name, "family": entry.family or DASH, "model": entry.model or DASH,
           "img_size": entry.img_size, "steps logged": 0, "last step": None, "last loss": DASH,
           "status": entry.problem or "ok"}
    if entry.problem:
        return row
    try:
        run = ctx.root.run_folder(entry.name)
        if not run.metrics_path.is_file():
            row["status"] = "no metrics.jsonl"
            return row
        rows, bad = state.training_log(entry.name, str(ctx.root.root), run.metrics_path.stat().st_mtime_ns)
    except (UnsafePathError, RunFolderError, OSError) as e:
        row["status"] = str(e)
        return row
    if rows:
        logs[entry.name] = rows
        loss = finite(rows[-1].get("loss"))
        row.update({"steps logged": len(rows), "last step": rows[-1].get("step"),
                    "last loss": f"{loss:.4f}" if loss is not None else DASH})
    if bad:
        row["status"] = f"ok ({bad} unreadable log line(s) skipped)"
    return row


def _curves(logs: dict[str, list[dict]]) -> None:
    keys = R.numeric_keys([r for rows in logs.values() for r in rows])
    if not keys:
        return
    c1, c2 = st.columns([3, 1])
    if st.session_state.get("train_metric") not in keys:
        st.session_state["train_metric"] = "loss" if "loss" in keys else keys[0]
    key = c1.selectbox("Training curve", keys, key="train_metric")
    log_y = c2.checkbox("log y", key="train_log")
    st.plotly_chart(R.training_figure(logs, key, log_y), key="fig-train")


def _configs(ctx: state.Ctx, chosen: list[str]) -> None:
    st.subheader("Configs side by side")
    only = st.checkbox("Only keys that differ", key="cfg_diff")
    configs = {}
    for name in chosen:
        try:
            configs[name] = ctx.root.run_folder(name).read_config()
        except (UnsafePathError, RunFolderError, OSError) as e:  # a broken config.yaml is shown as such
            st.error(f"Run **{name}**: {e}")
    if configs:
        table = R.config_table(configs, only)
        st.dataframe(table, height=min(36 * (len(table) + 1) + 4, 900))


def _figures(ctx: state.Ctx, chosen: list[str]) -> None:
    figures = []
    for name in chosen:
        try:
            folder = ctx.root.inside(ctx.root.run_folder(name).figures)
        except (UnsafePathError, OSError):
            continue
        pngs = sorted((p for p in folder.glob("*.png") if ctx.root.is_inside(p)), key=lambda p: p.stat().st_mtime) \
            if folder.is_dir() else []
        if pngs:
            figures.append((name, pngs[-1]))
    if figures:
        with st.expander("Latest training figures (reconstructions written by the trainer)"):
            for name, png in figures:
                st.image(str(png), caption=f"{name}: {png.name}")


def render(ctx: state.Ctx) -> None:
    st.header("Runs")
    logs: dict[str, list[dict]] = {}
    overview = [_overview_row(ctx, entry, logs) for entry in ctx.disc.runs]
    if overview:
        st.dataframe(pd.DataFrame(overview).set_index("run"))
    chosen = [r.name for r in ctx.selected]
    if not chosen:
        st.info("Choose runs in the sidebar to plot their training curves and compare their configs.")
        return
    selected_logs = {n: logs[n] for n in chosen if n in logs}
    if selected_logs:
        _curves(selected_logs)
    else:
        st.caption("The selected runs have no training log.")
    _configs(ctx, chosen)
    _figures(ctx, chosen)


if __name__ == "__main__":  # run by st.navigation
    state.show(render)
