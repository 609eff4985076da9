"""Host memory the GPU can copy from without a bounce buffer: page-locked ("pinned")."""

from __future__ import annotations

import ctypes
import os

import torch

# Registered tensors, kept alive until unpinned: freeing memory that is still registered would leave a
# stale registration that makes later registrations of the same addresses fail.
_registered: dict[int, torch.Tensor] = {}


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last-error slot after a failed registration, so that the next kernel
    launch does not report it."""
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOLOAD).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue


def pin_in_place(tensor: torch.Tensor) -> torch.Tensor:
    """Page-lock `tensor`'s memory without copying it; falls back to a pinned copy where that fails.

    Registering in place keeps one copy of the expert weights in RAM (a pinned copy would double the
    peak while it is made) and avoids the size rounding of PyTorch's pinned allocator. The tensor stays
    referenced here until `unpin`.
    """
    if tensor.device.type != "cpu" or not torch.cuda.is_available() or tensor.is_pinned() or tensor.numel() == 0:
        return tensor
    if tensor.is_contiguous() and tensor.storage_offset() == 0:
        ptr, nbytes = tensor.data_ptr(), tensor.untyped_storage().nbytes()
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        if int(err) == 0:
            _registered[ptr] = tensor
            return tensor
        _clear_cuda_error()
    return tensor.pin_memory()


def unpin(tensor: torch.Tensor) -> None:
    """Undo `pin_in_place` for memory it registered (a pinned copy is freed with its last reference)."""
    if _registered.pop(tensor.data_ptr(), None) is not None:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


class PinnedBuffer:
    """A growable host buffer, pinned when a GPU is in use, for activations crossing PCIe. `get` hands out views of
    its start; the views of recent shapes are kept, since a decode step asks for the same few shapes layer after
    layer and making a view takes microseconds of the host's time each."""

    VIEWS_KEPT = 64

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self._views: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A [shape] tensor of `dtype` over the buffer's first bytes (the same memory for every shape)."""
        view = self._views.get((shape, dtype))
        if view is not None:
            return view
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(nbytes, 2 * self.buffer.numel()), dtype=torch.uint8, pin_memory=self.pin)
            self._views.clear()  # views of the old buffer
        if len(self._views) >= self.VIEWS_KEPT:
            self._views.clear()
        view = self._views[(shape, dtype)] = self.buffer[:nbytes].view(dtype).view(shape)
        return view
