"""The run's summary: counts, tokens, wall time, throughput and engine statistics, as JSON and as a table.

`RunSummary` is the summary file's model (`STEM.summary.json`); its JSON Schema is exported to `schemas/`.
Every rate has one denominator, named by the block it is in (wall time or generate time); every time and rate
is given to `DECIMALS` decimal places, in the file and in the table alike.
"""

from __future__ import annotations

import statistics
from array import array
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DECIMALS = 3
"""Decimal places of every time (seconds) and rate in the summary and its table."""


def _config() -> ConfigDict:
    return ConfigDict(extra="forbid", use_attribute_docstrings=True)


class RequestCounts(BaseModel):
    model_config = _config()

    completed: int
    """Requests that ran and have a result record."""
    skipped: int
    """Bad records, listed in the errors file."""
    total: int
    """Records read: completed + skipped."""
    completions: int
    """Completions generated: one per completed request, n for a request with n > 1."""
    resumed: int = 0
    """Of the total, requests (results and bad records) that earlier, interrupted runs had finished: the runs that
    completed the job did not compute them again."""


class TokenCounts(BaseModel):
    model_config = _config()

    prompt: int
    """Prompt tokens of the completed requests (once per request, whatever its n)."""
    completion: int
    """Tokens generated for the completed requests, every choice counted."""


class TimeSpent(BaseModel):
    model_config = _config()

    wall: float
    """Seconds from the start of the run to the end of the merge."""
    model_load: float
    """Seconds spent loading and placing the model (and calibrating, when it had to)."""
    generate: float
    """Seconds inside the model, summed over batches."""


class Rates(BaseModel):
    """Amounts per second of one denominator (null when that time is 0)."""

    model_config = _config()

    requests: float | None
    """Completed requests per second."""
    prompt_tokens: float | None
    """Prompt tokens per second."""
    completion_tokens: float | None
    """Completion tokens per second."""
    total_tokens: float | None
    """Prompt plus completion tokens per second."""


class Throughput(BaseModel):
    model_config = _config()

    per_wall_s: Rates
    """Per second of wall time (time_s.wall: the whole run, model load and merge included)."""
    per_generate_s: Rates
    """Per second of generate time (time_s.generate: time inside the model)."""


class Distribution(BaseModel):
    """Mean and percentiles of one latency over every completion (null when there is none)."""

    model_config = _config()

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


class Latency(BaseModel):
    model_config = _config()

    time_to_first_token: Distribution
    """Seconds from a completion's batch start to its first token."""
    total: Distribution
    """Seconds from a completion's batch start to its last token."""


RunStatus = Literal["complete", "failed", "stopped", "interrupted", "shard done"]


class RunSummary(BaseModel):
    """What a run did, written to `STEM.summary.json` and printed as a table."""

    model_config = _config()

    status: RunStatus = "complete"
    """'complete': the output holds every request's result (bad records in the errors file). 'failed': the run
    stopped on a problem (see failure); the output file is not there, what finished is kept in the work folder.
    'stopped' and 'interrupted': stopped by SIGTERM or SIGUSR1, or by SIGINT; a rerun resumes. 'shard done':
    this shard finished and the output waits for the others (never written to the summary file)."""
    failure: str | None = None
    """Why the run failed or stopped (the same text the command printed)."""
    shards: int = 1
    """Shards the job runs in (`--shard I/N`, or a Slurm array)."""
    output: str
    """The results file."""
    errors: str
    """The errors file (bad records)."""
    device: str
    """The fast device the model ran on."""
    model: str
    """model.path as the job gave it."""
    finished_at: str
    """ISO 8601 time (UTC) at which the run ended."""
    requests: RequestCounts
    tokens: TokenCounts
    batches: dict[str, int]
    """Batch ids given out ('total': static batches, or groups of requests that finished together under the
    continuous scheduler) and the static batches of each kind."""
    steps: dict[str, int] = Field(default_factory=dict)
    """Forward steps of the continuous scheduler: 'total' and the count of each kind."""
    finish_reasons: dict[str, int]
    """Completed requests by finish reason."""
    time_s: TimeSpent
    throughput: Throughput
    latency_s: Latency
    """Mean and percentiles over every completion (each choice of an n > 1 request counts), in seconds."""
    engine_stats: dict[str, Any] = Field(default_factory=dict)
    """The engine's statistics summed over batches."""


def add_stats(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """`total` with the numbers of `more` added in, key by key (nested mappings too; other values: latest)."""
    merged = dict(total)
    for key, value in more.items():
        if isinstance(value, dict):
            merged[key] = add_stats(merged.get(key) or {}, value)
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and isinstance(merged.get(key), (int, float))
        ):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


