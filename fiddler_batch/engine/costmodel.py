"""The cost model: how long one expert takes on the CPU, on the fast device, and to copy there.

Measured on the machine that runs the job (`calibrate` here; `fiddler-batch calibrate` and the caller-side
cache in `fiddler_batch.assets`), for the model's expert geometry, dtype and CPU thread count, never
hard-coded. Times are milliseconds; between ladder points they are interpolated linearly, beyond the last
point extrapolated from the last two.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from fiddler_batch.engine import cpugemv, cpupack
from fiddler_batch.engine.compute import expert_forward
from fiddler_batch.engine.layout import ExpertLayout
from fiddler_batch.machine import last_level_cache_bytes

log = logging.getLogger(__name__)

FULL_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_LADDER = (1, 8, 32, 128, 512)
# The calibration reads distinct experts in turn, as the engine does (it never reads one expert twice in a row):
# together at least COLD_CACHES x the CPU's last-level cache and COLD_MIN_BYTES, so an expert's weights have
# left the caches when its turn comes again; at most COLD_MAX_EXPERTS of them.
COLD_CACHES = 4
COLD_MIN_BYTES = 1 << 30
COLD_MAX_EXPERTS = 16


def _interp(ladder: Sequence[int], values: Sequence[float], n: int) -> float:
    if n <= ladder[0]:
        return values[0]
    i = bisect.bisect_left(ladder, n)
    if i == len(ladder):
        i -= 1
    n0, n1, v0, v1 = ladder[i - 1], ladder[i], values[i - 1], values[i]
    return max(v0 + (v1 - v0) * (n - n0) / (n1 - n0), 0.0)


@dataclass(frozen=True)
class CostModel:
    ladder: tuple[int, ...]  # token counts measured
    cpu_ms: tuple[float, ...]  # one expert on the CPU, per ladder point
    gpu_ms: tuple[float, ...]  # one expert on the fast device, per ladder point
    copy_ms: float  # one expert's weights, pinned host memory to the fast device
    cpu_fixed_ms: float = 0.0  # per layer with CPU experts: activations to the CPU and results back
    cpu_contention: float = 1.0  # CPU expert time multiplier while copies run (shared memory bandwidth)
    copy_contention: float = 1.0  # copy time multiplier while the CPU computes experts
    meta: dict = field(default_factory=dict, compare=False)
    cpu_packed_ms: tuple[float, ...] | None = None  # one expert on the CPU from weights packed for oneDNN
    # (cpupack.py), per ladder point; None: not measured (another dtype or layout, or an older calibration)
    cpu_gemv_ms: tuple[float, ...] | None = None  # one expert on the CPU from the project's own kernel
    # (cpugemv.py), per ladder point up to cpugemv.MAX_TOKENS (shorter than the ladder); None: not measured

    def cpu(self, n: int) -> float:
        return _interp(self.ladder, self.cpu_ms, n)

    def cpu_packed(self, n: int) -> float | None:
        return _interp(self.ladder, self.cpu_packed_ms, n) if self.cpu_packed_ms is not None else None

    def packed_faster(self, n: int) -> bool:
        """The CPU expert at n tokens was measured faster from packed weights than from the weights as stored."""
        packed = self.cpu_packed(n)
        return packed is not None and packed < self.cpu(n)

    def cpu_gemv(self, n: int) -> float | None:
        """The CPU expert at n tokens from the project's own kernel; None beyond the last point measured."""
        measured = self.cpu_gemv_ms
        if not measured or n > self.ladder[len(measured) - 1]:
            return None
        return _interp(self.ladder[: len(measured)], measured, n)

    def gemv_faster(self, n: int, than: float | None = None) -> bool:
        """The own kernel was measured faster at n tokens than `than` (default: the weights as stored)."""
        gemv = self.cpu_gemv(n)
        return gemv is not None and gemv < (self.cpu(n) if than is None else than)

    def fastest_cpu(self, n: int) -> float:
        """The CPU expert at n tokens with the fastest of the ways measured (as stored, packed, own kernel)."""
        return min(t for t in (self.cpu(n), self.cpu_packed(n), self.cpu_gemv(n)) if t is not None)

    def with_fastest_cpu(self, packed: bool = True, gemv: bool = True) -> CostModel:
        """This model for an engine that computes each CPU expert the fastest way measured among those it has
        (weights as stored; `packed`: packed for oneDNN; `gemv`: the own kernel): cpu(n) is the fastest at each
        ladder point (the planner and the bound read cpu(n))."""
        best = list(self.cpu_ms)
        for times, used in ((self.cpu_packed_ms, packed), (self.cpu_gemv_ms, gemv)):
            if used and times:
                best[: len(times)] = [min(a, b) for a, b in zip(best, times)]
        return self if tuple(best) == self.cpu_ms else replace(self, cpu_ms=tuple(best))

    def gpu(self, n: int) -> float:
        return _interp(self.ladder, self.gpu_ms, n)

    def crossover(self) -> int | None:
        """The smallest token count at which copying beats CPU compute (None: never within 4x the ladder)."""
        for n in range(1, 4 * self.ladder[-1] + 1):
            if self.cpu(n) > self.copy_ms + self.gpu(n):
                return n
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostModel:
        return cls(
            ladder=tuple(data["ladder"]),
            cpu_ms=tuple(data["cpu_ms"]),
            gpu_ms=tuple(data["gpu_ms"]),
            copy_ms=float(data["copy_ms"]),
            cpu_fixed_ms=float(data.get("cpu_fixed_ms", 0.0)),
            cpu_contention=float(data.get("cpu_contention", 1.0)),
            copy_contention=float(data.get("copy_contention", 1.0)),
            meta=dict(data.get("meta", {})),
            cpu_packed_ms=tuple(data["cpu_packed_ms"]) if data.get("cpu_packed_ms") else None,
            cpu_gemv_ms=tuple(data["cpu_gemv_ms"]) if data.get("cpu_gemv_ms") else None,
        )


