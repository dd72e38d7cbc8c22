"""Interpreted-kernel cases for tests/test_attention_triton.py (not collected on its own).

Triton decides at import time whether its jit functions (``tl.zeros`` included) are
interpreted, so ``TRITON_INTERPRET=1`` must be set before triton is first imported.
tests/test_attention_triton.py runs this file in a fresh process with the variable set;
run directly, it skips unless the variable is set.
"""

from __future__ import annotations

import math
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_attention_triton.py", allow_module_level=True)

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mfcore.attention as attn_mod  # noqa: E402
from mfcore.attention import attention  # noqa: E402
from mfcore.attention_reference import (  # noqa: E402
    ScoreSpec,
    reference_backward,
    reference_forward,
    reference_tangent,
)

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from mfcore.kernels import flash_bwd, flash_jvp  # noqa: E402
from tests._attention_data import TOL, _data, _exact, _rel  # noqa: E402

F64 = torch.float64


@pytest.fixture(scope="module")
def fj():
    """The kernel module, its kernels interpreted (CPU tensors)."""
    assert isinstance(flash_jvp._attn_jvp_kernel, InterpretedFunction)
    return flash_jvp


@pytest.fixture(scope="module")
def fb():
    """The backward kernel module, its kernels interpreted (CPU tensors)."""
    for kernel in (flash_bwd._delta_kernel, flash_bwd._dkdv_kernel, flash_bwd._dq_kernel):
        assert isinstance(kernel, InterpretedFunction)
    return flash_bwd


SHAPES = [  # (B, H, S_q, S_k, D): odd lengths, S_q != S_k, length 1, non-power-of-two D
    (1, 1, 1, 1, 16),
    (2, 2, 19, 23, 16),
    (1, 2, 33, 7, 32),
    (2, 1, 5, 40, 24),
    (1, 1, 17, 17, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_forward_and_tangent_match_reference(fj, shape, dtype):
    b, h, s_q, s_k, d = shape
    primals, tangents, keep = _data(b, h, s_q, s_k, d, dtype, masked=b > 1 or s_k > 1)
    scale = 1 / math.sqrt(d)
    out, lse, tan = fj.attention_forward(*primals, tangents, key_mask=keep, scale=scale)
    ref_out, ref_lse, ref_tan = _exact(primals, tangents, keep, scale)
    assert out.dtype == tan.dtype == dtype and lse.dtype == torch.float32
    assert _rel(out, ref_out) < TOL[dtype]
    assert _rel(tan, ref_tan) < 2 * TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # +inf exactly on all-masked rows
    assert _rel(lse[finite], ref_lse[finite]) < 1e-5
    if keep is not None and b > 1:
        assert (out[-1] == 0).all() and (tan[-1] == 0).all()


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2)], ids=str)
def test_tangent_from_lse_matches_reference(fj, which):
    primals, tangents, keep = _data(2, 2, 21, 18, 16, torch.float32, seed=1)
    tangents = tuple(t if i in which else None for i, t in enumerate(tangents))
    scale = 0.37
    out, lse, none = fj.attention_forward(*primals, None, key_mask=keep, scale=scale)
    assert none is None
    tan = fj.attention_tangent(*primals, out, lse, tangents, key_mask=keep, scale=scale)
    ref_out, ref_lse, _ = _exact(primals, (None,) * 3, keep, scale)
    t64 = [None if t is None else t.double() for t in tangents]
    saved = (*(x.double() for x in primals), ref_out, ref_lse)
    ref_tan = reference_tangent(saved, t64, ScoreSpec("keys", keep, scale))
    assert _rel(tan, ref_tan) < 4e-5


@settings(max_examples=8, deadline=None)
@given(
    s_q=st.integers(1, 40), s_k=st.integers(1, 40), d=st.sampled_from([8, 16, 32]),
    scale=st.floats(0.05, 2.0), seed=st.integers(0, 1000),
)  # fmt: skip
def test_kernel_property_any_lengths(fj, s_q, s_k, d, scale, seed):
    primals, tangents, keep = _data(2, 1, s_q, s_k, d, torch.float32, seed=seed)
    out, _, tan = fj.attention_forward(*primals, tangents, key_mask=keep, scale=scale)
    ref_out, _, ref_tan = _exact(primals, tangents, keep, scale)
    assert _rel(out, ref_out) < 1e-4 and _rel(tan, ref_tan) < 1e-4


