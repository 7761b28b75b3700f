"""``results.json`` as a typed object: what ``rmae analyze`` writes and the report, dashboard and
notebooks read.

Layout (keys are stable; metric names come from :mod:`analysis.registry`)::

    {"version": 1, "data": SPEC, "n_images": N, "seed": S, "reference": RUN,
     "runs": {RUN: {"path", "family", "model", "role", "config", "metrics": {NAME: ESTIMATE}}},
     "differences": {"A − B": {NAME: ESTIMATE with "scope"}},
     "baselines": {"interactive_iou": {BASELINE: ESTIMATE}},
     "cka": {RUN: {"a", "b", "matrix"}}, ... any other top-level keys are kept as ``meta``}

    ESTIMATE = {"value": float|null, "ci": [lo, hi]|null,
                "per_layer": [...], "per_layer_ci": [[lo, hi]|null, ...],   (per-layer metrics)
                ... any other keys (unit, clicks, per_click, n_pairs, scope, best_lr …) in ``extra``}

Reading is tolerant: a value of the wrong type becomes None and is listed in
:attr:`Results.problems` (the dashboard shows them and keeps the rest of the page); only a file
that is not JSON, or not an analysis result at all, raises :class:`ResultsError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmae.errors import UserError
from rmae.io import atomic_write_json, read_text

RESULTS_VERSION = 1
PER_IMAGE_FILE = "per_image.npz"
MAX_RESULTS_BYTES = 16 * 2**20  # real results are KB–MB; more is not an analysis result
DASH = "—"


class ResultsError(UserError, ValueError):
    """A results file that cannot be read as analysis results; the message says why."""


def finite(x: Any) -> float | None:
    """A finite float, or None (for None, NaN, inf, bools, strings and other junk)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def interval(x: Any) -> tuple[float, float] | None:
    """``[lo, hi]`` of two finite numbers, else None."""
    if isinstance(x, (list, tuple)) and len(x) == 2:
        lo, hi = finite(x[0]), finite(x[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def format_value(value: Any, ci: Any = None, digits: int = 3) -> str:
    """``0.123 [0.100, 0.150]``, or ``—`` for a missing value: the one formatter."""
    v = finite(value)
    if v is None:
        return DASH
    s = f"{v:.{digits}f}"
    c = interval(ci)
    return s + (f" [{c[0]:.{digits}f}, {c[1]:.{digits}f}]" if c else "")


@dataclass
class Estimate:
    """A metric's value with its interval, and per-layer values for per-layer metrics."""

    value: float | None = None
    ci: tuple[float, float] | None = None
    per_layer: list[float | None] | None = None
    per_layer_ci: list[tuple[float, float] | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:  # dict-style access for the extra keys
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    @property
    def formatted(self) -> str:
        return format_value(self.value, self.ci)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"value": finite(self.value), "ci": list(self.ci) if self.ci else None}
        if self.per_layer is not None:
            d["per_layer"] = [finite(v) for v in self.per_layer]
            d["per_layer_ci"] = [list(c) if c else None for c in (self.per_layer_ci or [None] * len(self.per_layer))]
        d.update(_jsonable(self.extra))
        return d

    @classmethod
    def from_json(cls, d: Any, where: str, problems: list[str]) -> "Estimate | None":
        if not isinstance(d, dict):
            problems.append(f"{where}: not an estimate ({type(d).__name__}); ignored")
            return None
        est = cls(value=finite(d.get("value")), ci=interval(d.get("ci")))
        if d.get("value") is not None and est.value is None:
            problems.append(f"{where}: value {str(d.get('value'))[:40]!r} is not a number; shown as {DASH}")
        per = d.get("per_layer")
        if per is not None:
            if isinstance(per, list):
                est.per_layer = [finite(v) for v in per]
                cis = d.get("per_layer_ci")
                est.per_layer_ci = [interval(c) for c in cis] if isinstance(cis, list) and len(cis) == len(per) \
                    else [None] * len(per)
            else:
                problems.append(f"{where}: per_layer is not a list; ignored")
        est.extra = {k: v for k, v in d.items() if k not in ("value", "ci", "per_layer", "per_layer_ci")}
        return est


@dataclass
class RunResult:
    name: str
    path: str = ""
    family: str = ""
    model: str = ""
    role: str = "run"  # "run", or "control" for the null / ceiling references
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Estimate] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {"path": self.path, "family": self.family, "model": self.model, "role": self.role,
             "config": _jsonable(self.config), "metrics": {k: v.to_json() for k, v in self.metrics.items()}}
        d.update(_jsonable(self.extra))
        return d


@dataclass
class Results:
    data: str = ""
    n_images: int = 0
    seed: int = 0
    reference: str = ""
    runs: dict[str, RunResult] = field(default_factory=dict)
    differences: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    baselines: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    cka: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: per-image (or per-pair) values behind the estimates, ``{run: {metric: array}}``; saved beside
    #: results.json as ``per_image.npz`` (not JSON), read by ``rmae study`` to nest images in seeds
    per_image: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    # -- access --------------------------------------------------------------------------------

    def metric(self, run: str, name: str) -> Estimate | None:
        r = self.runs.get(run)
        return r.metrics.get(name) if r else None

    def run_names(self, role: str | None = None) -> list[str]:
        return [n for n, r in self.runs.items() if role is None or r.role == role]

    # -- JSON ----------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": RESULTS_VERSION, "data": self.data, "n_images": self.n_images, "seed": self.seed,
                             "reference": self.reference, "runs": {n: r.to_json() for n, r in self.runs.items()},
                             "differences": {c: {k: e.to_json() for k, e in d.items()} for c, d in self.differences.items()},
                             "baselines": {m: {b: e.to_json() for b, e in d.items()} for m, d in self.baselines.items()}}
        if self.cka:
            d["cka"] = _jsonable(self.cka)
        d.update(_jsonable(self.meta))
        return d

    def save(self, path: str | Path) -> Path:
        """``results.json`` at ``path`` and, when there are per-image values, ``per_image.npz`` beside it."""
        path = Path(path)
        if self.per_image:
            import numpy as np

            from rmae.io import atomic_write

            arrays = {f"{run}/{key}": np.asarray(v) for run, vals in self.per_image.items() for key, v in vals.items()}

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)

            atomic_write(path.with_name(PER_IMAGE_FILE), write)
        return atomic_write_json(path, self.to_json(), indent=1)

    def load_per_image(self, folder: str | Path) -> dict[str, dict[str, Any]]:
        """The per-image arrays saved beside ``folder/results.json`` (empty if there are none)."""
        import numpy as np

        f = Path(folder) / PER_IMAGE_FILE
        if not f.is_file():
            return {}
        out: dict[str, dict[str, Any]] = {}
        with np.load(f, allow_pickle=False) as z:
            for name in z.files:
                run, _, key = name.rpartition("/")
                out.setdefault(run, {})[key] = z[name]
        self.per_image = out
        return out

    @classmethod
    def from_json(cls, doc: Any, where: str = "results.json") -> "Results":
        if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict):
            raise ResultsError(f"{where}: not an `rmae analyze` results file (no 'runs' mapping)")
        version = doc.get("version", RESULTS_VERSION)
        if version != RESULTS_VERSION:
            raise ResultsError(f"{where}: results version {str(version)[:20]!r}; this rmae reads version {RESULTS_VERSION}")
        problems: list[str] = []
        res = cls(data=str(doc.get("data", "")), seed=_int(doc.get("seed")), n_images=_int(doc.get("n_images")),
                  reference=str(doc.get("reference", "")), problems=problems)
        for name, r in doc["runs"].items():
            if not isinstance(r, dict):
                problems.append(f"run {name}: not a mapping; ignored")
                continue
            metrics = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
            if "metrics" in r and not isinstance(r.get("metrics"), dict):
                problems.append(f"run {name}: metrics is not a mapping; ignored")
            est = {k: e for k, v in metrics.items() if (e := Estimate.from_json(v, f"run {name} / {k}", problems))}
            known = {"path", "family", "model", "role", "config", "metrics"}
            res.runs[str(name)] = RunResult(
                name=str(name), path=_str(r.get("path")), family=_str(r.get("family")), model=_str(r.get("model")),
                role=_str(r.get("role")) or "run", config=r.get("config") if isinstance(r.get("config"), dict) else {},
                metrics=est, extra={k: v for k, v in r.items() if k not in known})
        for section, target in (("differences", res.differences), ("baselines", res.baselines)):
            raw = doc.get(section) or {}
            if not isinstance(raw, dict):
                problems.append(f"{section}: not a mapping; ignored")
                continue
            for group, entries in raw.items():
                if not isinstance(entries, dict):
                    problems.append(f"{section} / {group}: not a mapping; ignored")
                    continue
                target[str(group)] = {k: e for k, v in entries.items()
                                      if (e := Estimate.from_json(v, f"{section} / {group} / {k}", problems))}
        cka = doc.get("cka")
        res.cka = cka if isinstance(cka, dict) else {}
        res.meta = {k: v for k, v in doc.items()
                    if k not in ("version", "data", "n_images", "seed", "reference", "runs", "differences", "baselines", "cka")}
        return res

    @classmethod
    def load(cls, path: str | Path) -> "Results":
        """Read ``results.json`` (a regular file of bounded size; see module docstring)."""
        path = Path(path)
        try:
            text = read_text(path, MAX_RESULTS_BYTES)
        except UnicodeDecodeError:
            raise ResultsError(f"{path.name}: not UTF-8 text; re-run `rmae analyze`") from None
        except (OSError, ValueError) as e:
            raise ResultsError(f"{path.name}: cannot read ({e})") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path.name}: not valid JSON ({e.msg} at line {e.lineno}); re-run `rmae analyze`") from None
        except RecursionError:
            raise ResultsError(f"{path.name}: nested too deeply to be analysis results") from None
        return cls.from_json(doc, path.name)


def _int(x: Any) -> int:
    v = finite(x)
    return int(v) if v is not None else 0


def _str(x: Any) -> str:
    return x if isinstance(x, str) else ("" if x is None else str(x))


def _jsonable(obj: Any) -> Any:
    """Strict-JSON form: NaN / inf → None, tuples → lists, numpy scalars → Python numbers."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, int):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    return str(obj)
