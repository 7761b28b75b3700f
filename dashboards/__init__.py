"""dashboards — the Streamlit attention explorer (``rmae dashboard --runs DIR``).

Modules: ``app`` (the Streamlit script), ``cli`` (the ``rmae dashboard`` subcommand),
``runs`` (the runs root: discovery and path safety), ``compute`` (Streamlit-free render-path
functions: images, attention views, overlays, reconstructions, clicks), ``results``
(``results.json`` and ``metrics.jsonl`` readers, plotly figures) and ``pages`` (one function per
page). Only ``app`` and ``pages`` import Streamlit; the rest is plain Python, tested and
benchmarked directly.
"""
