"""dashboards — the Streamlit attention explorer (``rmae dashboard --runs DIR``).

Modules: ``app`` (the Streamlit script: navigation, sidebar, the chosen page), ``state`` (what
the pages share: the sidebar's choices, cached loaders, the forward lock), ``widgets`` (the image
pages' run filter and clickable picture), ``views/`` (one file per page), ``cli`` (the
``rmae dashboard`` subcommand), ``runs`` (the runs root: discovery and path confinement),
``images`` (pictures and points), ``compute`` (what the models compute for the pages),
``results`` (analysis results, logs and configs → tables and plotly figures) and ``jobs``
(``rmae analyze`` as a background job). Only ``app``, ``state``, ``widgets`` and ``views`` import
Streamlit; the rest is plain Python, tested and benchmarked directly. Nothing here imports
``rmae.train``.
"""
