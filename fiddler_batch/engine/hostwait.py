"""A CUDA stream that waits for the host: the GPU side of the executor's CPU worker.

The executor computes a layer's CPU experts on a worker thread and lets the main thread go on queueing the
rest of the step (the layer's sum, the next layer's attention, norms and router) behind a wait on a flag in
pinned host memory. The worker writes the flag once the experts' results are in their pinned buffer; the
stream then copies them in and runs what was queued. So the host's launch time overlaps the CPU experts
instead of following them.

The wait is the driver's stream memory operation `cuStreamWaitValue32` (CUDA 11.7 and later, `_v2` entry
point), called through ctypes on the driver library that PyTorch's CUDA build already loaded; no kernel and
no SM is tied up while it waits. Where the driver lacks it, `StreamGate.open` returns None and the executor
computes CPU experts on the calling thread as before.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger("fiddler_batch.engine")

WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: until (int32)(*addr - value) >= 0, a cyclic comparison


class StreamGate:
    """A pinned 32-bit counter that CUDA streams can wait on. `arm()` gives the value of the next release,
    `hold(stream, value)` makes `stream` wait until the counter reaches it, `release(value)` (any thread) lets
    it go. Values increase by one per arm and wrap around, which the cyclic comparison allows."""

    def __init__(self, wait_fn: ctypes._CFuncPtr, flag: torch.Tensor, address: int):
        self._wait = wait_fn
        self._flag = flag  # keeps the pinned memory alive
        self._cell = ctypes.c_uint32.from_address(flag.data_ptr())
        self._address = address  # the counter's device address
        self._next = 0

    @classmethod
    def open(cls, device: torch.device) -> StreamGate | None:
        """A gate for streams of `device`, or None where the driver cannot wait on host memory."""
        if device.type != "cuda" or not torch.cuda.is_available() or torch.version.cuda is None:
            return None
        try:
            driver = ctypes.CDLL("libcuda.so.1")
            wait_fn = driver.cuStreamWaitValue32_v2
            host_pointer = driver.cuMemHostGetDevicePointer_v2
        except (OSError, AttributeError) as exc:
            log.info("CPU experts run on the calling thread: the CUDA driver cannot wait on host memory (%s)", exc)
            return None
        wait_fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        wait_fn.restype = ctypes.c_int
        host_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        host_pointer.restype = ctypes.c_int
        torch.cuda.init()
        flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        address = ctypes.c_uint64(0)
        err = host_pointer(ctypes.byref(address), ctypes.c_void_p(flag.data_ptr()), 0)
        if err != 0:
            log.info("CPU experts run on the calling thread: pinned memory has no device address (CUDA error %d)", err)
            return None
        gate = cls(wait_fn, flag, address.value)
        try:  # one wait that is already satisfied: proves the call works on this device and driver
            gate.hold(torch.cuda.current_stream(device), 0)
            torch.cuda.current_stream(device).synchronize()
        except RuntimeError as exc:
            log.info("CPU experts run on the calling thread: %s", exc)
            return None
        return gate

    def arm(self) -> int:
        self._next = (self._next + 1) & 0xFFFFFFFF
        return self._next

    def hold(self, stream: torch.cuda.Stream, value: int) -> None:
        """Queue on `stream` a wait until the counter has reached `value`."""
        err = self._wait(ctypes.c_void_p(stream.cuda_stream), self._address, value, WAIT_GEQ)
        if err != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA error {err}")

    def release(self, value: int) -> None:
        """Set the counter to `value` (a plain store: the results written before it are visible first)."""
        self._cell.value = value
