"""Helpers for tests: writing job files and inputs, reading results, running the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_job(folder: Path, records: list[Any] | None = None, **sections: Any) -> Path:
    """A job file in `folder` (input: `prompts.jsonl` holding `records`, output: `out/results.jsonl`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if records is not None:
        write_jsonl(folder / "prompts.jsonl", records)
    job: dict[str, Any] = {
        "model": {"path": "demo:tiny-mixtral", "dtype": "float32"},
        "input": {"path": "prompts.jsonl"},
        "output": {"path": "out/results.jsonl"},
        "generation": {"max_new_tokens": 8},
        "engine": {"device": "cpu"},
    }
    for name, values in sections.items():
        job[name] = {**job.get(name, {}), **values}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `fiddler-batch ARGS` as a subprocess, the way a user would (`env` is added to this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "fiddler_batch.cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class InterruptedAt:
    """An engine that forwards to a real one and raises KeyboardInterrupt when batch `batch` starts (static
    scheduler), as a Ctrl-C there would."""

    def __init__(self, engine: Any, batch: int):
        self.engine, self.batch, self.started = engine, batch, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def set_kind(self, kind: str) -> None:
        if self.started == self.batch:
            raise KeyboardInterrupt
        self.started += 1
        self.engine.set_kind(kind)


def stable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what depends on when and beside what it ran (timing, batch, engine statistics)."""
    return {k: v for k, v in record.items() if k not in ("timing", "batch_id", "batch_size", "engine_stats")}