def experts_in_turn(expert_bytes: int, available: int) -> int:
    """How many distinct experts of `expert_bytes` the calibration reads in turn (at most `available`, at
    least 1): enough that each one's weights are out of the CPU's caches when it comes round again."""
    target = max(COLD_CACHES * (last_level_cache_bytes() or 0), COLD_MIN_BYTES)
    return max(1, min(available, COLD_MAX_EXPERTS, -(-target // max(expert_bytes, 1))))


def _in_turn(fn: Callable[[dict[str, torch.Tensor]], object], experts: Sequence[dict[str, torch.Tensor]]):
    """A call of `fn` on the next of `experts` each time (cycling)."""
    turn = itertools.cycle(experts)
    return lambda: fn(next(turn))


def cold_summary(meta: dict[str, Any]) -> str | None:
    """One line on how the CPU expert was timed (experts read in turn against one read again and again), from
    a calibration's meta; None for a calibration from before experts were read in turn."""
    if "cold_experts" not in meta:
        return None
    return (
        f"CPU experts timed reading {meta['cold_experts']} distinct experts in turn; the one-token expert read "
        f"again and again (warm in the caches) took {meta['cpu_warm_ms']:.3g} ms, read in turn "
        f"{meta['cpu_cold_over_warm']:.2f}x that"
    )


def _times_ms(fn: Callable[[], object], reps: int, sync: Callable[[], None], warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _median_ms(fn: Callable[[], object], reps: int, sync: Callable[[], None], warmup: int = 2) -> float:
    return statistics.median(_times_ms(fn, reps, sync, warmup))


def host_read_gb_per_s(nbytes: int, reps: int = 5) -> float:
    """The host's memory read bandwidth with the current thread count: a float32 sum over a buffer of
    `nbytes` (at least 64 MB, so that caches do not serve it), median of `reps`."""
    buffer = torch.ones(max(nbytes, 64 << 20) // 4, dtype=torch.float32)
    return buffer.numel() * 4 / _median_ms(buffer.sum, reps, lambda: None) / 1e6


def random_expert(layout: ExpertLayout, device: torch.device | str, pin: bool = False) -> dict[str, torch.Tensor]:
    """One expert's weights, random, in the layout's shapes (no leading expert dimension)."""
    h, i = layout.hidden, layout.intermediate
    up_rows = 2 * i if layout.has_gate else i
    shapes = {
        "up": (h, up_rows) if layout.is_transposed else (up_rows, h),
        "down": (i, h) if layout.is_transposed else (h, i),
    }
    if layout.has_bias:
        shapes.update(up_bias=(up_rows,), down_bias=(h,))
    out = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=layout.dtype, device=device, pin_memory=pin and device == "cpu")
        out[name] = t.uniform_(-0.05, 0.05)
    return out


def _packed_or_none(host: dict[str, torch.Tensor], layout: ExpertLayout) -> dict[str, torch.Tensor] | None:
    """The expert packed for oneDNN when its layout packs, else (or when packing it fails) None."""
    if not cpupack.packable(layout):
        return None
    try:
        return cpupack.pack_expert(host)
    except RuntimeError as exc:
        log.warning("packing an expert for oneDNN failed (%s): the CPU expert is measured as stored only", exc)
        return None


def _non_decreasing(values: list[float]) -> list[float]:
    """Each value capped by every value after it (times over an increasing ladder of token counts)."""
    out = list(values)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def _contention(
    cpu_step: Callable[[], object], copy_step: Callable[[], None], device: torch.device, copies: int
) -> tuple[float, float]:
    """(CPU expert time, copy time) in ms while both run at once: they share host memory bandwidth."""
    stream = torch.cuda.Stream(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(copies + 1)]
    torch.cuda.synchronize(device)
    with torch.cuda.stream(stream):
        events[0].record(stream)
        for i in range(copies):
            copy_step()
            events[i + 1].record(stream)
    cpu_times = []
    while not events[-1].query() or len(cpu_times) < 3:
        start = time.perf_counter()
        cpu_step()
        cpu_times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize(device)
    # Copies that ran while the CPU was busy: all but the last one or two, which may finish alone.
    copy_times = [events[i].elapsed_time(events[i + 1]) for i in range(max(copies - 2, 1))]
    return statistics.median(cpu_times[:-1] or cpu_times), statistics.median(copy_times)


def calibrate(
    layout: ExpertLayout,
    module: torch.nn.Module,
    device: torch.device,
    threads: int,
    quick: bool = False,
    hosts: Sequence[dict[str, torch.Tensor]] | None = None,
) -> CostModel:
    """Measure one expert of `layout` on the CPU and on `device`, the copy between them, and how much
    CPU compute and copies slow each other down when they overlap.

    `hosts`: experts' weights as they will be used (the model's own, pinned), read in turn by every CPU
    measurement and copy (cold, as in a run: see `experts_in_turn`); one random expert otherwise. The CPU
    expert read again and again (warm) at the first ladder point is kept in `meta` for comparison.
    """
    ladder = QUICK_LADDER if quick else FULL_LADDER
    reps = 3 if quick else 5
    cuda = device.type == "cuda"
    sync_dev = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    hosts = list(hosts) if hosts else [random_expert(layout, "cpu", pin=cuda)]
    first = hosts[0]
    fast = {k: torch.empty_like(v, device=device) for k, v in first.items()}
    expert_bytes = sum(v.numel() * v.element_size() for v in first.values())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            cpu_ms, gpu_ms, packed_ms, gemv_ms = [], [], [], []
            cpu_spread = 0.0
            packs = [_packed_or_none(h, layout) for h in hosts]
            packed = None if any(p is None for p in packs) else packs
            gemv = cpugemv.usable_layout(layout) and cpugemv.available()
            for n in ladder:
                x = torch.randn(n, layout.hidden, dtype=layout.dtype)
                w = torch.rand(n, dtype=layout.dtype)
                on_cpu = _in_turn(lambda h, x=x, w=w: expert_forward(module, layout, h, x, w), hosts)
                times = _times_ms(on_cpu, reps, lambda: None)
                cpu_ms.append(statistics.median(times))
                if n == ladder[0]:
                    cpu_spread = (max(times) - min(times)) / cpu_ms[-1]
                if packed is not None:
                    on_packed = _in_turn(lambda p, x=x, w=w: expert_forward(module, layout, p, x, w), packed)
                    try:
                        packed_ms.append(_median_ms(on_packed, reps, lambda: None))
                    except RuntimeError as exc:  # the packed layout is optional: measure without it
                        log.warning("the CPU expert from packed weights failed (%s): not measured", exc)
                        packed, packed_ms = None, []
                if gemv and n <= cpugemv.MAX_TOKENS:
                    on_gemv = _in_turn(lambda h, x=x, w=w: expert_forward(module, layout, h, x, w, gemv=True), hosts)
                    gemv_ms.append(_median_ms(on_gemv, reps, lambda: None))
                xd, wd = x.to(device), w.to(device)
                gpu_ms.append(
                    _median_ms(lambda xd=xd, wd=wd: expert_forward(module, layout, fast, xd, wd), reps, sync_dev)
                )

            def copy_one(h: dict[str, torch.Tensor]) -> None:
                for k, v in h.items():
                    fast[k].copy_(v, non_blocking=True)

            copy = _in_turn(copy_one, hosts)
            # Fewer tokens never take longer: a point slower than a larger one is a measurement outlier
            # (a first call that paid for warming caches or thread pools), so take the envelope from above.
            cpu_ms, gpu_ms = _non_decreasing(cpu_ms), _non_decreasing(gpu_ms)
            packed_ms = _non_decreasing(packed_ms) if packed_ms else []
            gemv_ms = _non_decreasing(gemv_ms) if gemv_ms else []
            copy_ms = _median_ms(copy, reps + 1, sync_dev)
            x1, w1 = torch.randn(1, layout.hidden, dtype=layout.dtype), torch.ones(1, dtype=layout.dtype)
            # The way the executor computes one token: the own kernel where it was measured faster.
            own = bool(gemv_ms) and gemv_ms[0] < cpu_ms[0]
            one_token_ms = gemv_ms[0] if own else cpu_ms[0]  # read in turn
            one_token = lambda h: expert_forward(module, layout, h, x1, w1, gemv=own)  # noqa: E731
            warm_ms = _median_ms(lambda: one_token(first), reps, lambda: None)
            cpu_contention = copy_contention = 1.0
            fixed_ms = 0.0
            if cuda:
                small = torch.randn(8, layout.hidden, dtype=layout.dtype, device=device)
                fixed_ms = _median_ms(lambda: small.to("cpu").to(device), reps + 1, sync_dev)
                busy_cpu, busy_copy = _contention(_in_turn(one_token, hosts), copy, device, copies=8 if quick else 16)
                cpu_contention = max(1.0, busy_cpu / one_token_ms)
                copy_contention = max(1.0, busy_copy / copy_ms)
            read_gb_per_s = host_read_gb_per_s(max(expert_bytes, COLD_CACHES * (last_level_cache_bytes() or 0)), reps)
    finally:
        torch.set_num_threads(previous_threads)
    meta = {
        "geometry": layout.geometry_key(),
        "threads": threads,
        "expert_bytes": expert_bytes,
        "copy_gb_per_s": round(expert_bytes / copy_ms / 1e6, 2) if copy_ms else None,
        # The CPU expert at the ladder's first point against what the host's memory can be read at, and how far
        # apart its timed runs were (max - min over the median).
        "host_read_gb_per_s": round(read_gb_per_s, 2),
        "cpu_share_of_read": round(expert_bytes / cpu_ms[0] / 1e6 / read_gb_per_s, 3),
        "cpu_spread": round(cpu_spread, 3),
        # Distinct experts read in turn (1: one expert again and again), and the one-token expert of the way the
        # executor uses read warm, against the same read cold (the times above).
        "cold_experts": len(hosts),
        "cpu_warm_ms": round(warm_ms, 4),
        "cpu_cold_over_warm": round(one_token_ms / warm_ms, 3),
        "quick": quick,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if packed_ms:
        meta["cpu_packed_share_of_read"] = round(expert_bytes / packed_ms[0] / 1e6 / read_gb_per_s, 3)
    if gemv_ms:
        meta["cpu_gemv_share_of_read"] = round(expert_bytes / gemv_ms[0] / 1e6 / read_gb_per_s, 3)
    return CostModel(
        tuple(ladder),
        tuple(cpu_ms),
        tuple(gpu_ms),
        copy_ms,
        fixed_ms,
        cpu_contention,
        copy_contention,
        meta,
        cpu_packed_ms=tuple(packed_ms) if packed_ms else None,
        cpu_gemv_ms=tuple(gemv_ms) if gemv_ms else None,
    )
