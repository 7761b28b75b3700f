"""The metrics page's view of a study (``rmae study``; not a page of its own): every metric across
seeds — per-seed points and the across-seed interval per configuration, per-layer curves with a
band and a thin line per seed —, the seed-paired differences with their scope, the controls, and
the runs of each configuration (looked up in the study's own ``runs/`` by :meth:`RunsRoot.study_run`)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis.registry import LAYER_METRICS, metric
from analysis.results import Results
from dashboards import results as R
from dashboards import state
from dashboards import study as S
from dashboards.runs import SeedRun
from rmae.errors import UserError


def _seed_runs(ctx: state.Ctx, report: str, data: Results, configs: list[str]) -> list[SeedRun]:
    return [ctx.root.study_run(report, c, seed, recorded) for c in configs for seed, recorded in S.seeds_of(data, c)]


def _seed_curves(ctx: state.Ctx, report: str, runs: list[SeedRun], names: list[str]
                 ) -> tuple[dict[str, dict[str, list[list]]], list[str]]:
    """{metric: {configuration: [per-layer values of each seed]}} from each seed's own analysis,
    and a message for each seed whose analysis cannot be read."""
    curves: dict[str, dict[str, list[list]]] = {n: {} for n in names}
    problems = []
    for r in runs:
        if r.run is None:
            continue
        rel = ctx.root.study_analysis(report, r.name)
        try:
            path = ctx.root.file(rel, "results file")
            seed_res = state.results(str(path), path.stat().st_mtime_ns)
        except (UserError, OSError) as e:
            problems.append(f"Seed {r.seed} of **{r.configuration}**: its analysis cannot be read ({e}); its "
                            "per-layer lines are left out")
            continue
        own = seed_res.runs.get(r.name) or next(iter(seed_res.runs.values()), None)
        for n in names:
            est = own.metrics.get(n) if own else None
            if est is not None and est.per_layer:
                curves[n].setdefault(r.configuration, []).append(est.per_layer)
    return curves, problems


def _runs_table(runs: list[SeedRun]) -> None:
    st.subheader("Runs of this study")
    if not runs:
        st.caption("This study's results list no run folders.")
        return
    st.dataframe(pd.DataFrame([{"configuration": r.configuration, "seed": str(r.seed), "run folder": r.run or "—",
                                "status": r.problem or "ok"} for r in runs]), hide_index=True)
    for r in runs:
        if r.problem:
            st.warning(f"Seed {r.seed} of **{r.configuration}**: {r.problem}")


def _figures(data: Results, configs: list[str], names: list[str], curves: dict, problems: list[str]) -> None:
    layered = list(curves)
    if layered:
        st.subheader("Per layer: mean over seeds (band: 95 % CI across seeds; thin lines: each seed)")
        cols = st.columns(2)
        for i, n in enumerate(layered):
            cols[i % 2].plotly_chart(S.seed_layer_figure(data, n, configs, curves[n]), key=f"fig-seedlayer-{n}")
        for p in problems:
            st.warning(p)
    if names:
        st.subheader("Each metric across seeds (points: seeds; bar: mean with 95 % CI across seeds)")
        cols = st.columns(2)
        for i, n in enumerate(names):
            cols[i % 2].plotly_chart(S.seed_figure(data, n, configs), key=f"fig-seeds-{n}")
            cols[i % 2].caption(R.metric_help(n))
    st.subheader("Values (mean over seeds [95 % CI across seeds])")
    st.dataframe(R.scalar_table(data, configs))
    fig = R.interactive_figure(data, configs)
    if fig is not None:
        st.subheader("Interactive segmentation (mean over seeds)")
        st.plotly_chart(fig, key="fig-interactive")


def _differences(data: Results) -> None:
    table = S.differences_table(data)
    if table is None:
        return
    st.subheader("Seed-paired differences")
    st.caption("Seed s of one configuration minus seed s of the reference (same initial weights seed, data order "
               "and masks). Scope \"method\": both sides have at least two seeds, so the interval speaks for the "
               "method; \"checkpoint\": one seed, it speaks for those checkpoints only.")
    st.dataframe(table, hide_index=True)
    keys = list(dict.fromkeys(k for e in data.differences.values() for k in e))
    if st.session_state.get("study_diff") not in keys:
        st.session_state["study_diff"] = keys[0] if keys else None
    key = st.selectbox("Difference to plot", keys, key="study_diff", format_func=lambda k: metric(k).title)
    fig = S.difference_figure(data, key) if key else None
    if fig is not None:
        st.plotly_chart(fig, key="fig-study-diff")


def _controls(data: Results) -> None:
    if not S.controls(data):
        return
    st.subheader("Controls")
    st.caption("Reference encoders analysed once on the same images (content-free, local, random-init, oracle): "
               "where a metric's null and ceiling lie. Shown as grey diamonds in the figures above.")
    st.dataframe(R.scalar_table(data, S.controls(data)), key="study-controls")


def render(ctx: state.Ctx, report: str, data: Results) -> None:
    every = S.configurations(data)
    seeds = data.meta.get("seeds")
    seeds_text = ", ".join(map(str, seeds[:20])) if isinstance(seeds, list) else "?"
    st.caption(f"Study `{report}` · {len(every)} configuration(s) · seeds {seeds_text} · data `{data.data or '?'}` · "
               f"{data.n_images} images. Seeds are the unit: each point is one seed's value, each bar the mean over "
               "seeds with its 95 % interval across seeds (images nested inside).")
    wrong = S.problems(data)
    if wrong:
        st.warning(f"{report}/results.json has study entries of the wrong type; they are left out and the rest is "
                   "shown:\n" + "\n".join(f"- {p}" for p in wrong[:20]))
    st.session_state["study_configs"] = state.still_there(st.session_state.get("study_configs"), every)
    configs = st.multiselect("Configurations", every, key="study_configs")
    names = S.metrics_present(data, configs)
    runs = _seed_runs(ctx, report, data, configs)
    layered = [n for n in names if n in LAYER_METRICS and any((e := data.metric(c, n)) and e.per_layer for c in configs)]
    curves, problems = _seed_curves(ctx, report, runs, layered)
    _figures(data, configs, names, curves, problems)
    _differences(data)
    _controls(data)
    _runs_table(runs)