class Report:
    """Accumulates what the run did, batch by batch."""

    def __init__(self) -> None:
        self.records = 0
        self.completions = 0
        self.skipped = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.groups = 0
        self.batches: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self.finish_reasons: Counter[str] = Counter()
        self.first_token_s = array("d")  # 8 bytes a completion, for the percentiles
        self.total_s = array("d")
        self.generate_s = 0.0
        self.engine_stats: dict[str, Any] = {}

    def add_group(self, group: Any, records: list[dict[str, Any]]) -> None:
        """A group of finished requests (a `scheduling.Group`: one batch, or what finished in a stretch of steps)."""
        self.add_time(group.kind, group.steps, group.seconds, group.stats)
        self.add_records(records)

    def add_time(self, kind: str | None, steps: dict[str, int], seconds: float, stats: dict[str, Any]) -> None:
        """A group's time in the model, its kind (static batches), steps and engine statistics."""
        self.groups += 1
        if kind is not None:
            self.batches[kind] += 1
        self.steps.update(steps)
        self.generate_s += seconds
        self.engine_stats = add_stats(self.engine_stats, {k: v for k, v in stats.items() if k != "rows_per_step"})

    def add_records(self, records: list[dict[str, Any]]) -> None:
        """Result records: their tokens, finish reasons and latencies."""
        for record in records:
            self.records += 1
            self.prompt_tokens += record["prompt_tokens"]
            for completion in record.get("choices") or [record]:
                self.completions += 1
                self.completion_tokens += completion["completion_tokens"]
                self.finish_reasons[completion["finish_reason"]] += 1
                self.first_token_s.append(completion["timing"]["time_to_first_token_s"])
                self.total_s.append(completion["timing"]["total_s"])

    def summary(self, wall_s: float, load_s: float, resumed: int = 0, **where: Any) -> RunSummary:
        """The summary; `where` gives output, errors, device, model and finished_at (and status, failure, shards)."""
        return RunSummary(
            **where,
            requests=RequestCounts(
                completed=self.records,
                skipped=self.skipped,
                total=self.records + self.skipped,
                completions=self.completions,
                resumed=resumed,
            ),
            tokens=TokenCounts(prompt=self.prompt_tokens, completion=self.completion_tokens),
            batches={"total": self.groups, **dict(sorted(self.batches.items()))},
            steps={"total": sum(self.steps.values()), **dict(sorted(self.steps.items()))},
            finish_reasons=dict(sorted(self.finish_reasons.items())),
            time_s=TimeSpent(wall=_round(wall_s), model_load=_round(load_s), generate=_round(self.generate_s)),
            throughput=Throughput(per_wall_s=self._rates(wall_s), per_generate_s=self._rates(self.generate_s)),
            latency_s=Latency(time_to_first_token=distribution(self.first_token_s), total=distribution(self.total_s)),
            engine_stats=self.engine_stats,
        )

    def _rates(self, seconds: float) -> Rates:
        return Rates(
            requests=_rate(self.records, seconds),
            prompt_tokens=_rate(self.prompt_tokens, seconds),
            completion_tokens=_rate(self.completion_tokens, seconds),
            total_tokens=_rate(self.prompt_tokens + self.completion_tokens, seconds),
        )


def distribution(values: Any) -> Distribution:
    """Mean, p50, p90 and p99 of `values` (inclusive percentiles: the largest value is p100)."""
    return Distribution(
        mean=_round(statistics.fmean(values)) if values else None,
        p50=_quantile(values, 0.5),
        p90=_quantile(values, 0.9),
        p99=_quantile(values, 0.99),
    )


def format_table(summary: RunSummary) -> str:
    """A short table of the summary for the terminal (same decimals as the file)."""
    requests, tokens, time_s = summary.requests, summary.tokens, summary.time_s
    throughput, latency = summary.throughput, summary.latency_s
    done = f"{requests.completed} done, {requests.skipped} skipped"
    if requests.completions != requests.completed:
        done += f" ({requests.completions} completions)"
    if requests.resumed:
        done += f"; {requests.resumed} resumed from an earlier run"
    rows = [
        ("status", summary.status + (f": {summary.failure}" if summary.failure else "")),
        ("requests", done),
        ("batches", _counts(summary.batches)),
        ("steps", _counts(summary.steps)),
        ("tokens", f"{tokens.prompt:,} prompt, {tokens.completion:,} completion"),
        (
            "wall time",
            f"{_num(time_s.wall)} s (model load {_num(time_s.model_load)} s, generate {_num(time_s.generate)} s)",
        ),
        ("throughput", _rates_line(throughput.per_wall_s, "wall time")),
        ("", _rates_line(throughput.per_generate_s, "generate time")),
        ("first token", _distribution_line(latency.time_to_first_token)),
        ("total", _distribution_line(latency.total)),
        ("output", summary.output),
    ]
    if requests.skipped:
        rows.append(("errors", summary.errors))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _counts(counts: dict[str, int]) -> str:
    kinds = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "total")
    return f"{counts.get('total', 0)}" + (f" ({kinds})" if kinds else "")


def _rates_line(rates: Rates, denominator: str) -> str:
    return (
        f"{_num(rates.requests)} req/s, {_num(rates.prompt_tokens)} prompt tok/s, "
        f"{_num(rates.completion_tokens)} completion tok/s (per second of {denominator})"
    )


def _distribution_line(values: Distribution) -> str:
    return (
        ", ".join(f"{name} {_num(getattr(values, name))} s" for name in ("mean", "p50", "p90", "p99"))
        + " (seconds from batch start)"
    )


def _round(value: float) -> float:
    return round(value, DECIMALS)


def _rate(amount: float, seconds: float) -> float | None:
    return _round(amount / seconds) if seconds > 0 else None


def _quantile(values: Any, q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return _round(values[0])
    return _round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1])


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.{DECIMALS}f}"
