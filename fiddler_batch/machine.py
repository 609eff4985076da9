"""Facts about this machine that several parts need: where built artefacts are cached, the CPU's name, its
memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_root() -> Path:
    """Where built artefacts (demo checkpoints, calibrations) are kept: `$FIDDLER_BATCH_CACHE`, else
    `~/.cache/fiddler-batch`."""
    return Path(os.environ.get("FIDDLER_BATCH_CACHE") or Path.home() / ".cache" / "fiddler-batch").expanduser()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_memory(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int] | None:
    """(available, total) host memory in bytes, from /proc/meminfo; None where it cannot be read."""
    fields = {}
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            fields[name] = int(value[0]) * 1024
    if "MemAvailable" not in fields or "MemTotal" not in fields:
        return None
    return fields["MemAvailable"], fields["MemTotal"]
