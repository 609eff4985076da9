"""CUDA graphs for the experts that a small experts call computes on the GPU (`engine.expert_graphs`).

In a decode step the executor queues, per layer call, each expert the GPU computes whole (resident, staged by a
prefetch, or copied) as a handful of kernels: the up product, the gate, the down product, the scaling by the
routing weight and the write into the call's rows; a split expert's GPU share is a few more, before the CPU starts
and after its columns arrive. The GPU runs them in microseconds; the host takes about 0.13 ms per expert to launch
them from Python (`benchmarks/launch_probe.py` on an H200 host, one token), and in a layer with a resident expert and
a split one that time comes before or after the CPU's share, on the step's critical path. Replayed as a CUDA graph,
the same kernels take the host about 0.005 ms to launch.

`ExpertGraphs.run(key, work)` takes a function that queues GPU work on the current stream, reading and writing
only tensors made outside it. The first call with a key runs it on the graphs' own stream (which lets the
libraries set up their per-stream state there); the second captures it there without running it, then replays
the graph; later calls replay. The key names the memory the work reads and writes by address, shape, strides
and dtype (`tensor_key`), and what else shapes it (the module whose gate it applies, the rows), so that a graph
replays only over the same memory with the same meaning; the executor keeps the tensors of small calls at fixed
addresses (`CallBuffers`) so that keys repeat from one step to the next. The graphs share one memory pool for
what the work makes in between: they run one after another on the current stream, and nothing they make outlives
a replay.

The kernels are the ones the work queues eagerly, on the same shapes, so every output is the same number. A
capture that fails turns the graphs off for the executor, with one log line; the work then runs eagerly. First runs
and captures take the host longer than the eager work (`unsettled` counts them): the executor leaves the calls that
had one out of its measure of the CPU's start (`adaptive.StartLag`), which the first layer calls of a run make.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from fiddler_batch.engine.graphs import first_line, on_side_stream

log = logging.getLogger(__name__)

MAX_SLOTS = 16
"""Calls of at most this many token slots (tokens x experts per token) use graphs: decode, beam search and small
batches, whose GPU experts take the host longer to launch than the GPU to run."""

MAX_GRAPHS = 2048
"""Graphs kept at once; the least recently replayed goes first."""


def tensor_key(t: torch.Tensor) -> tuple:
    """What a captured kernel depends on of a tensor it reads or writes."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


class ExpertGraphs:
    """Captured graphs by key, oldest replay first, with the stream and memory pool they are captured in."""

    def __init__(self, device: torch.device, max_graphs: int = MAX_GRAPHS):
        self.device = device
        self.max_graphs = max_graphs
        self.disabled = False  # a capture failed: every work runs eagerly
        self.graphs: OrderedDict[Hashable, torch.cuda.CUDAGraph] = OrderedDict()
        self._seen: OrderedDict[Hashable, None] = OrderedDict()  # keys run once, not captured yet
        self._stream: torch.cuda.Stream | None = None
        self._pool = None
        self.captures = 0
        self.replays = 0
        self.unsettled = 0  # works run on the graphs' stream or captured: one-off host time, not a replay's

    @property
    def stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def run(self, key: Hashable | None, work: Callable[[], None]) -> bool:
        """Queue `work` on the current stream: replayed when `key` has a graph, else eagerly or captured (see the
        module docstring); None: eagerly, outside the graphs. True when a graph ran it."""
        if key is None or self.disabled or self._capturing():
            work()
            return False
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self._seen:
                self._seen[key] = None
                if len(self._seen) > self.max_graphs:
                    self._seen.popitem(last=False)
                self.unsettled += 1
                self._on_stream(work)
                return False
            del self._seen[key]
            self.unsettled += 1
            graph = self._capture(work)
            if graph is None:
                work()
                return False
            self.graphs[key] = graph
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        self._replay(graph)
        return True

    def clear(self) -> None:
        """Free every graph (the tensors they were captured over are going away)."""
        self.graphs.clear()
        self._seen.clear()

    # -- the CUDA parts (tests replace them) ----------------------------------------------------------

    def _capturing(self) -> bool:
        """The current stream is being captured (a caller's graph): its work cannot start a capture of its own."""
        return torch.cuda.is_current_stream_capturing()

    def _on_stream(self, work: Callable[[], None]) -> None:
        """Run `work` on the graphs' stream, ordered after what is queued before and before what follows."""
        with on_side_stream(self.stream, self.device):
            work()

    def _capture(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        """`work` captured without running it; None when it cannot be (graphs are then off)."""
        try:
            graph = self._record(work)
        except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly from now on
            self.disabled = True
            self.clear()
            log.warning(
                "expert graphs: an expert's GPU work could not be captured (%s: %s); experts are launched eagerly",
                type(exc).__name__,
                first_line(exc),
            )
            return None
        self.captures += 1
        return graph

    def _record(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Capture `work` on the graphs' stream, ordered after what is queued before and before what follows."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with on_side_stream(self.stream, self.device):  # a capture ends on the stream it began on
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                work()
            finally:
                graph.capture_end()
        return graph

    def _replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()
        self.replays += 1


class CallBuffers:
    """Device tensors of one shape and dtype kept at fixed addresses from one call to the next (the gathered
    rows, the routing weights and the per-slot outputs of small experts calls), so that graphs captured over
    them replay in later calls."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (role, shape, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return buffer