def test_non_contiguous_inputs(fj):
    """(B, S, H, D) storage viewed as (B, H, S, D), as diffusers passes it."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 13, 3, 16, generator=g).transpose(1, 2) for _ in range(3))
    tangents = tuple(torch.randn(2, 13, 3, 16, generator=g).transpose(1, 2) for _ in range(3))
    out, _, tan = fj.attention_forward(q, k, v, tangents, scale=0.25)
    ref_out, _, ref_tan = _exact((q, k, v), tangents, None, 0.25)
    assert _rel(out, ref_out) < 2e-5 and _rel(tan, ref_tan) < 4e-5


@pytest.fixture(params=[True, False], ids=["fused", "from_lse"])
def fuse(request, monkeypatch):
    monkeypatch.setattr(attn_mod, "_FUSE_DUAL", request.param)


def test_attention_triton_backend_jvp_and_backward(fj, fuse):
    """torch.func.jvp then backward through the primal, against the reference backend."""
    primals, tangents, keep = _data(2, 2, 11, 14, 16, torch.float32, seed=3)
    results = {}
    for backend in ("triton", "reference"):
        inputs = tuple(p.clone().requires_grad_() for p in primals)

        def fn(q, k, v, backend=backend):
            return attention(q, k, v, attn_mask=keep, backend=backend)

        out, tan = torch.func.jvp(fn, inputs, tangents)
        grads = torch.autograd.grad((out * out).sum(), inputs)
        results[backend] = (out, tan, *grads)
    for a, r in zip(results["triton"], results["reference"], strict=True):
        assert _rel(a, r.double()) < 1e-4


def test_backward_uses_the_kernels_logsumexp(fj):
    primals, _, keep = _data(2, 1, 9, 12, 16, torch.float32, seed=4)
    out, lse, _ = fj.attention_forward(*primals, None, key_mask=keep, scale=0.25)
    grad_o = torch.randn_like(out)
    ours = reference_backward((*primals, out, lse), grad_o, ScoreSpec("keys", keep, 0.25, 4))
    p64 = tuple(x.double() for x in primals)
    spec = ScoreSpec("keys", keep, 0.25)
    ref_out, ref_lse, _ = reference_forward(*p64, None, spec)
    ref = reference_backward((*p64, ref_out, ref_lse), grad_o.double(), spec)
    for a, r in zip(ours, ref, strict=True):
        assert _rel(a, r) < 1e-4


def test_forward_ad_api(fj, fuse):
    from torch.autograd import forward_ad as fwAD

    primals, tangents, keep = _data(1, 2, 8, 9, 16, torch.float32, seed=5)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
        out = attention(*duals, attn_mask=keep, backend="triton")
        tan = fwAD.unpack_dual(out).tangent
    _, _, ref = _exact(primals, tangents, keep, 0.25)
    assert _rel(tan, ref) < 4e-5


def test_compiled_module_tangents_match_eager(fj, fuse):
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 48)

    def model(x):
        q, k, v = proj(x).reshape(1, 6, 3, 1, 16).permute(2, 0, 3, 1, 4)
        return attention(q, k, v, backend="triton")

    x, tx = torch.randn(1, 6, 16), torch.randn(1, 6, 16)
    eager = torch.func.jvp(model, (x,), (tx,))
    torch._dynamo.reset()
    compiled = torch.func.jvp(torch.compile(model, backend="aot_eager"), (x,), (tx,))
    for a, e in zip(compiled, eager, strict=True):
        assert _rel(a, e.double()) < 1e-6


def test_auto_backend_stays_on_reference_for_cpu(fj):
    primals, _, _ = _data(1, 1, 3, 3, 16, torch.float32, masked=False)
    assert attn_mod._select_path("auto", primals[0], primals[2], "none") == "reference"
    assert attn_mod._select_path("triton", primals[0], primals[2], "none") == "triton"


# ---------------------------------------------------------------------------------------
# The backward kernel (mfcore.kernels.flash_bwd)
# ---------------------------------------------------------------------------------------


def _exact_grads(primals, keep, scale, grad_o):
    """float64 gradients of ``<grad_o, O>`` by autograd through math attention.

    Independent of the library's formulas: masked keys get zero weight, and an all-masked
    row divides zero weights by one, so its output and gradients are exactly zero.
    """
    q, k, v = (x.detach().double().requires_grad_() for x in primals)
    s = scale * q @ k.transpose(-1, -2)
    w = torch.exp(s - s.amax(-1, keepdim=True).detach())
    if keep is not None:
        w = w * keep[:, None, None, :]
    total = w.sum(-1, keepdim=True)
    o = (w / (total + (total == 0))) @ v
    return torch.autograd.grad(o, (q, k, v), grad_o.double())


def _kernel_grads(fj, fb, primals, keep, scale, grad_o):
    out, lse, _ = fj.attention_forward(*primals, None, key_mask=keep, scale=scale)
    return fb.attention_backward(*primals, out, lse, grad_o, key_mask=keep, scale=scale)


def _grad_o(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


BWD_SHAPES = [  # (B, H, S_q, S_k, D): length 1, odd and unequal lengths, D padded (40)
    (1, 1, 1, 1, 16),
    (2, 2, 17, 33, 16),
    (1, 2, 33, 7, 64),
    (2, 1, 5, 40, 40),
    (2, 1, 19, 1, 64),
]


@pytest.mark.parametrize("masked", [True, False], ids=["key_mask", "no_mask"])
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backward_kernel_matches_exact_gradients(fj, fb, shape, dtype, masked):
    b, h, s_q, s_k, d = shape
    primals, _, keep = _data(b, h, s_q, s_k, d, dtype, seed=s_q, masked=masked)
    scale = 1 / math.sqrt(d)
    grad_o = _grad_o((b, h, s_q, d), dtype)
    grads = _kernel_grads(fj, fb, primals, keep, scale, grad_o)
    exact = _exact_grads(primals, keep, scale, grad_o)
    for name, got, ref, x in zip("qkv", grads, exact, primals, strict=True):
        assert got.shape == x.shape and got.dtype == dtype, name
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref) < 2 * TOL[dtype], name
    if keep is not None:  # nothing reaches masked keys; an all-masked sequence gets zeros
        assert (grads[1].transpose(1, 2)[~keep] == 0).all()
        assert (grads[2].transpose(1, 2)[~keep] == 0).all()
        if b > 1:
            assert not keep[-1].any() and all((g[-1] == 0).all() for g in grads)


@settings(max_examples=6, deadline=None)
@given(
    s_q=st.integers(1, 40), s_k=st.integers(1, 40), d=st.sampled_from([8, 16, 24]),
    scale=st.floats(0.05, 2.0), seed=st.integers(0, 1000),
)  # fmt: skip
def test_backward_property_any_lengths(fj, fb, s_q, s_k, d, scale, seed):
    """Exact gradients for any lengths, and the shift identity ``sum_j dK_j = 0``.

    Adding one vector to every key shifts each row's scores by a constant, which softmax
    ignores, so the gradients of all keys of a (batch, head) sum to zero.
    """
    primals, _, keep = _data(2, 1, s_q, s_k, d, torch.float32, seed=seed)
    grad_o = _grad_o((2, 1, s_q, d), torch.float32, seed)
    grads = _kernel_grads(fj, fb, primals, keep, scale, grad_o)
    for got, ref in zip(grads, _exact_grads(primals, keep, scale, grad_o), strict=True):
        assert _rel(got, ref) < 1e-4
    assert grads[1].double().sum(2).abs().max() < 1e-4 * max(1.0, grads[1].abs().max().item())


def test_backward_non_contiguous_inputs_and_expanded_grad(fj, fb):
    """(B, S, H, D) views as diffusers passes them, and the zero-stride gradient that
    ``out.sum().backward()``-style losses produce."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g).transpose(1, 2) for n in (13, 9, 9))
    grad_o = torch.randn(16, generator=g).expand(2, 3, 13, 16)
    grads = _kernel_grads(fj, fb, (q, k, v), None, 0.3, grad_o)
    for got, ref in zip(grads, _exact_grads((q, k, v), None, 0.3, grad_o), strict=True):
        assert got.is_contiguous() and _rel(got, ref) < 2e-5


