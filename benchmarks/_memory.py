"""Tensor memory of a step: the peak, and what is held at a point, on CPU and CUDA.

On CUDA these are the caching allocator's counters (``torch.cuda.max_memory_allocated``,
``memory_allocated``). A CPU has no such counters, so :class:`TensorMemory` counts the
storages that torch's kernels create while it is active (a ``TorchDispatchMode`` sees every
op below autograd, forward-mode tangents included) and drops each when its storage is freed:
exact bytes of tensor data, without the allocator's slack or torch's own small buffers.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _StorageCounter(TorchDispatchMode):
    """Counts the bytes of the live storages created under it, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self.refs.pop(key, None)

    def _track(self, x: object) -> None:
        if not isinstance(x, torch.Tensor) or x.device.type == "meta":
            return
        storage = x.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        self.refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            self._track(x)
        return out


class TensorMemory:
    """Peak and current tensor bytes of what runs inside :meth:`track`, above its start.

    Example::

        mem = TensorMemory(device)
        with mem.track():
            loss = forward()
            held = mem.current()   # what the forward leaves for the backward
            loss.backward()
        peak = mem.peak
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.peak = 0.0
        self._base = 0.0
        self._counter: _StorageCounter | None = None

    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def current(self) -> float:
        """Bytes allocated now, above the start of :meth:`track`."""
        gc.collect()
        if self._cuda():
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) - self._base
        assert self._counter is not None
        return float(self._counter.current)

    @contextlib.contextmanager
    def track(self):
        gc.collect()
        if self._cuda():
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = float(torch.cuda.memory_allocated(self.device))
            yield self
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._counter = _StorageCounter()
        with self._counter:
            yield self
        self.peak = float(self._counter.peak)
