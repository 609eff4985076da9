"""The CPU expert's products at a few tokens from the project's own kernel (`gemv.c`), built on this host.

At one token an expert's product is a matrix-vector product bounded by how fast the host reads the weight. On the
Xeons of the GPU hosts `F.linear` on bf16 weights (oneDNN) read a Mixtral expert at 54-91 GB/s where a float32 sum
read 86-128 GB/s (benchmarks/NOTES.md), and no other layout PyTorch offers was faster at one token. `gemv.c` reads
each weight once, converts it to float32 in registers, and sums in float32 as the reference does; each output
is one thread's sum in a fixed order, so its value does not depend on the thread count, but its last bits may
differ from oneDNN's, as the CPU's bits already differ from the GPU's.

The library is compiled for this host's CPU (`-march=native`) the first time it is needed, with the C compiler
(`$CC`, else `cc`, `gcc`, `clang`) and OpenMP, into the cache folder under a name that holds the source's hash,
the compiler's version and the CPU's flags, so hosts of another kind sharing one cache folder each build their
own. Where it cannot be built (no compiler, no OpenMP), the CPU experts use `F.linear` and the log says why.
Whether it is used at all is the calibration's finding (`CostModel.cpu_gemv_ms`, `engine.cpu_gemv`).

Its products run on a helper thread's OpenMP team of one thread fewer than PyTorch's, and the calling thread
computes chunks of each beside it (`start`, `join`): so a product can be started and the calling thread go on, on the
one core the team leaves it, before it joins. The executor starts a layer call's first CPU product that way, before
it queues the layer's GPU work (`HybridExecutor.cpu_ahead`). When its queue runs empty the helper watches it for
WATCH_US before it sleeps, so that a layer call's next product finds it awake.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from fiddler_batch.engine.layout import ExpertLayout
from fiddler_batch.machine import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
MAX_TOKENS = 32
"""The calibration measures the kernel up to this many tokens; beyond it the CPU expert never uses it (the kernel
reads each weight once per call, but its arithmetic per weight grows with the tokens, where oneDNN's blocked
kernels do better)."""
WATCH_US = 200
"""How long the kernel's helper watches its empty queue for the next product before it sleeps, in microseconds (set
when the library loads): a layer call's products come back to back, and a sleeping helper must first be woken."""


def _compiler() -> list[str] | None:
    """The C compiler's command: `$CC` (which may carry flags), else the first of cc, gcc, clang on the path."""
    for command in (shlex.split(os.environ.get("CC", "")), ["cc"], ["gcc"], ["clang"]):
        if command and shutil.which(command[0]):
            return command
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: list[str]) -> Path:
    """The library for this host, compiled once into the cache folder (concurrent builders each write their own
    temporary file and rename it into place)."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    flags = " ".join([*cc[1:], *FLAGS]).encode()
    key = hashlib.sha256(b"\0".join([source, version.encode(), flags, _cpu_flags().encode()]))
    folder = cache_root() / "kernels"
    target = folder / f"gemv-{platform.machine()}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=target.stem, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(f"{shlex.join(cc)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    """The kernel's library from SOURCE, built for this host when needed, its entry points typed; None (and a log
    line saying why) where it cannot be built or loaded."""
    cc = _compiler()
    if cc is None:
        log.info("the CPU's own matrix-vector kernel is not built: no C compiler (set CC): F.linear is used")
        return None
    try:
        library = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("the CPU's own matrix-vector kernel could not be built (%s): F.linear is used", exc)
        return None
    c_long, c_ptr, c_int = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
    for name in ("fb_gemv_bf16", "fb_gemv_bf16_start"):
        fn = getattr(library, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [c_ptr, c_long, c_long, c_long, c_ptr, c_int, c_ptr, c_long, c_int]
    for name in ("fb_gemv_bf16_join", "fb_gemv_bf16_held"):
        getattr(library, name).restype = ctypes.c_long
        getattr(library, name).argtypes = []
    library.fb_gemv_bf16_watch.restype = None
    library.fb_gemv_bf16_watch.argtypes = [c_long]
    library.fb_gemv_bf16_watch(WATCH_US * 1000)
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    return _load()


def _kernel() -> Callable[..., int] | None:
    library = _library()
    return None if library is None else library.fb_gemv_bf16


def available() -> bool:
    """The kernel is built (or can be) and loaded on this host."""
    return _kernel() is not None


def usable_layout(layout: ExpertLayout) -> bool:
    """Experts of `layout` have weights the kernel takes: bf16, stored [out, in] (`F.linear`'s layout)."""
    return layout.dtype == torch.bfloat16 and not layout.is_transposed


def usable(weight: torch.Tensor) -> bool:
    """The kernel can compute `F.linear(x, weight)`: a bf16 matrix on the CPU, [out, in] with contiguous rows."""
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.stride(1) == 1
        and not weight.is_mkldnn
    )


