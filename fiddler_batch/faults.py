"""Fault hooks for tests: stop or fail a real run at a named point, to check that nothing is lost or duplicated.

`FIDDLER_BATCH_FAULTS` holds comma-separated `POINT[@N][:ACTION]`: when the run reaches POINT for the N-th time
(default 1; `*` every time), it does ACTION: `kill` (SIGKILL itself, the default), `enospc` or `eio` (raise that
OSError, as a full disk or a failing device would), or `sleep=S`. Points, in the order a run passes them:

- `forward`: before a forward pass of the model (inside a batch, mid-generation);
- `mid-part-write`: a part's temporary file is written, not yet renamed into place;
- `after-part-rename`: the part is in place, its manifest line not yet appended;
- `after-part`: the part is listed in the manifest;
- `before-done`: every part of the rank is written, its done marker not yet;
- `mid-merge`: the merge has written a record of the output's temporary file;
- `after-merge`: the output and errors files are in place, the summary not yet;
- `after-summary`: the summary is written, the work folder not yet removed.

Without the variable every hook is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections import Counter

VARIABLE = "FIDDLER_BATCH_FAULTS"
POINTS = (
    "forward",
    "mid-part-write",
    "after-part-rename",
    "after-part",
    "before-done",
    "mid-merge",
    "after-merge",
    "after-summary",
)

_reached: Counter[str] = Counter()


def reach(point: str) -> None:
    """The run is at `point`: do what `FIDDLER_BATCH_FAULTS` asks there, if anything."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    _reached[point] += 1
    for fault in spec.split(","):
        where, _, action = fault.strip().partition(":")
        name, _, when = where.partition("@")
        if name == point and (when == "*" or int(when or 1) == _reached[point]):
            _act(action or "kill", point)


def _act(action: str, point: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("enospc", "eio"):
        code = errno.ENOSPC if action == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code), f"(fault at {point})")
    elif action.startswith("sleep="):
        time.sleep(float(action.removeprefix("sleep=")))
    else:
        raise ValueError(f"{VARIABLE}: unknown action {action!r}")
