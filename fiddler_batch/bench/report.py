"""The report of a results file: a markdown table, a PNG chart and a short terminal table.

For each (variant, scenario, size) the rows come from the latest session that ran fiddler-batch on it, so
the ratios compare runs of one process; a baseline only found in another session is shown with its own
numbers, marked, and without a ratio. Ratio = fiddler-batch's speed / the baseline's speed (time metrics
inverted), so above 1 means fiddler-batch is faster. "% of bound" = the run's speed / the bound's speed;
"% of free" the same against the free bound (no contention for host memory: `bounds.py`). Sessions from
before the shared bound recorded the free one only, which then fills both columns (marked in the notes).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fiddler_batch.bench.baselines import BUDGET_FORMULA
from fiddler_batch.bench.bounds import FORMULA
from fiddler_batch.bench.results import Results
from fiddler_batch.bench.scenarios import DEFINITIONS, METRICS, PRIMARY, SECONDARY
from fiddler_batch.bench.settings import BASELINES, OURS, SCENARIO_TITLES
from fiddler_batch.engine.costmodel import cold_summary
from fiddler_batch.io.atomic import atomic_file

Row = dict[str, Any]

STEADY = 0.85
"""The slowest of a case's timed runs at this share of their median speed or above counts as steady (issue 10's
target); a row below it says in its notes what set that run apart (`_slow_run`)."""

PLAN_KEYS = ("experts_cpu", "experts_copied", "experts_split")
"""Engine counters of where a run's experts ran: equal counts are the sign (not a proof) of the same plans."""


def _speed(metric: str, value: float | None) -> float | None:
    """The value as a speed (higher is better)."""
    if value is None or value <= 0:
        return None
    return value if METRICS[metric][1] else 1.0 / value


def _share(speed: float | None, metric: str, bound: float | None) -> float | None:
    """A run's speed as a share of a bound's (`bound` in the metric's own unit)."""
    bound_speed = _speed(metric, bound)
    return speed / bound_speed if speed and bound_speed else None


def _case_order(run: dict[str, Any]) -> tuple:
    params = run["case_params"]
    return (run["variant"], run["scenario"], params["prompt"], params["new"], params["width"], params["requests"])


def _slowest(run: dict[str, Any], metric: str) -> tuple[float | None, str]:
    """(The slowest timed run's speed over the runs' median speed, a note when that is below `STEADY`); (None, "")
    with fewer than two runs."""
    reps = run.get("reps") or []
    speeds = [_speed(metric, (rep.get("metrics") or {}).get(metric)) for rep in reps]
    if len(speeds) < 2 or any(speed is None for speed in speeds):
        return None, ""
    slowest = min(range(len(speeds)), key=speeds.__getitem__)
    share = speeds[slowest] / statistics.median(speeds)
    return share, (_slow_run(reps, slowest, share) if share < STEADY else "")


def _slow_run(reps: list[dict[str, Any]], slow: int, share: float) -> str:
    """What set run `slow` apart from the others, by the engine's counters: its plans, and its CPU experts' time
    against the other runs' median."""
    stats = [rep.get("engine_stats") or {} for rep in reps]
    others = [s for i, s in enumerate(stats) if i != slow]
    note = f"slowest run (run {slow + 1} of {len(reps)}) {share:.0%} of the median"
    if not stats[slow] or not all(key in stats[slow] for key in PLAN_KEYS):
        return note
    same = all(all(s.get(key) == stats[slow][key] for key in PLAN_KEYS) for s in others)
    note += ": the others' counts of CPU, copied and split experts" if same else ": other expert counts than theirs"
    cpu = [s.get("cpu_compute_s") for s in others]
    if stats[slow].get("cpu_compute_s") and all(cpu):
        note += f", its CPU experts {stats[slow]['cpu_compute_s'] / statistics.median(cpu):.2f}x their median time"
    captures = stats[slow].get("graph_captures")
    if captures:
        note += f", {captures} graph captures"
    return note


