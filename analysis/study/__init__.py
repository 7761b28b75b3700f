"""Studies across seeds (``rmae study``): many configurations × seeds trained, analysed on the same
images, and reported across seeds — seeds are the unit of evidence about a method.

Modules: ``plan`` (configurations, seeds, folders), ``runner`` (parallel jobs), ``study`` (the
pipeline), ``aggregate`` (across-seed statistics), ``report`` (markdown, the paper's claims),
``cli`` (the command).
"""

from .aggregate import aggregate
from .plan import FAMILIES, Configuration, PlannedRun, configurations, parse_grid, plan
from .study import StudyConfig, StudyError, run_study

__all__ = ["FAMILIES", "Configuration", "PlannedRun", "StudyConfig", "StudyError", "aggregate", "configurations",
           "parse_grid", "plan", "run_study"]
