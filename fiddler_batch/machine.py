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


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of the CPU's last-level cache (the largest level sysfs lists for cpu0), in bytes; None where
    sysfs does not say."""
    best: tuple[int, int] | None = None
    for index in sorted(root.glob("index*")):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        digits, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
        if not digits.isdigit():
            continue
        if best is None or level > best[0]:
            best = (level, int(digits) * unit)
    return best[1] if best else None
