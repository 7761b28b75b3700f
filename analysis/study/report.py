"""The study report: every metric across seeds, seed-paired differences with method-scope
verdicts, the controls, the paper's claims as reproduced / not reproduced / undecided, timing."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import METRICS, metric
from ..report import verdict
from ..results import Estimate, Results, format_value


@dataclass(frozen=True)
class Claim:
    """``better`` minus ``worse`` on ``metric`` should be > 0 (what the paper reports)."""

    text: str
    metric: str
    better: str  # a configuration role: mae | rmae-fh | rmae-gt | rae | scratch
    worse: str  # a role, or "baseline": the strongest interactive baseline given the same clicks


PAPER_CLAIMS = (
    Claim("(a) RAE alone is a real pre-text task: RAE beats a from-scratch encoder on the dense probe",
          "dense_miou", "rae", "scratch"),
    Claim("(b) R-MAE attends more to the query's own instance than MAE (locality-corrected)",
          "instance_selectivity", "rmae-fh", "mae"),
    Claim("(b) R-MAE localises objects at least as well as MAE (TokenCut CorLoc)", "corloc", "rmae-fh", "mae"),
    Claim("(b) R-MAE segments an instance from clicks better than the strongest baseline given the same clicks "
          "(MAE has no region decoder: the baselines are what it can do)", "interactive_iou", "rmae-fh", "baseline"),
    Claim("(c) MAE's global features are better for linear probing than R-MAE's", "linear_probe", "mae", "rmae-fh"),
    Claim("(d) R-MAE's attention is more local than MAE's (lower mean attention distance)",
          "attention_distance", "mae", "rmae-fh"),
)


def roles(results: Results) -> dict[str, str]:
    """The configuration playing each role of the paper's comparisons (first match wins)."""
    found: dict[str, str] = {}
    for label, run in results.runs.items():
        if run.role != "configuration":
            continue
        family = run.family
        source = run.config.get("region_source", "fh")
        others = {k for k in run.config if k not in ("family", "region_source")}
        if others:
            continue  # a grid variant (num_regions=1 …) is not the paper's default configuration
        role = {"mae": "mae", "rae": "rae", "scratch": "scratch"}.get(family) or (
            f"rmae-{source}" if family == "rmae" and source in ("fh", "gt") else None)
        if role and role not in found:
            found[role] = label
    return found


def _difference(results: Results, better: str, worse: str, key: str) -> Estimate | None:
    """better − worse from the stored differences (against the reference, combined by sign, or stored
    for that pair)."""
    ref = results.reference
    if f"{better} − {worse}" in results.differences:  # stored directly (e.g. rae − scratch)
        return results.differences[f"{better} − {worse}"].get(key)
    if worse == ref:
        return results.differences.get(f"{better} − {ref}", {}).get(key)
    if better == ref:
        d = results.differences.get(f"{worse} − {ref}", {}).get(key)
        if d is None or d.value is None:
            return d
        ci = (-d.ci[1], -d.ci[0]) if d.ci else None
        return Estimate(-d.value, ci, extra=dict(d.extra))
    return None  # neither side is the reference: not stored (compare them in their own study)


def claim_status(results: Results, claim: Claim) -> tuple[str, str]:
    """(status, evidence) — reproduced / not reproduced / undecided at this budget / not measured."""
    found = roles(results)
    if claim.worse == "baseline":
        found = {**found, "baseline": "the strongest baseline"}
    if claim.better not in found or claim.worse not in found:
        missing = [r for r in (claim.better, claim.worse) if r not in found]
        return "not measured", f"the study has no {' or '.join(missing)} configuration"
    if claim.worse == "baseline":
        e = results.runs[found[claim.better]].metrics.get(claim.metric)
        d = Estimate.from_json(e.extra.get("gain"), "gain", []) if e is not None and e.extra.get("gain") else None
    else:
        d = _difference(results, found[claim.better], found[claim.worse], claim.metric)
    if d is None or d.value is None or d.ci is None:
        return "not measured", f"{claim.metric} was not computed for both"
    evidence = f"{found[claim.better]} − {found[claim.worse]} = {format_value(d.value, d.ci)}"
    if d.extra.get("scope") != "method":
        return "undecided", evidence + " (one seed per side: not a method comparison)"
    lo, hi = d.ci
    if lo > 0:
        return "reproduced", evidence
    if hi < 0:
        return "not reproduced (the opposite holds)", evidence
    return "undecided at this budget", evidence + " (interval includes 0)"


def _per_seed(e: Estimate) -> str:
    vals = e.extra.get("per_seed") or []
    return ", ".join("—" if v is None else f"{v:.3f}" for v in vals)


