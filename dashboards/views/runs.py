"""Runs: every run folder under the root with its training progress (a study's runs grouped under
the study's name), the selected runs' training curves, their configs side by side and their latest
reconstruction figures."""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from analysis.results import DASH, finite
from dashboards import results as R
from dashboards import state
from dashboards.discovery import RunEntry
from rmae.errors import UserError


def _overview_row(ctx: state.Ctx, entry: RunEntry, logs: dict[str, list[dict]]) -> dict:
    """One line of the overview; the run's training log goes into ``logs``."""
    row = {"run": entry.short, "family": entry.family or DASH, "model": entry.model or DASH,
           "img_size": entry.img_size, "steps logged": 0, "last step": None, "last loss": DASH,
           "status": entry.problem or "ok"}
    if entry.problem:
        return row
    try:
        run = ctx.root.run_folder(entry.name)
        if not os.path.lexists(run.metrics_path):
            row["status"] = "no metrics.jsonl"
            return row
        log = ctx.root.file(run.metrics_path, "training log")
        rows, bad = state.training_log(entry.name, str(ctx.root.root), log.stat().st_mtime_ns)
    except (UserError, OSError) as e:
        row["status"] = ctx.root.relativize(str(e))
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
            configs[name] = ctx.root.run_config(ctx.root.run_folder(name))
        except (UserError, OSError) as e:  # a broken config.yaml is shown as such
            st.error(f"Run **{name}**: {ctx.root.relativize(str(e))}")
    if configs:
        table = R.config_table(configs, only)
        st.dataframe(table, height=min(36 * (len(table) + 1) + 4, 900))


def _latest_png(ctx: state.Ctx, name: str) -> tuple[str, bytes] | None:
    """(file name, bytes) of the run's newest ``figures/*.png``, or None without one; a file that
    cannot be read is an error naming it (the rest of the page stays)."""
    run = ctx.root.run_folder(name)
    if not os.path.lexists(run.figures):
        return None
    entries, _ = ctx.root.listdir(run.figures)
    pngs = []
    for p in entries:
        if p.suffix.lower() == ".png":
            try:
                pngs.append((p.lstat().st_mtime_ns, p))
            except OSError:
                continue
    if not pngs:
        return None
    newest = max(pngs)[1]
    return newest.name, ctx.root.read_bytes(newest, "figure")


def _figures(ctx: state.Ctx, chosen: list[str]) -> None:
    figures = []
    for name in chosen:
        try:
            png = _latest_png(ctx, name)
        except UserError as e:
            st.error(f"Run **{name}**: its latest figure cannot be shown: {e}")
            continue
        if png:
            figures.append((name, *png))
    if figures:
        with st.expander("Latest training figures (reconstructions written by the trainer)"):
            for name, file, data in figures:
                st.image(data, caption=f"{name}: {file}")


def _overview(ctx: state.Ctx, logs: dict[str, list[dict]]) -> None:
    """One table of the runs outside studies, then one per study under its name."""
    groups: dict[str | None, list[dict]] = {}
    for entry in ctx.disc.runs:
        groups.setdefault(entry.study, []).append(_overview_row(ctx, entry, logs))
    if groups.get(None):
        st.dataframe(pd.DataFrame(groups[None]).set_index("run"))
    for study in sorted(k for k in groups if k is not None):
        st.subheader(f"Study {study}")
        st.dataframe(pd.DataFrame(groups[study]).set_index("run"), key=f"study-runs-{study}")


def render(ctx: state.Ctx) -> None:
    st.header("Runs")
    logs: dict[str, list[dict]] = {}
    _overview(ctx, logs)
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
