"""The results file: every session (one benchmark process) and every run it made, appended as they finish.

Layout (JSON):

    {"format": "fiddler-batch-bench/1",
     "sessions": [{"id", "date", "command", "host", "card", "versions", "settings", "model", "budget",
                   "cost_model", "rates", "placements", "popularity", "timeline"}, ...],
     "runs":     [{"session", "variant", "scenario", "case", "baseline", "status", "reason", "shortened",
                   "warmup", "reps": [raw timings + engine stats, ...], "median": {metric: value}}, ...],
     "bounds":   [{"session", "variant", "scenario", "case", "metrics", ...}, ...]}

Pieces of the full set can run as separate processes appending to one file, or write separate files that
`merge` joins; the report reads the latest run of each (variant, scenario, size, baseline).
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fiddler_batch.engine.costmodel import CostModel
from fiddler_batch.io.atomic import atomic_write_text
from fiddler_batch.machine import cpu_name, host_memory

FORMAT = "fiddler-batch-bench/1"
PACKAGES = ("transformers", "accelerate", "fiddler-batch", "matplotlib")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _ram_gb() -> float | None:
    memory = host_memory()
    return round(memory[1] / 1e9, 1) if memory is not None else None


def environment() -> dict[str, Any]:
    """The card, the host CPU and the software versions."""
    card = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        card = {
            "name": props.name,
            "memory_gb": round(props.total_memory / 1e9, 1),
            "cuda": torch.version.cuda,
            "count": torch.cuda.device_count(),
        }
    return {
        "host": {
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "ram_gb": _ram_gb(),
            "os": platform.platform(),
        },
        "card": card,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **{name: _version(name) for name in PACKAGES},
        },
    }


class Results:
    """The results file in memory; `save` writes it atomically."""

    def __init__(self, data: dict[str, Any] | None = None, path: Path | None = None):
        self.data = data or {"format": FORMAT, "sessions": [], "runs": [], "bounds": []}
        self.path = path

    @classmethod
    def open(cls, path: Path) -> Results:
        """The file at `path` if it exists (new runs are appended), else an empty one."""
        if path.is_file():
            return cls(_read(path), path)
        return cls(None, path)

    @classmethod
    def merge(cls, paths: list[Path], into: Path) -> Results:
        """One results file holding the sessions, runs and bounds of every file in `paths`."""
        merged = cls(None, into)
        seen: set[str] = set()
        for path in paths:
            data = _read(path)
            for session in data["sessions"]:
                if session["id"] not in seen:
                    seen.add(session["id"])
                    merged.data["sessions"].append(session)
                    merged.data["runs"] += [r for r in data["runs"] if r["session"] == session["id"]]
                    merged.data["bounds"] += [b for b in data["bounds"] if b["session"] == session["id"]]
        merged.data["sessions"].sort(key=lambda s: s["date"])
        return merged

    def new_session(self, settings: dict[str, Any]) -> dict[str, Any]:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        session = {
            "id": f"{stamp}-{os.getpid()}",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": settings["command"],
            **environment(),
            "settings": settings,
            "timeline": [],
        }
        self.data["sessions"].append(session)
        return session

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data["runs"]

    @property
    def bounds(self) -> list[dict[str, Any]]:
        return self.data["bounds"]

    @property
    def sessions(self) -> list[dict[str, Any]]:
        return self.data["sessions"]

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str) + "\n")


def load_cost_model(path: Path) -> CostModel:
    """A cost model from a calibration file, or the latest one recorded in a benchmark results file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the calibration {path}: {exc}") from exc
    if data.get("format") == FORMAT:
        recorded = [s["cost_model"] for s in data["sessions"] if s.get("cost_model")]
        if not recorded:
            raise ValueError(f"the results file {path} records no cost model")
        data = recorded[-1]
    try:
        return CostModel.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a cost model (no {exc})") from exc


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the results file {path}: {exc}") from exc
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fiddler-batch benchmark results file (format {data.get('format')!r})")
    return data
