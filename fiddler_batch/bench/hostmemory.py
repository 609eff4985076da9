"""This process's host memory from Linux's /proc/self/status, for measuring what loading a model costs.

`reset_peak()` sets the peak resident size (VmHWM) to the current one, so that a later `status()["VmHWM"]`
minus an earlier `status()["VmRSS"]` is the peak growth in between. Used by `benchmarks/memory.py` and the
memory tests, in fresh processes; imports nothing beyond the standard library.
"""

from __future__ import annotations

from pathlib import Path

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status() -> dict[str, int]:
    """Resident size, its peak, and its anonymous and file-backed parts, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak() -> None:
    """VmHWM := VmRSS (raises OSError where /proc/self/clear_refs cannot be written)."""
    Path("/proc/self/clear_refs").write_text("5")
