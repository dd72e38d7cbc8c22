"""Comparisons with a tolerance that names the precision they expect.

Bitwise equality is the contract only where both sides run in one process on one machine
(a killed and resumed run against an uninterrupted one). A value stored on one machine and
recomputed on another, or computed by two code paths, agrees only to the rounding of the
kernels involved: another CPU (AVX-512 against AVX2 against torch's non-vectorised
``ATEN_CPU_CAPABILITY=default`` kernels) sums in another order and rounds ``exp``/``sin``
differently.
"""

from __future__ import annotations

import torch

# fp64 arithmetic throughout: two code paths or two CPUs differ by reordered sums only.
FP64 = 1e-12
# fp32 rounding, amplified through a few layers or training steps. The FLUX and HunyuanImage
# models of diffusers compute their timestep and rotary embeddings in fp32 even when the model
# is fp64, so their "fp64" outputs agree across CPUs to about 1e-6 of their scale (measured:
# at most 5e-6 on AVX-512 and under ATEN_CPU_CAPABILITY=default); a changed formula moves
# them by far more.
FP32 = 1e-4


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (the expected's scale, not per element)."""
    scale = expected.detach().abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual.detach() - expected.detach()).abs().max() / scale)


def flat(state: dict[str, torch.Tensor], keys) -> torch.Tensor:
    """The tensors of ``state`` at ``keys``, flattened into one vector.

    A trained state is compared as a whole: after a few Adam steps a tensor that started at
    zero (LoRA's ``B``) holds updates of the size of the learning rate, so its own scale
    magnifies its rounding, while a changed formula moves the whole state by that size.
    """
    return torch.cat([state[k].detach().flatten() for k in keys])


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, rel: float, name: str = ""):
    """Same shape and dtype, and within ``rel`` of ``expected``'s largest entry."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    assert torch.isfinite(actual).all(), name
    err = max_rel(actual, expected)
    assert err <= rel, f"{name}: relative error {err:.3e} > {rel:.0e}"