def _bwd_inputs():
    primals, _, keep = _data(2, 1, 5, 6, 16, torch.float32)
    out, lse, _ = flash_jvp.attention_forward(*primals, None, key_mask=keep, scale=0.25)
    values = (*primals, out, lse, torch.ones_like(out))
    return dict(zip(("q", "k", "v", "o", "lse", "grad_o"), values, strict=True)), keep


@pytest.mark.parametrize(
    ("name", "bad", "match"),
    [
        ("lse", lambda x: x.double(), "lse must be float32"),
        ("lse", lambda x: x[:, :, :-1], "lse must be float32 of shape"),
        ("grad_o", lambda x: x[..., :-1], "grad_o must match q"),
        ("o", lambda x: x.half(), "o must match q"),
        ("v", lambda x: x[:, :, :-1], "v must match k"),
        ("k", lambda x: x[..., :-1], "do not match"),
    ],
)
def test_backward_rejects_inconsistent_inputs(fb, name, bad, match):
    inputs, keep = _bwd_inputs()
    inputs[name] = bad(inputs[name])
    with pytest.raises(ValueError, match=match):
        fb.attention_backward(*inputs.values(), key_mask=keep, scale=0.25)


@pytest.mark.parametrize("bad", [lambda m: m[:, :-1], lambda m: m.float()], ids=["shape", "dtype"])
def test_backward_rejects_bad_key_mask(fb, bad):
    inputs, keep = _bwd_inputs()
    with pytest.raises(ValueError, match="key_mask must be boolean"):
        fb.attention_backward(*inputs.values(), key_mask=bad(keep), scale=0.25)