TEAM = True
"""Products run on the kernel's helper team and the calling thread (`start`, `join`); False: each on an OpenMP team
of the calling thread's, as before the helper team (benchmarks compare the two), and `start` starts nothing."""


def watch_empty_queue(microseconds: float) -> None:
    """How long the helper watches its empty queue for the next product before it sleeps (WATCH_US unless set; 0:
    it sleeps at once, as before the watch; benchmarks compare the two)."""
    library = _library()
    if library is not None:
        library.fb_gemv_bf16_watch(int(microseconds * 1000))


class _Started(NamedTuple):
    """A product started ahead (`start`): what it was started on, and its inputs and output, kept alive until taken."""

    key: tuple
    xf: torch.Tensor
    y: torch.Tensor
    shape: tuple[int, ...]


_started: list[_Started] = []


def _key(x: torch.Tensor, weight: torch.Tensor) -> tuple:
    return (
        x.data_ptr(),
        tuple(x.shape),
        tuple(x.stride()),
        x.dtype,
        weight.data_ptr(),
        tuple(weight.shape),
        weight.stride(0),
    )


def _operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    m, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    xf = x.reshape(-1, k).to(torch.float32).contiguous()
    n = xf.shape[0]
    y = torch.empty(n, m, dtype=torch.bfloat16)
    args = [weight.data_ptr(), m, k, weight.stride(0), xf.data_ptr(), n, y.data_ptr(), m, torch.get_num_threads()]
    return xf, y, args


def start(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Start `linear(x, weight)` on the kernel's helper team and return at once: the next `linear` call on the same x
    and weight (the same memory, shape and strides) joins it and returns its result; `join` or `drain` joins every
    product started. x and weight must not change until then. False (nothing started) where the kernel has no room
    or fewer than two threads."""
    library = _library()
    if library is None:
        raise RuntimeError("the CPU's own matrix-vector kernel is not available on this host")
    if not TEAM:
        return False
    xf, y, args = _operands(x, weight)
    if not xf.shape[0] or library.fb_gemv_bf16_start(*args):
        return False
    _started.append(_Started(_key(x, weight), xf, y, (*x.shape[:-1], weight.shape[0])))
    return True


def join() -> None:
    """Compute, beside the helper's team, every product started so far, until all are done."""
    library = _library()
    if _started and library is not None:
        library.fb_gemv_bf16_join()  # nothing to compute or wait for where they were joined already


def drain() -> None:
    """Join every product started and forget them (what no `linear` call took)."""
    join()
    _started.clear()


def started() -> int:
    """Products started and not yet taken by a `linear` call or drained."""
    return len(_started)


def held() -> int:
    """Products the kernel's queue holds (of its QUEUED slots; `start` refuses when all are held): those not finished,
    and finished ones behind a product the helper's team has not yet left, which a busy host can hold up for a while.
    0 where the kernel is not available."""
    library = _library()
    return 0 if library is None else library.fb_gemv_bf16_held()


def linear(x: torch.Tensor, weight: torch.Tensor, kernel: Callable[..., int] | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) for x [..., in] and a weight `usable` accepts, from the kernel (`kernel`: another
    build's entry point, for benchmarks): sums in float32, one rounding to bf16 per output. A product `start`ed on the
    same x and weight is joined and taken instead; others run on the helper's team and this thread (`start`, then
    `join`, which joins those started before too), so that one team computes every product, or, where that cannot
    start, on an OpenMP team of this thread's."""
    if _started:
        key = _key(x, weight)
        for i, product in enumerate(_started):
            if product.key == key:
                join()
                del _started[i]
                return product.y.reshape(product.shape)
    fn = kernel or _kernel()
    if fn is None:
        raise RuntimeError("the CPU's own matrix-vector kernel is not available on this host")
    xf, y, args = _operands(x, weight)
    shape = (*x.shape[:-1], weight.shape[0])
    if not xf.shape[0]:
        return y.reshape(shape)
    library = _library() if kernel is None and TEAM else None
    if library is not None and library.fb_gemv_bf16_start(*args) == 0:
        library.fb_gemv_bf16_join()  # those started before it too
        return y.reshape(shape)
    if fn(*args):
        raise MemoryError("the CPU's own matrix-vector kernel could not allocate its copy of the tokens")
    return y.reshape(shape)
