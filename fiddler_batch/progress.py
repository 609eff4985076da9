"""A rank's progress: the bar on a terminal, log lines elsewhere, and the numbers its status file holds.

On a terminal the bar shows requests and the input and output token rates. Without one (cron mail, a Slurm
log, a pipeline), a line goes to the log at the start, every `log_every` seconds (0: after every group of
finished requests) and at the end: done/total, skipped, resumed, token rates and the ETA, so a log shows
progress without a terminal's carriage returns.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from fiddler_batch.shards import Shard

log = logging.getLogger("fiddler_batch.progress")

PROGRESS_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
"""The progress bar: the bar shrinks first, so the token rates stay readable at 80 columns."""
LOG_EVERY_S = 30.0


def progress_bar(total: int | None, enabled: bool, file: Any = None, ncols: int | None = None) -> tqdm:
    """The run's progress bar (requests, with the input and output token rates as its postfix)."""
    return tqdm(
        total=total,
        disable=not enabled,
        unit="req",
        file=file or sys.stderr,
        dynamic_ncols=ncols is None,
        ncols=ncols,
        desc="fiddler-batch",
        bar_format=PROGRESS_FORMAT,
    )


def rates_postfix(prompt_tokens: int, completion_tokens: int, seconds: float) -> str:
    """The bar's postfix: input and output tokens per second of generation."""
    return f"in {_rate(prompt_tokens, seconds)} out {_rate(completion_tokens, seconds)} tok/s"


@dataclass
class Progress:
    """Counts of one rank's run, shown as a bar or as log lines."""

    shard: Shard
    total: int | None
    """Requests of the shard (None when the input cannot be counted cheaply)."""
    bar_enabled: bool
    log_every: float = LOG_EVERY_S
    resumed: int = 0
    completed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generate_s: float = 0.0
    started: float = field(default_factory=time.time)
    computing_since: float | None = None
    """When this run started computing (after the model was loaded): the denominator of its rates."""
    _last_log: float = 0.0
    _bar: tqdm | None = None

    def __post_init__(self) -> None:
        self._bar = progress_bar(self.total, self.bar_enabled)

    @property
    def done(self) -> int:
        return self.resumed + self.computed

    @property
    def computed(self) -> int:
        """Requests this run finished (results and bad records)."""
        return self.completed + self.skipped

    def begin(self, already: int) -> None:
        """The rank starts with `already` requests done by earlier runs."""
        self.resumed = already
        if self._bar is not None:
            self._bar.update(already)
        prefix = f"{self.shard.label}: " if self.shard.label else ""
        of = f" of {self.total:,}" if self.total is not None else ""
        if already:
            log.info("%sresuming: %s%s requests already done by an earlier run", prefix, f"{already:,}", of)
        elif self.total is not None:
            log.info("%s%s requests to run", prefix, f"{self.total:,}")

    def computing(self) -> None:
        self.computing_since = self.computing_since or time.time()

    def add(self, completed: int, skipped: int, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.computing()
        self.completed += completed
        self.skipped += skipped
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.generate_s += seconds
        if self._bar is not None:
            self._bar.update(completed + skipped)
            self._bar.set_postfix_str(rates_postfix(self.prompt_tokens, self.completion_tokens, self.generate_s))
        if not self.bar_enabled and time.time() - self._last_log >= self.log_every:
            self.log_line()

    def log_line(self, final: bool = False) -> None:
        """One line of progress for logs (always written when `final`)."""
        if self.bar_enabled and not final:
            return
        self._last_log = time.time()
        prefix = f"{self.shard.label}: " if self.shard.label else ""
        of = f"/{self.total:,}" if self.total is not None else ""
        percent = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        eta = self.eta_s()
        log.info(
            "%s%s%s requests%s, %s skipped, %s resumed, %s tok/s in, %s tok/s out, elapsed %s, ETA %s",
            prefix,
            f"{self.done:,}",
            of,
            percent,
            f"{self.skipped:,}",
            f"{self.resumed:,}",
            _rate(self.prompt_tokens, self.generate_s),
            _rate(self.completion_tokens, self.generate_s),
            _clock(time.time() - self.started),
            "-" if eta is None else _clock(eta),
        )

    def rate(self) -> float | None:
        """Requests this run finishes per second since it started computing."""
        if self.computing_since is None or self.completed == 0:  # bad records alone say nothing of the pace
            return None
        seconds = time.time() - self.computing_since
        return self.computed / seconds if seconds > 0 else None

    def eta_s(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate is None:
            return None
        return max(0, self.total - self.done) / rate

    def numbers(self) -> dict[str, Any]:
        """What the status file holds about progress."""
        rate = self.rate()
        return {
            "total": self.total,
            "done": self.done,
            "completed": self.completed,
            "skipped": self.skipped,
            "resumed": self.resumed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "generate_s": round(self.generate_s, 3),
            "requests_per_s": None if rate is None else round(rate, 3),
            "completion_tokens_per_s": round(self.completion_tokens / self.generate_s, 3) if self.generate_s else None,
            "eta_s": None if self.eta_s() is None else round(self.eta_s() or 0.0, 1),
        }

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _rate(amount: int, seconds: float) -> str:
    return f"{amount / seconds:,.0f}" if seconds > 0 else "-"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
