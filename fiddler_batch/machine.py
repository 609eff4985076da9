"""Facts about this machine that several parts need: where built artefacts are cached, the CPU's name."""

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