def table_rows(results: Results) -> list[Row]:
    """One row per (variant, scenario, size, baseline) in the results."""
    order = {s["id"]: i for i, s in enumerate(results.sessions)}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in sorted(results.runs, key=_case_order):
        groups.setdefault((run["variant"], run["scenario"], run["case"]), []).append(run)
    rows: list[Row] = []
    for (variant, scenario, case), runs in groups.items():
        ours = [r for r in runs if r["baseline"] == OURS and r["status"] == "ok"]
        home = max((r["session"] for r in ours or runs), key=order.__getitem__)
        bounds = [b for b in results.bounds if (b["variant"], b["scenario"], b["case"]) == (variant, scenario, case)]
        bound = next((b for b in bounds if b["session"] == home), None) or (
            max(bounds, key=lambda b: order[b["session"]]) if bounds else None
        )
        ours_run = next((r for r in ours if r["session"] == home), None)
        metric = PRIMARY[scenario]
        # Baselines in their table's order, then any that results recorded under a name since retired.
        for baseline in [*BASELINES, *sorted({r["baseline"] for r in runs} - set(BASELINES))]:
            candidates = [r for r in runs if r["baseline"] == baseline]
            if not candidates:
                continue
            run = next((r for r in candidates if r["session"] == home), None) or max(
                candidates, key=lambda r: order[r["session"]]
            )
            value = run["median"].get(metric) if run["status"] == "ok" else None
            speed = _speed(metric, value)
            ratio = None
            ours_speed = _speed(metric, ours_run["median"].get(metric)) if ours_run is not None else None
            if ours_speed and speed and run["session"] == home:
                ratio = ours_speed / speed
            bound_value = bound["metrics"].get(metric) if bound else None
            share = _share(speed, metric, bound_value)
            free_value = (bound.get("free") or bound)["metrics"].get(metric) if bound else None
            free_share = _share(speed, metric, free_value)
            slowest, slow_note = _slowest(run, metric) if run["status"] == "ok" else (None, "")
            second = SECONDARY.get(scenario)
            second_value = run["median"].get(second) if second and run["status"] == "ok" else None
            rows.append(
                {
                    "variant": variant,
                    "scenario": scenario,
                    "case": case,
                    "baseline": baseline,
                    "status": run["status"],
                    "reason": run.get("reason"),
                    "metric": metric,
                    "value": value,
                    "secondary": second,
                    "secondary_value": second_value,
                    "ratio": ratio,
                    "bound": bound_value,
                    "share": share,
                    "free_bound": free_value,
                    "free_share": free_share,
                    "free_only": bool(bound) and "free" not in bound,
                    "reps": len(run.get("reps", [])),
                    "slowest": slowest,
                    "slow_note": slow_note,
                    "shortened": run.get("shortened"),
                    "other_session": run["session"] != home,
                    "session": run["session"],
                }
            )
    return rows


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f"{value:,.{min(digits, 4)}f}"


def _pct(share: float | None) -> str:
    return f"{share:.0%}" if share else "-"


def _metric_name(metric: str | None) -> str:
    return METRICS[metric][0] if metric else ""


def _value_cell(row: Row) -> str:
    if row["status"] != "ok":
        return row["status"]
    return _num(row["value"])


def _notes(row: Row) -> str:
    notes = []
    if row["status"] != "ok":
        notes.append(str(row["reason"]))
    if row["shortened"]:
        notes.append("shortened: " + ", ".join(f"{k} {v}" for k, v in row["shortened"].items()))
    if row["other_session"]:
        notes.append(f"from session {row['session']} (no ratio across sessions)")
    if row.get("free_only"):
        notes.append("free bound only (recorded before the shared one)")
    if row.get("slow_note"):
        notes.append(row["slow_note"])
    return "; ".join(notes)


