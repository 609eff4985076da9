"""Problems worded for the user: where (file and line or row), which key or field, what is wrong, how to fix it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file, a command-line override or an input record."""

    file: str | None
    key: str
    message: str
    fix: str
    line: int | None = None
    """1-based line in a YAML or JSONL file."""
    row: int | None = None
    """0-based row in a Parquet file."""

    @property
    def where(self) -> str:
        if self.file is None:
            return "job"
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.row is not None:
            return f"{self.file} row {self.row}"
        return self.file

    def __str__(self) -> str:
        return f"{self.where}: {self.key}: {self.message}\n    fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProblemsError(Exception):
    """Several problems reported together."""

    headline = "problems"
    exit_code = 1
    """What `fiddler-batch` exits with when this error ends a command (`fiddler_batch.exitcodes`)."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.problems)
        lines = [f"{count} {self.headline}{'s' if count != 1 else ''}:" if count > 1 else f"{self.headline}:"]
        lines += [str(problem) for problem in self.problems]
        return "\n".join(lines)


class JobSpecError(ProblemsError):
    """The job spec (YAML file plus command-line overrides) is invalid."""

    headline = "job spec error"
    exit_code = 2


class InputError(ProblemsError):
    """An input file cannot be used at all (unreadable, or without the columns the job needs)."""

    headline = "input error"


class BadRecordError(ProblemsError):
    """A bad input record, with `errors.on_bad_record: fail`."""

    headline = "bad record"

    def __init__(self, problems: list[Problem], records: list[dict[str, Any]] | None = None):
        super().__init__(problems)
        self.records = records or []
        """The bad records as errors-file lines (index, id, file, line or row, field, reason, fix)."""


class EngineError(ProblemsError):
    """The model or the engine settings cannot be used as given: which key, what is wrong, how to fix it."""

    headline = "engine error"

    def __init__(self, key: str, message: str, fix: str):
        super().__init__([Problem(None, key, message, fix)])


class BusyError(ProblemsError):
    """Another run of the same job (same output) is writing the work folder."""

    headline = "job already running"
    exit_code = 4


class EmptyInputError(ProblemsError):
    """The input files hold no record at all: nothing to run."""

    headline = "empty input"
    exit_code = 3


class JobChangedError(ProblemsError):
    """The work folder of an unfinished run belongs to a job that differs in what it computes: resuming it would
    mix results of two jobs."""

    headline = "job changed since the interrupted run"
    exit_code = 5


class IncompleteError(ProblemsError):
    """A merge was asked for while some shards have not finished."""

    headline = "job not complete"
    exit_code = 6


class OutputError(ProblemsError):
    """The output cannot be written: a folder that is not writable, a full disk or quota, an I/O error."""

    headline = "cannot write the output"


class RunStopped(ProblemsError):
    """The run stopped on a signal: SIGTERM or SIGUSR1 (exit 75), SIGINT (exit 130). What finished is kept."""

    headline = "stopped"

    def __init__(self, problems: list[Problem], interrupted: bool = False):
        super().__init__(problems)
        self.exit_code = 130 if interrupted else 75
