"""Metrics and probes: a report's per-layer curves, per-run table, interactive-segmentation curves,
differences and CKA (a study's report: its view across seeds, :mod:`dashboards.views.study`); probe
results stored in the run folders; and "Compute what is missing", which runs ``rmae analyze`` for
the selected runs as a background job (:mod:`dashboards.jobs`) and selects its report when it
finishes. A report or a probe file that cannot be read is one message; the rest of the page stays."""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from analysis.registry import METRICS, PROBE_KEYS, metric
from analysis.results import Results, ResultsError
from dashboards import results as R
from dashboards import state
from dashboards import study as S
from dashboards.jobs import analyze_command
from dashboards.discovery import RunEntry
from dashboards.runs import RunsRoot, UnsafePathError
from dashboards.views import study as study_view
from rmae.errors import UserError

#: seconds between status checks of a running job in the browser
POLL_SECONDS = 2.0
MAX_PROBE_FILES = 200


# ------------------------------------------------------------------------------------------
# a report


def _load(ctx: state.Ctx) -> tuple[str, Results] | None:
    """The chosen report and its results (their problems shown as a warning), or None."""
    reports = ctx.disc.reports
    if st.session_state.get("_report_next") in reports:
        st.session_state["report"] = st.session_state.pop("_report_next")
    if not reports:
        st.info("No `results.json` under the runs root yet: compute one below (or run "
                "`rmae analyze RUN_A RUN_B --data scenes:val --out <runs root>/reports/NAME`).")
        return None
    if st.session_state.get("report") not in reports:
        st.session_state["report"] = reports[0]
    report = st.selectbox("Report", reports, key="report",
                          format_func=lambda r: f"{r}  (study)" if r in ctx.disc.studies else r)
    try:
        path = ctx.root.results_file(report)
        data = state.results(str(path), path.stat().st_mtime_ns)
    except ResultsError as e:  # its message starts with the file's name
        st.error(f"{report}/{e}")
        return None
    except (UserError, OSError) as e:  # names the file relative to the root
        st.error(str(e))
        return None
    if data.problems:
        shown = "\n".join(f"- {p}" for p in data.problems[:20])
        more = f"\n- … and {len(data.problems) - 20} more" if len(data.problems) > 20 else ""
        st.warning(f"{report}/results.json has entries of the wrong type; they are left out and the rest is "
                   f"shown (re-run `rmae analyze` to rewrite it):\n{shown}{more}")
    return report, data


def linked_runs(root: RunsRoot, data: Results) -> tuple[dict[str, str], list[str]]:
    """The run folder (relative name) each run of a report was analysed from, when its recorded
    path (absolute, or relative to the root) lies inside the root; and a message for each path
    that leads outside (resolved by :meth:`RunsRoot.inside`: never opened)."""
    links, outside = {}, []
    for name, run in data.runs.items():
        if not run.path or run.role not in ("run", ""):
            continue
        try:
            links[name] = root.rel(root.inside(run.path))
        except UnsafePathError:
            outside.append(f"{name} → {run.path[:200]}")
        except UserError:
            continue
    return links, outside


def _show(ctx: state.Ctx, data: Results) -> None:
    runs_all = list(data.runs)
    st.caption(f"data `{data.data or '?'}` · {data.n_images} images · seed {data.seed}")
    _, outside = linked_runs(ctx.root, data)
    if outside:
        st.caption("Recorded run paths outside the runs root (not linked to a run folder, not read): "
                   + "; ".join(outside))
    st.session_state["report_runs"] = state.still_there(st.session_state.get("report_runs"), runs_all)
    runs = st.multiselect("Runs in this report", runs_all, key="report_runs")
    present = R.layer_metrics_present(data, runs)
    if present:
        st.subheader("Per layer (bootstrap 95 % CI over images)")
        cols = st.columns(2)
        for i, name in enumerate(present):
            cols[i % 2].plotly_chart(R.layer_figure(data, name, runs), key=f"fig-{name}")
            cols[i % 2].caption(R.metric_help(name))
    st.subheader("Probes and last-layer values")
    st.dataframe(R.scalar_table(data, runs),
                 column_config={metric(k).title: st.column_config.Column(help=R.metric_help(k)) for k in R.TABLE_METRICS})
    fig = R.interactive_figure(data, runs)
    if fig is not None:
        st.subheader("Interactive segmentation")
        st.plotly_chart(fig, key="fig-interactive")
    diff = R.differences_table(data)
    if diff is not None:
        st.subheader("Differences")
        st.dataframe(diff, hide_index=True)
    for j, entry in enumerate(R.cka_entries(data)):
        st.plotly_chart(R.cka_figure(entry), key=f"fig-cka-{j}")


def _report(ctx: state.Ctx, report: str, data: Results) -> None:
    """A report (a study's: its view across seeds); a failure is one message for this report."""
    try:
        if S.is_study(data):
            study_view.render(ctx, report, data)
        else:
            _show(ctx, data)
    except Exception as e:  # noqa: BLE001 - one report must not take the page down
        if state.debug():
            raise
        st.error(f"{report}: cannot be shown ({type(e).__name__}: {e}); the rest of the page is below.")


