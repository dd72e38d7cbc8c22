"""FLUX's names for trajectory alignment on shared weights (see :mod:`mfcore.adapters.alignment`).

The fake-velocity critic and the alignment term are the adapter core's, the same for every
family; these aliases keep the names FLUX code has used.
"""

from mfcore.adapters.alignment import CRITICS, Alignment, FakeVelocity

__all__ = ["CRITICS", "FluxFakeVelocity", "FluxAlignment"]

#: :class:`mfcore.adapters.alignment.FakeVelocity` on a FLUX student.
FluxFakeVelocity = FakeVelocity
#: :class:`mfcore.adapters.alignment.Alignment` (the entry point's alignment term).
FluxAlignment = Alignment