def _count_kernel_calls(mp: pytest.MonkeyPatch) -> list[int]:
    """Spy on the Triton backward (it still runs); returns the list its calls append to."""
    calls = []
    original = flash_bwd.attention_backward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mp.setattr(flash_bwd, "attention_backward", spy)
    return calls


@settings(max_examples=4, deadline=None)
@given(
    s_q=st.integers(1, 24), s_k=st.integers(1, 24), fused=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000),
)  # fmt: skip
def test_triton_backend_jvp_then_backward_uses_the_kernel(s_q, s_k, fused, dtype, seed):
    """End to end: ``torch.func.jvp`` then a backward through the primal, Triton backend
    (the Triton backward kernel runs) against the reference backend."""
    primals, tangents, keep = _data(2, 2, s_q, s_k, 16, dtype, seed=seed)
    results = {}
    with pytest.MonkeyPatch.context() as mp:  # hypothesis reruns: no function-scoped fixture
        calls = _count_kernel_calls(mp)
        mp.setattr(attn_mod, "_FUSE_DUAL", fused)
        for backend in ("triton", "reference"):
            inputs = tuple(p.clone().requires_grad_() for p in primals)

            def fn(q, k, v, backend=backend):
                return attention(q, k, v, attn_mask=keep, backend=backend)

            out, tan = torch.func.jvp(fn, inputs, tangents)
            (out.float() * out.float()).sum().backward()
            results[backend] = (out, tan, *(x.grad for x in inputs))
    assert len(calls) == 1
    tol = 1e-4 if dtype == torch.float32 else 2 * TOL[dtype]
    for a, r in zip(results["triton"], results["reference"], strict=True):
        assert a.dtype == dtype and _rel(a, r.double()) < tol


def test_graph_building_backwards_stay_differentiable(monkeypatch):
    """``create_graph=True`` and ``torch.func.grad`` run the backward with grad mode on:
    they take the differentiable reference, not the kernel, and agree with it."""
    kernel_calls = _count_kernel_calls(monkeypatch)
    primals, _, keep = _data(2, 1, 7, 9, 16, torch.float32, seed=9)

    def loss(q, k, v, backend):
        return attention(q, k, v, attn_mask=keep, backend=backend).square().sum()

    ref = torch.func.grad(loss, argnums=(0, 1, 2))(*primals, "reference")
    got = torch.func.grad(loss, argnums=(0, 1, 2))(*primals, "triton")
    inputs = tuple(p.clone().requires_grad_() for p in primals)
    first = torch.autograd.grad(loss(*inputs, "triton"), inputs, create_graph=True)
    assert all(g.requires_grad for g in first)
    for a, b, r in zip(got, first, ref, strict=True):
        assert _rel(a, r.double()) < 1e-4 and _rel(b, r.double()) < 1e-4
    assert len(kernel_calls) == 0
    torch.autograd.grad(loss(*inputs, "triton"), inputs)  # plain backward: the kernel
    assert len(kernel_calls) == 1
