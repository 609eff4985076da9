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

Products can also be started ahead (`start`): a helper thread of the library computes them while the caller goes
on (the executor queues a layer's GPU work meanwhile), and `Ahead.wait` waits for them. `linear` hands its products
to the same thread and waits (`HELPER_THREAD`). The numbers are the same either way.
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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fiddler_batch.engine.layout import ExpertLayout
from fiddler_batch.machine import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-pthread", "-shared", "-fPIC")
HELPER_THREAD = True
"""`linear` runs its product on the library's helper thread too (and waits for it), so that every product of the
kernel runs in the helper's team of OpenMP threads, those started ahead (`start`) and the others alike: a second
team (the calling thread's) taking turns with it made the CPU experts slower (benchmarks/NOTES.md). False: `linear`
computes on the calling thread."""

MAX_TOKENS = 32
"""The calibration measures the kernel up to this many tokens; beyond it the CPU expert never uses it (the kernel
reads each weight once per call, but its arithmetic per weight grows with the tokens, where oneDNN's blocked
kernels do better)."""


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


def _load() -> Callable[..., int] | None:
    """The kernel's entry point from SOURCE, built for this host when needed; None (and a log line saying why)
    where it cannot be built or loaded."""
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
        entry = getattr(library, name)
        entry.restype = c_int
        entry.argtypes = [c_ptr, c_long, c_long, c_long, c_ptr, c_int, c_ptr, c_long, c_int]
    library.fb_gemv_bf16_wait.restype = c_int
    library.fb_gemv_bf16_wait.argtypes = []
    fn = library.fb_gemv_bf16
    fn.library = library  # the entry points of products started ahead (`start`)
    return fn


@functools.cache
def _kernel() -> Callable[..., int] | None:
    return _load()


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


def linear(x: torch.Tensor, weight: torch.Tensor, kernel: Callable[..., int] | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) for x [..., in] and a weight `usable` accepts, from the kernel (`kernel`: another
    build's entry point, for benchmarks): sums in float32, one rounding to bf16 per output."""
    fn = kernel or _kernel()
    if fn is None:
        raise RuntimeError("the CPU's own matrix-vector kernel is not available on this host")
    m, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    rows = x.reshape(-1, k)
    y = torch.empty(rows.shape[0], m, dtype=torch.bfloat16)
    if kernel is None and HELPER_THREAD:
        ahead = _start([(rows, weight, y)])
        if ahead is not None:
            ahead.wait()
            return y.reshape(*x.shape[:-1], m)
    xf = rows.to(torch.float32).contiguous()
    n = xf.shape[0]
    if n and fn(weight.data_ptr(), m, k, weight.stride(0), xf.data_ptr(), n, y.data_ptr(), m, torch.get_num_threads()):
        raise MemoryError("the CPU's own matrix-vector kernel could not allocate its copy of the tokens")
    return y.reshape(*x.shape[:-1], m)


class Ahead:
    """Products `start` queued on the kernel's helper thread, until `wait` (which the executor calls before it reads
    their outputs); holds their inputs and outputs meanwhile. Dropped unwaited (an error on the caller's way), it
    waits first, so that the helper never reads or writes memory that has been freed."""

    def __init__(self, wait: Callable[[], int], keep: list[torch.Tensor]):
        self._wait: Callable[[], int] | None = wait
        self._keep = keep

    def wait(self) -> None:
        wait, self._wait = self._wait, None
        if wait is None:
            return
        failed = wait()
        self._keep = []
        if failed:
            raise MemoryError("the CPU's own matrix-vector kernel could not allocate its copy of the tokens")

    def __del__(self) -> None:
        if self._wait is not None:
            self._wait()


def start(products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Ahead | None:
    """Start `out[:] = F.linear(x, weight)` for each (x, weight, out) on the kernel's helper thread (see `_start`)."""
    return _start(products)


def _start(products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Ahead | None:
    """Start `out[:] = F.linear(x, weight)` for each (x, weight, out) on the kernel's helper thread, in order, and
    return at once. x: [n, in]; weight: as `usable` accepts; out: bf16 [n, out] with contiguous rows (columns of a
    wider buffer will do). None, with nothing left running, where the kernel or its helper thread is not available:
    the caller computes them itself."""
    library = getattr(_kernel(), "library", None)
    if library is None:
        return None
    keep: list[torch.Tensor] = []
    threads = torch.get_num_threads()
    ahead = Ahead(library.fb_gemv_bf16_wait, keep)
    for x, weight, out in products:
        m, k = weight.shape
        if not usable(weight) or x.shape[-1] != k:
            raise ValueError(
                f"the kernel cannot compute a product of x {tuple(x.shape)} and weight {tuple(weight.shape)}"
            )
        xf = x.reshape(-1, k).to(torch.float32).contiguous()
        n = xf.shape[0]
        if (
            out.dtype != torch.bfloat16
            or out.device.type != "cpu"
            or out.shape != (n, m)
            or (m > 1 and out.stride(1) != 1)
        ):
            raise ValueError(f"the product's output must be bf16 {(n, m)} with contiguous rows")
        keep += [xf, weight, out]
        if n and library.fb_gemv_bf16_start(
            weight.data_ptr(), m, k, weight.stride(0), xf.data_ptr(), n, out.data_ptr(), out.stride(0), threads
        ):
            ahead.wait()  # the helper could not take it: finish what it has, and let the caller compute them all
            return None
    return ahead
