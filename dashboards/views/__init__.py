"""The dashboard's pages, one file each, run by ``st.navigation`` from ``dashboards/app.py``
(the folder is not called ``pages/``: see ``app.py``).

Each file defines ``render(ctx)`` (``ctx``: :class:`dashboards.state.Ctx`, what the sidebar chose)
and calls it through :func:`dashboards.state.show` when Streamlit runs the file; importing a page
draws nothing. ``study.py`` is not a page: it is the metrics page's view of a study.
"""
