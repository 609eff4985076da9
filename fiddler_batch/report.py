"""The run's summary: counts, tokens, wall time, throughput and engine statistics, as JSON and as a table.

`RunSummary` is the summary file's model (`STEM.summary.json`); its JSON Schema is exported to `schemas/`.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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


class TokenCounts(BaseModel):
    model_config = _config()

    prompt: int
    """Prompt tokens of the completed requests."""
    completion: int
    """Tokens generated for the completed requests."""


class TimeSpent(BaseModel):
    model_config = _config()

    wall: float
    """Seconds from the start of the run to the end of the merge."""
    model_load: float
    """Seconds spent loading and placing the model (and calibrating, when it had to)."""
    generate: float
    """Seconds inside the model, summed over batches."""


class Throughput(BaseModel):
    model_config = _config()

    requests_per_s: float | None
    """Completed requests per second of wall time."""
    prompt_tokens_per_s: float | None
    """Prompt tokens per second of generate time."""
    completion_tokens_per_s: float | None
    """Completion tokens per second of generate time."""
    completion_tokens_per_s_wall: float | None
    """Completion tokens per second of wall time."""


class Latency(BaseModel):
    model_config = _config()

    time_to_first_token_p50: float | None
    time_to_first_token_p90: float | None
    total_p50: float | None
    total_p90: float | None


class RunSummary(BaseModel):
    """What a run did, written to `STEM.summary.json` and printed as a table."""

    model_config = _config()

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
    """Percentiles over completed requests, in seconds."""
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
        self.skipped = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.groups = 0
        self.batches: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self.finish_reasons: Counter[str] = Counter()
        self.first_token_s: list[float] = []
        self.total_s: list[float] = []
        self.generate_s = 0.0
        self.engine_stats: dict[str, Any] = {}

    def add_group(self, group: Any, records: list[dict[str, Any]]) -> None:
        """A group of finished requests (a `scheduling.Group`: one batch, or what finished in a stretch of steps)."""
        self.groups += 1
        if group.kind is not None:
            self.batches[group.kind] += 1
        self.steps.update(group.steps)
        self.generate_s += group.seconds
        self.engine_stats = add_stats(self.engine_stats, {k: v for k, v in group.stats.items() if k != "rows_per_step"})
        for record in records:
            self.records += 1
            self.prompt_tokens += record["prompt_tokens"]
            self.completion_tokens += record["completion_tokens"]
            self.finish_reasons[record["finish_reason"]] += 1
            self.first_token_s.append(record["timing"]["time_to_first_token_s"])
            self.total_s.append(record["timing"]["total_s"])

    def summary(self, wall_s: float, load_s: float, **where: str) -> RunSummary:
        """The summary; `where` gives output, errors, device, model and finished_at."""
        return RunSummary(
            **where,
            requests=RequestCounts(completed=self.records, skipped=self.skipped, total=self.records + self.skipped),
            tokens=TokenCounts(prompt=self.prompt_tokens, completion=self.completion_tokens),
            batches={"total": self.groups, **dict(sorted(self.batches.items()))},
            steps={"total": sum(self.steps.values()), **dict(sorted(self.steps.items()))},
            finish_reasons=dict(sorted(self.finish_reasons.items())),
            time_s=TimeSpent(wall=wall_s, model_load=load_s, generate=self.generate_s),
            throughput=Throughput(
                requests_per_s=_rate(self.records, wall_s),
                prompt_tokens_per_s=_rate(self.prompt_tokens, self.generate_s),
                completion_tokens_per_s=_rate(self.completion_tokens, self.generate_s),
                completion_tokens_per_s_wall=_rate(self.completion_tokens, wall_s),
            ),
            latency_s=Latency(
                time_to_first_token_p50=_quantile(self.first_token_s, 0.5),
                time_to_first_token_p90=_quantile(self.first_token_s, 0.9),
                total_p50=_quantile(self.total_s, 0.5),
                total_p90=_quantile(self.total_s, 0.9),
            ),
            engine_stats=self.engine_stats,
        )


def format_table(summary: RunSummary) -> str:
    """A short table of the summary for the terminal."""
    requests, tokens, time_s = summary.requests, summary.tokens, summary.time_s
    throughput, latency = summary.throughput, summary.latency_s
    rows = [
        ("requests", f"{requests.completed} done, {requests.skipped} skipped"),
        ("batches", _counts(summary.batches)),
        ("steps", _counts(summary.steps)),
        ("tokens", f"{tokens.prompt} prompt, {tokens.completion} completion"),
        ("wall time", f"{time_s.wall:.1f} s (model load {time_s.model_load:.1f} s, generate {time_s.generate:.1f} s)"),
        (
            "throughput",
            f"{_num(throughput.prompt_tokens_per_s)} prompt tok/s, "
            f"{_num(throughput.completion_tokens_per_s)} completion tok/s",
        ),
        (
            "latency p50",
            f"first token {_num(latency.time_to_first_token_p50, 's')}, total {_num(latency.total_p50, 's')}",
        ),
        ("output", summary.output),
    ]
    if requests.skipped:
        rows.append(("errors", summary.errors))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _counts(counts: dict[str, int]) -> str:
    kinds = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "total")
    return f"{counts.get('total', 0)}" + (f" ({kinds})" if kinds else "")


def _rate(amount: float, seconds: float) -> float | None:
    return amount / seconds if seconds > 0 else None


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}" if value < 10 else f"{value:,.0f}"
    return f"{text} {unit}".strip()