def write_study_report(results: Results) -> str:
    configs = results.run_names("configuration")
    controls = results.run_names("control")
    meta = results.meta
    study = meta.get("study") or {}
    lines = [f"# Study — {results.data}", "",
             f"{len(configs)} configurations × seeds {meta.get('seeds')}, preset `{study.get('preset')}`, "
             f"every run analysed on the same {results.n_images} images. Values are means over seeds with a "
             "two-level bootstrap 95 % interval (seeds resampled, images resampled inside); probe scores are "
             "one number per seed (interval over seeds). Per-seed values in brackets.", ""]
    keys = [k for k in METRICS if any(k in results.runs[c].metrics for c in configs)]
    lines += ["## Across seeds", "", "| metric | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for key in keys:
        cells = []
        for c in configs:
            e = results.runs[c].metrics.get(key)
            cells.append(f"{e.formatted} ({_per_seed(e)})" if e else "—")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    for comp, diff in results.differences.items():
        lines += [f"## {comp} (seed-paired)", "", "| metric | difference [95 % CI] | per seed | reading |",
                  "|---|---|---|---|"]
        for key in keys:
            if key in diff:
                lines.append(f"| {key} | {diff[key].formatted} | {_per_seed(diff[key])} | {verdict(key, diff[key])} |")
        lines.append("")
    gains = {c: g for c in configs if (e := results.runs[c].metrics.get("interactive_iou")) is not None
             and (g := Estimate.from_json(e.extra.get("gain"), "gain", [])) is not None}
    if gains:
        clicks = next(iter(gains.values())).extra.get("clicks") or []
        lines += ["## Interactive segmentation: gain over the strongest baseline (same pairs, same clicks)", "",
                  "Each seed's IoU minus the strongest baseline's (highest mean IoU at that click count), pair by "
                  "pair; interval over seeds with pairs nested.", "",
                  "| configuration | " + " | ".join(f"{n} click{'s' * (n != 1)}" for n in clicks) + " | strongest baseline |",
                  "|---|" + "---|" * (len(clicks) + 1)]
        for c, g in gains.items():
            pc, ci = g.extra.get("per_click") or [], g.extra.get("per_click_ci") or []
            best = g.extra.get("best_baseline")
            lines.append(f"| {c} | " + " | ".join(format_value(v, tuple(i) if i else None) for v, i in zip(pc, ci))
                         + f" | {', '.join(best) if best and isinstance(best[0], str) else best} |")
        lines.append("")
    if controls:
        ckeys = [k for k in ("instance_mass", "instance_selectivity", "instance_jaccard", "cls_jaccard", "corloc",
                             "attention_distance") if any(k in results.runs[c].metrics for c in controls)]
        lines += ["## Controls (where each metric's null and ceiling lie; one checkpoint, intervals over images)", "",
                  "| control | " + " | ".join(ckeys) + " |", "|---|" + "---|" * len(ckeys)]
        for c in controls:
            m = results.runs[c].metrics
            lines.append(f"| {c} | " + " | ".join(m[k].formatted if k in m else "—" for k in ckeys) + " |")
        lines.append("")
    lines += ["## The paper's claims at this budget", "", "| claim | status | evidence |", "|---|---|---|"]
    for claim in PAPER_CLAIMS:
        status, evidence = claim_status(results, claim)
        lines.append(f"| {claim.text} | **{status}** | {evidence} |")
    lines.append("")
    learning = meta.get("learning") or {}
    if learning:
        from ..learning import LEARNED_FRACTION

        lines += [f"## Did the runs learn? (clearly below the null = ≤ {LEARNED_FRACTION:g} × null)", "",
                  "| run | last-layer attention entropy / uniform (ln L) | pixel loss / patch-mean predictor | "
                  "region loss / best constant | learned |", "|---|---|---|---|---|"]
        for name, c in learning.items():
            def pair(v, null):
                return "—" if v is None or null is None else f"{v:.3f} / {null:.3f}"
            ok = c.get("learned") or {}
            lines.append(f"| {name} | {pair(c.get('attention_entropy'), c.get('uniform_entropy'))} | "
                         f"{pair(c.get('pixel_loss'), c.get('pixel_null'))} | {pair(c.get('region_loss'), c.get('region_null'))} | "
                         + (", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in ok.items()) or "—") + " |")
        lines.append("")
    timing = meta.get("timing") or {}
    if timing:
        runs = timing.get("train_seconds_per_run") or {}
        lines += ["## Time", "",
                  f"- training: {timing.get('train_seconds', 0):.0f} s wall for {len(runs)} run(s) "
                  f"({timing.get('parallel')} at a time, {timing.get('threads')} thread(s) each)"
                  + (f"; {sum(runs.values()) / len(runs):.0f} s per run" if runs else ""),
                  f"- analysis: {timing.get('analysis_seconds', 0):.0f} s wall", ""]
    for key in keys:
        lines.append(f"- **{key}**: {metric(key).description}")
    return "\n".join(lines) + "\n"