def markdown(results: Results) -> str:
    """The report as markdown: the setting of each session, then one table per variant."""
    rows = table_rows(results)
    lines = ["# fiddler-batch benchmark", ""]
    for session in results.sessions:
        lines += _session_lines(session)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        lines += [
            f"## {variant}",
            "",
            "| scenario | size | baseline | metric | median | also | fiddler-batch / baseline | bound "
            "| % of bound | % of free | runs | slowest | notes |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in (r for r in rows if r["variant"] == variant):
            also = f"{_metric_name(row['secondary'])} {_num(row['secondary_value'])}" if row["secondary_value"] else ""
            lines.append(
                f"| {row['scenario']} {SCENARIO_TITLES[row['scenario']]} | {row['case']} | {row['baseline']} "
                f"| {_metric_name(row['metric'])} | {_value_cell(row)} | {also} "
                f"| {_num(row['ratio']) + 'x' if row['ratio'] else '-'} | {_num(row['bound'])} "
                f"| {_pct(row['share'])} | {_pct(row['free_share'])} "
                f"| {row['reps']} | {_pct(row['slowest'])} | {_notes(row)} |"
            )
        lines.append("")
    lines += [
        "## How to read it",
        "",
        "- Ratio: fiddler-batch's speed / the baseline's speed (for times: the baseline's time / "
        "fiddler-batch's), from runs of the same session; above 1 means fiddler-batch is faster.",
        f"- Slowest: the slowest timed run's speed over the median's (steady at {STEADY:.0%} or more; below, the "
        "notes compare that run's counts of CPU, copied and split experts and its CPU time with the others').",
        "- Median over the timed runs (`runs`), after a warm-up (the timed call, repeated while the CPU's start lag "
        "that the timed steps plan with is measured: `warmup.calls` in the JSON); shortened runs are listed in the "
        "notes.",
        *[f"- {s}: {DEFINITIONS[s]}." for s in sorted({r["scenario"] for r in rows})],
        f"- Bound: {FORMULA}. % of bound = the run's speed / the bound's speed; % of free = the same against the "
        "free bound.",
        f"- {BUDGET_FORMULA}.",
        "",
    ]
    return "\n".join(lines)


def _runs(count: int) -> str:
    return f"{count} timed run{'' if count == 1 else 's'}"


def _session_lines(session: dict[str, Any]) -> list[str]:
    card = session.get("card")
    host = session["host"]
    versions = session["versions"]
    settings = session["settings"]
    lines = [
        f"### Session {session['id']} ({session['date']})",
        "",
        f"- Command: `{session['command']}`",
        f"- Card: {card['name']} ({card['memory_gb']} GB, CUDA {card['cuda']})" if card else "- Card: none (CPU run)",
        f"- Host: {host['cpu']}, {host['cpus']} CPUs, {host['ram_gb']} GB RAM, {host['torch_threads']} torch threads",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- Variant: {settings['variant']}; seed {settings['seed']}; {_runs(settings['reps'])} per case after a "
        f"warm-up (slow baselines: {_runs(settings['slow_reps'])}, at most {settings['slow_max_new']} new tokens "
        f"and {settings['slow_requests']} requests)",
    ]
    model = session.get("model")
    if model:
        lines.append(f"- Model: {model['description']}; built in {model['build_s']:.1f} s")
    rates = session.get("rates")
    if rates:
        lines.append(
            f"- Measured rates: CPU {rates['cpu_gb_per_s']:.1f} GB/s (one expert, 1 token), PCIe "
            f"{rates['pcie_gb_per_s']:.1f} GB/s (pinned copy), GPU {rates['gpu_tflop_per_s']:.1f} TFLOP/s "
            f"(one expert, {rates['gpu_tflop_at_tokens']} tokens)"
        )
    meta = (session.get("cost_model") or {}).get("meta", {})
    if "host_read_gb_per_s" in meta:
        lines.append(
            f"- Host memory read {meta['host_read_gb_per_s']} GB/s: the CPU expert at 1 token reads its weights at "
            f"{meta['cpu_share_of_read']:.0%} of it; its timed runs were {meta['cpu_spread']:.0%} apart (max - min "
            "over the median)"
        )
    if cold := cold_summary(meta):
        lines.append(f"- {cold}")
    budget = session.get("budget")
    if budget:
        lines.append(
            f"- GPU budget: {budget['total_gb']} GB = non-expert {budget['non_expert_bytes'] / 1e9:.2f} + "
            f"({budget['resident_experts']} resident + {budget['staging_slots']} staging) x "
            f"{budget['expert_bytes'] / 1e6:.1f} MB + KV {budget['kv_cache_bytes'] / 1e9:.2f} + activations "
            f"{budget['activation_bytes'] / 1e9:.2f} GB"
        )
    if session.get("popularity"):
        lines.append(f"- Placement: {session['popularity']['how']}")
    if session.get("timeline"):
        total = sum(part["seconds"] for part in session["timeline"] if not part["depth"])
        lines.append(f"- Wall time: {total:.0f} s in {len(session['timeline'])} parts (see the results JSON)")
    return lines + [""]


def chart(results: Results, path: Path) -> bool:
    """A bar chart per (variant, scenario, size): each baseline's median, the bound as a dashed line.
    False when there is nothing to draw (no runs)."""
    rows = table_rows(results)
    panels = list(dict.fromkeys((r["variant"], r["scenario"], r["case"]) for r in rows))
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = {panel[0] for panel in panels}
    cols = min(4, max(1, len(panels)))
    height = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(height, cols, figsize=(4.2 * cols, 3.6 * height), squeeze=False)
    colors = dict(zip(BASELINES, ("#9e9e9e", "#f2a541", "#5b8bd9", "#2e9e5b", "#8e44ad", "#c0392b")))
    for ax, panel in zip(axes.flat, panels):
        panel_rows = [r for r in rows if (r["variant"], r["scenario"], r["case"]) == panel]
        names = [r["baseline"] for r in panel_rows]
        values = [r["value"] or 0.0 for r in panel_rows]
        bars = ax.bar(range(len(names)), values, color=[colors.get(n, "#555555") for n in names])
        for bar, row in zip(bars, panel_rows):
            text = _num(row["value"]) if row["status"] == "ok" else row["status"]
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        metric = panel_rows[0]["metric"]
        bound = panel_rows[0]["bound"]
        title = f"{panel[1]} {SCENARIO_TITLES[panel[1]]}, {panel[2]}"
        if len(variants) > 1:
            title += f"\n{panel[0]}"
        free = panel_rows[0]["free_bound"]
        if bound:
            ax.axhline(bound, color="#c0392b", linestyle="--", linewidth=1)
            title += f"\nphysical bound (dashed) {_num(bound)}"
        if free and not panel_rows[0]["free_only"]:
            ax.axhline(free, color="#c0392b", linestyle=":", linewidth=1)
            title += f", free (dotted) {_num(free)}"
        ax.set_xticks(range(len(names)), [n.replace("-", "-\n", 1) for n in names], fontsize=8)
        ax.set_ylabel(_metric_name(metric) + ("" if METRICS[metric][1] else " (lower is better)"), fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max([*values, bound or 0.0, free or 0.0, 1e-9]) * 1.18)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, dpi=110, format="png")
    plt.close(fig)
    return True


def terminal(rows: Iterable[Row]) -> str:
    """A short fixed-width table of the medians, ratios and bounds."""
    header = (
        f"{'case':<14} {'baseline':<18} {'metric':<22} {'median':>9} {'ours/it':>8} {'bound':>9} {'%bound':>7} "
        f"{'%free':>6} {'slowest':>7}"
    )
    lines = [header, "-" * len(header)]
    earlier = False
    for row in rows:
        earlier |= row["other_session"]
        baseline = row["baseline"] + (" *" if row["other_session"] else "")
        lines.append(
            f"{row['scenario'] + ' ' + row['case']:<14} {baseline:<18} {_metric_name(row['metric']):<22} "
            f"{_value_cell(row):>9} {(_num(row['ratio']) + 'x') if row['ratio'] else '-':>8} "
            f"{_num(row['bound']):>9} {_pct(row['share']):>7} {_pct(row['free_share']):>6} {_pct(row['slowest']):>7}"
        )
    if earlier:
        lines.insert(0, "* from an earlier session than fiddler-batch's: no ratio")
    return "\n".join(lines)
