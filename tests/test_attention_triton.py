"""The Triton kernels of mfcore.attention (forward, tangent, backward) against the reference.

On CPU the kernel runs under Triton's interpreter. Triton fixes interpreted vs compiled
when it is first imported, so the interpreted cases (tests/attention_triton_cases.py) run
in a fresh process with ``TRITON_INTERPRET=1``; this keeps a plain ``pytest tests/`` run,
where other files may import triton first, correct. On a CUDA machine the ``gpu`` tests
below run the compiled kernel in this process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mfcore.attention_reference import ScoreSpec, reference_backward, reference_forward
from tests._attention_data import TOL, _data, _exact, _rel, run_interpreted

F64 = torch.float64
CASES = Path(__file__).with_name("attention_triton_cases.py")


def test_interpreted_kernel_cases():
    pytest.importorskip("triton")
    run_interpreted(CASES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_compiled_kernel_on_cuda(dtype, d):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernel is not in use")
    fj_cuda = pytest.importorskip("mfcore.kernels.flash_jvp")
    primals, tangents, keep = _data(2, 3, 300, 257, d, dtype, seed=6)
    primals, tangents = ([x.cuda() for x in xs] for xs in (primals, tangents))
    keep = keep.cuda()
    scale = d**-0.5
    out, lse, tan = fj_cuda.attention_forward(*primals, tangents, key_mask=keep, scale=scale)
    ref_out, _, ref_tan = _exact(primals, tangents, keep, scale)
    assert _rel(out, ref_out) < TOL[dtype] and _rel(tan, ref_tan) < 2 * TOL[dtype]
    tan2 = fj_cuda.attention_tangent(*primals, out, lse, tangents, key_mask=keep, scale=scale)
    assert _rel(tan2, ref_tan) < 2 * TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_compiled_backward_on_cuda(dtype):
    """The autotuned backward kernels at a real-ish size (S=1000, D=128; odd S_k; one
    sequence with every key masked) against the float64 reference gradients."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernel is not in use")
    fj_cuda = pytest.importorskip("mfcore.kernels.flash_jvp")
    fb_cuda = pytest.importorskip("mfcore.kernels.flash_bwd")
    primals, _, keep = _data(2, 2, 1000, 999, 128, dtype, seed=8)
    primals, keep = [x.cuda() for x in primals], keep.cuda()
    scale = 128**-0.5
    out, lse, _ = fj_cuda.attention_forward(*primals, None, key_mask=keep, scale=scale)
    g = torch.Generator(device="cuda").manual_seed(9)
    grad_o = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    grads = fb_cuda.attention_backward(*primals, out, lse, grad_o, key_mask=keep, scale=scale)
    p64 = [x.double() for x in primals]
    spec = ScoreSpec("keys", keep, scale)
    ref_out, ref_lse, _ = reference_forward(*p64, None, spec)
    ref = reference_backward((*p64, ref_out, ref_lse), grad_o.double(), spec)
    for got, r in zip(grads, ref, strict=True):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert _rel(got, r) < 2 * TOL[dtype]
    assert all((got[-1] == 0).all() for got in grads)  # the all-masked sequence


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False])
def test_triton_backend_jvp_then_backward_on_cuda(fused, monkeypatch):
    import mfcore.attention as attn_mod

    monkeypatch.setattr(attn_mod, "_FUSE_DUAL", fused)
    primals, tangents, keep = _data(2, 4, 200, 333, 64, torch.bfloat16, seed=7)
    primals, tangents = ([x.cuda() for x in xs] for xs in (primals, tangents))
    keep = keep.cuda()
    results = {}
    for backend in ("triton", "reference"):
        inputs = tuple(p.clone().requires_grad_() for p in primals)

        def fn(q, k, v, backend=backend):
            return attn_mod.attention(q, k, v, attn_mask=keep, backend=backend)

        out, tan = torch.func.jvp(fn, inputs, tuple(tangents))
        grads = torch.autograd.grad(out.float().square().sum(), inputs)
        results[backend] = (out, tan, *grads)
    for a, r in zip(results["triton"], results["reference"], strict=True):
        assert _rel(a, r.double()) < 3e-2
