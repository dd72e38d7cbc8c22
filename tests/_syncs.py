"""Count the host syncs a piece of code would cost on a GPU, by running it on the CPU.

A host sync is a read of a tensor's *values* by the host: on a GPU the host waits for
every queued kernel. On the CPU nothing waits, but the same reads go through the same
operators, so they can be counted: ``bool(t)``, ``t.item()`` and ``float(t)`` reach
``aten._local_scalar_dense``; ops whose output shape depends on the values (``nonzero``,
boolean indexing, ``unique``, ...) and ``torch.equal`` read them too; ``tolist()`` and
``numpy()`` copy them out without a dispatched op, so they are caught one level up.

Used by the tests (a default ``MeanFlowLoss`` call reads the host once) and by
``benchmarks/host_syncs.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: Dispatched operators that read values to the host (``aten.item`` and ``aten.is_nonzero``
#: reach the dispatcher as ``_local_scalar_dense``; they are listed for completeness).
DISPATCHED = (
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.repeat_interleave",
    "aten.bincount",
)
#: Dispatched operators that read the host only with a boolean (mask) index.
MASK_INDEXED = ("aten.index", "aten.index_put", "aten.index_put_")
#: Tensor methods that copy values out without a dispatched operator.
METHODS = ("tolist", "numpy", "__array__")


def _is_mask(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8)


class _Dispatched(TorchDispatchMode):
    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"aten.{func._overloadpacket.__name__}"
        if name in DISPATCHED:
            self.reads.append(name)
        elif name in MASK_INDEXED and any(_is_mask(i) for i in (args[1] or ())):
            self.reads.append(f"{name} (mask)")
        return func(*args, **(kwargs or {}))


class _Methods(TorchFunctionMode):
    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in METHODS:
            self.reads.append(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Record every host read inside the block; yields the list of their op names."""
    reads: list[str] = []
    with _Methods(reads), _Dispatched(reads):
        yield reads