def _probe_files(ctx: state.Ctx) -> None:
    """Probe results that ``rmae probe`` stored in the selected run folders; a file that cannot be
    read is one warning naming it."""
    found: dict[str, list[dict]] = {}
    problems = []
    for entry in ctx.selected:
        if entry.problem:
            continue
        try:
            folder = ctx.root.run_folder(entry.name).analysis_dir("probes")
            files = ctx.root.listdir(folder, MAX_PROBE_FILES)[0] if os.path.lexists(folder) else []
        except UserError as e:
            problems.append(f"Run **{entry.name}**: {e}")
            continue
        for f in files:
            if f.suffix != ".json":
                continue
            try:
                d = ctx.root.read_json(f, "probe result")
            except UserError as e:
                problems.append(f"Run **{entry.name}**: {e}")
                continue
            if isinstance(d, dict):
                found.setdefault(entry.name, []).append(d)
            else:
                problems.append(f"Run **{entry.name}**: {ctx.root.rel(f)}: not a probe result (a JSON object); left out")
    table = R.probe_files_table(found)
    if table is not None or problems:
        st.subheader("Probe results stored in the run folders (`rmae probe`)")
    if table is not None:
        st.dataframe(table, hide_index=True)
    for p in problems:
        st.warning(p)


# ------------------------------------------------------------------------------------------
# compute what is missing


def missing(data: Results | None, entries: list[RunEntry], links: dict[str, str] | None = None) -> dict[str, list[str]]:
    """For each selected run, the registered metrics the report lacks for it (all of them when it
    is not in the report; interactive ones only for runs with a region decoder). Runs are matched
    by the run folder the report's run was analysed from (``links``: :func:`linked_runs`), by name
    or by folder name (what ``analyze`` names them)."""
    by_key = {}
    for name, r in (data.runs if data else {}).items():
        by_key[name] = r
    for name, rel in (links or {}).items():
        by_key[rel] = data.runs[name]
    out: dict[str, list[str]] = {}
    for e in entries:
        r = by_key.get(e.name) or by_key.get(Path(e.name).name)
        expected = [k for k in METRICS if metric(k).group != "interactive" or e.family in ("rae", "rmae")]
        out[e.name] = [k for k in expected if r is None or k not in r.metrics]
    return out


def _finish_job(ctx: state.Ctx) -> None:
    """A job this session started has ended: select its report, or say why it failed."""
    key = st.session_state.get("an_job")
    if not key:
        return
    job = state.jobs().get(key)
    status = job.status() if job else None
    if status is not None and status.running:
        return
    del st.session_state["an_job"]
    if status is None:  # the board was reset (cache cleared): nothing to report
        return
    rel = ctx.root.rel(job.report_dir)
    if status.state == "done":
        state.discover.clear()
        state.results.clear()
        st.session_state["_report_next"] = rel  # selected on the next run (the selectbox exists already)
        st.session_state["_flash"] = f"Wrote {rel}/results.json ({job.label}) in {status.seconds:.0f} s"
        st.rerun()
    st.error(f"The analysis for {rel} failed after {status.seconds:.0f} s: {status.message}  "
             f"(full log: `{rel}/analyze.log`)")


@st.fragment(run_every=POLL_SECONDS)
def _job_status(root: RunsRoot, key: str) -> None:
    """While this session's job runs: its status, refreshed on a timer; when it ends, a rerun of
    the whole page (which :func:`_finish_job` takes from there)."""
    job = state.jobs().get(key)
    if job is None:
        return
    status = job.status()
    if not status.running:
        st.rerun()
    rel = root.rel(job.report_dir)
    st.info(f"Analysing in the background: {job.label} → `{rel}/` ({status.seconds:.0f} s so far; "
            f"log: `{rel}/analyze.log`). The report opens here when it is done.")


def _checked_run(root: RunsRoot, name: str) -> Path:
    """A run folder handed to ``rmae analyze``, its config and weights checked now (the analysis
    reads them in its own process)."""
    folder = root.run_folder(name)
    if os.path.lexists(folder.config_path):
        root.run_config(folder)
    root.weights(folder)
    return folder.root


def _compute_missing(ctx: state.Ctx, data: Results | None) -> None:
    running = bool(st.session_state.get("an_job"))
    if running:
        _job_status(ctx.root, st.session_state["an_job"])
    with st.expander("Compute what is missing", expanded=data is None):
        entries = [r for r in ctx.selected if not r.problem]
        if not entries:
            st.info("Choose runs in the sidebar first.")
            return
        links = linked_runs(ctx.root, data)[0] if data is not None else {}
        lines = [f"- **{run}**: " + (", ".join(keys) if keys else "nothing missing")
                 for run, keys in missing(data, entries, links).items()]
        st.markdown("Missing from this report for the selected runs:\n" + "\n".join(lines))
        c1, c2, c3 = st.columns(3)
        n = int(c1.number_input("Images (scenes:val)", 8, 5000, 200, step=8, key="an_n"))
        name = c2.text_input("Report name (under reports/)", "dashboard", key="an_name")
        probes = c3.multiselect("Probes", list(PROBE_KEYS), list(PROBE_KEYS), key="an_probes")
        st.caption("Runs `rmae analyze` in the background and writes (or overwrites) `reports/<name>/` under the "
                   "runs root with every metric for the selected runs on the same images. Probes train on "
                   "scenes:train and dominate the time.")
        if not st.button("Compute", key="an_go", type="primary", disabled=running):
            return
        try:
            out = ctx.root.report_dir(name.strip())
            paths = [_checked_run(ctx.root, e.name) for e in entries]
            state.jobs().start(out, analyze_command(paths, out, n, probes),
                               label=f"{', '.join(p.name for p in paths)}, scenes:val:{n}")
        except (UserError, OSError) as e:
            st.error(ctx.root.relativize(str(e)))
            return
        st.session_state["an_job"] = str(out)
        st.rerun()


def render(ctx: state.Ctx) -> None:
    st.header("Metrics and probes")
    _finish_job(ctx)
    if "_flash" in st.session_state:
        st.success(st.session_state.pop("_flash"))
    loaded = _load(ctx)
    if loaded is not None:
        _report(ctx, *loaded)
    _probe_files(ctx)
    _compute_missing(ctx, loaded[1] if loaded else None)


if __name__ == "__main__":  # run by st.navigation
    state.show(render)
