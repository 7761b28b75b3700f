"""dashboards — the Streamlit attention explorer (``rmae dashboard --runs DIR``).

Modules: ``app`` (the Streamlit script: navigation, sidebar, the chosen page), ``state`` (what
the pages share: the sidebar's choices, cached loaders, the forward lock), ``widgets`` (the image
pages' run filter and clickable picture), ``views/`` (one file per page), ``cli`` (the
``rmae dashboard`` subcommand: the server, with its Origin/Host settings), ``runs`` (the runs
root: the one place every opened path is confined), ``discovery`` (what is under it: runs,
studies, image folders, reports), ``images``
(pictures and points), ``compute`` (what the models compute for the pages), ``results``
(analysis results, logs and configs → tables and plotly figures), ``study`` (a study's results
across seeds → figures and tables) and ``jobs`` (``rmae analyze`` as a background job). Only ``app``, ``state``, ``widgets`` and ``views`` import
Streamlit; the rest is plain Python, tested and benchmarked directly. Nothing here imports
``rmae.train``.
"""
