"""Tests of mfcore.attention on its reference path (CPU): float64 identities against math SDPA."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import mfcore.attention as attn_mod
import mfcore.attention_reference as attn_ref
from mfcore.attention import attention, triton_available, use_jvp_attention

F64 = torch.float64
MASK_KINDS = ("none", "keys", "keys4d", "bool", "float", "float_keys")


def _math_sdpa(q, k, v, mask=None, scale=None):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _make(b, h, s_q, s_k, d, d_v=None, *, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s_q, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, s_k, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, s_k, d if d_v is None else d_v, generator=g, dtype=dtype)
    tangents = tuple(torch.randn(x.shape, generator=g, dtype=dtype) for x in (q, k, v))
    return (q, k, v), tangents, g


def _masks(kind, b, h, s_q, s_k, g):
    """(mask for attention, the same mask as SDPA takes it); every row keeps key 0."""
    if kind == "none":
        return None, None
    keep = torch.rand(b, s_k, generator=g) > 0.4
    keep[:, 0] = True
    if kind == "keys":
        return keep, keep[:, None, None, :]
    if kind == "keys4d":
        return keep[:, None, None, :], keep[:, None, None, :]
    if kind == "float_keys":
        bias = torch.randn(b, s_k, generator=g, dtype=F64)
        return bias, bias[:, None, None, :]
    if kind == "bool":
        full = torch.rand(b, 1, s_q, s_k, generator=g) > 0.5
        full[..., 0] = True
        return full, full
    bias = torch.randn(1, h, s_q, s_k, generator=g, dtype=F64)
    bias[..., 1:] = bias[..., 1:].masked_fill(
        torch.rand(1, h, s_q, s_k - 1, generator=g) > 0.7, -math.inf
    )
    return bias, bias


def _rel(a, b):
    """Max error relative to max(1, largest reference entry): data are O(1), some grads are 0."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


@pytest.fixture(params=[True, False], ids=["fused", "from_lse"])
def fuse(request, monkeypatch):
    """Both tangent rules: fused with the forward, and recomputed from the logsumexp."""
    monkeypatch.setattr(attn_mod, "_FUSE_DUAL", request.param)
    return request.param


shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
    st.sampled_from([1, 3, 8]), st.sampled_from([None, 2]),
)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    scale=st.sampled_from([None, 0.3, 2.5]),
    kind=st.sampled_from(MASK_KINDS),
    chunk=st.sampled_from([None, 1, 2, 5]),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_jvp_matches_math_sdpa_float64(shape, scale, kind, chunk, fused, seed):
    b, h, s_q, s_k, d, d_v = shape
    primals, tangents, g = _make(b, h, s_q, s_k, d, d_v, seed=seed)
    mask, sdpa_mask = _masks(kind, b, h, s_q, s_k, g)
    old, attn_mod._FUSE_DUAL = attn_mod._FUSE_DUAL, fused
    try:
        out, tan = torch.func.jvp(
            lambda q, k, v: attention(q, k, v, attn_mask=mask, scale=scale, chunk_size=chunk),
            primals, tangents,
        )  # fmt: skip
    finally:
        attn_mod._FUSE_DUAL = old
    ref_out, ref_tan = torch.func.jvp(
        lambda q, k, v: _math_sdpa(q, k, v, sdpa_mask, scale), primals, tangents
    )
    assert _rel(out, ref_out) < 1e-10
    assert _rel(tan, ref_tan) < 1e-10


@settings(max_examples=25, deadline=None)
@given(shape=shapes, kind=st.sampled_from(MASK_KINDS), chunk=st.sampled_from([None, 1, 3]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_gradients_match_math_sdpa_float64(shape, kind, chunk, seed):
    b, h, s_q, s_k, d, d_v = shape
    primals, _, g = _make(b, h, s_q, s_k, d, d_v, seed=seed)
    mask, sdpa_mask = _masks(kind, b, h, s_q, s_k, g)
    grad_out = torch.randn(b, h, s_q, d_v or d, generator=g, dtype=F64)
    ours = [x.clone().requires_grad_() for x in primals]
    ref = [x.clone().requires_grad_() for x in primals]
    g_ours = torch.autograd.grad(attention(*ours, attn_mask=mask, chunk_size=chunk), ours, grad_out)
    g_ref = torch.autograd.grad(_math_sdpa(*ref, sdpa_mask), ref, grad_out)
    for a, r in zip(g_ours, g_ref, strict=True):
        assert _rel(a, r) < 1e-10


@pytest.mark.parametrize("kind", ["none", "keys", "float"])
def test_gradcheck_forward_and_reverse(kind):
    primals, _, g = _make(1, 2, 3, 4, 2)
    mask, _ = _masks(kind, 1, 2, 3, 4, g)
    inputs = tuple(x.clone().requires_grad_() for x in primals)

    def fn(q, k, v):
        return attention(q, k, v, attn_mask=mask, chunk_size=2)

    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)


def test_forward_ad_api_matches_func_jvp(fuse):
    primals, tangents, _ = _make(2, 2, 5, 6, 4)
    _, ref = torch.func.jvp(_math_sdpa, primals, tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
        out = fwAD.unpack_dual(attention(*duals, chunk_size=2)).tangent
    assert _rel(out, ref) < 1e-10


def test_partial_tangents(fuse):
    """Tangents on q alone (k, v constant) are the JVP in q alone."""
    (q, k, v), (tq, _, _), _ = _make(1, 2, 4, 7, 3)
    _, tan = torch.func.jvp(lambda q: attention(q, k, v), (q,), (tq,))
    _, ref = torch.func.jvp(lambda q: _math_sdpa(q, k, v), (q,), (tq,))
    assert _rel(tan, ref) < 1e-10


class _TinyAttention(torch.nn.Module):
    """x -> attention(x Wq, x Wk, x Wv) with learnable projections; ``sdpa`` picks the op."""

    def __init__(self, dim=6, heads=2, *, sdpa=attention):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=F64)
        self.out = torch.nn.Linear(dim, dim, dtype=F64)

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        o = self.sdpa(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, dim))


def test_jvp_then_backward_through_primal(fuse):
    """MeanFlow's use: u, du = jvp(model); loss(u, du.detach()).backward() matches math SDPA."""
    torch.manual_seed(0)
    ours = _TinyAttention()
    ref = _TinyAttention(sdpa=_math_sdpa)
    ref.load_state_dict(ours.state_dict())
    x, tx = torch.randn(2, 5, 6, dtype=F64), torch.randn(2, 5, 6, dtype=F64)
    for model in (ours, ref):
        u, du = torch.func.jvp(model, (x,), (tx,))
        ((u - du.detach()) ** 2).sum().backward()
    for p_ours, p_ref in zip(ours.parameters(), ref.parameters(), strict=True):
        assert _rel(p_ours.grad, p_ref.grad) < 1e-10
    u, du = torch.func.jvp(ours, (x,), (tx,))
    _, du_ref = torch.func.jvp(ref, (x,), (tx,))
    assert _rel(du, du_ref) < 1e-10


def test_jvp_does_not_keep_the_tangent_for_backward(fuse):
    """Only q, k, v, O, lse are saved: the graph holds no tensor of the tangent."""
    primals, tangents, _ = _make(1, 1, 4, 4, 2)
    q = primals[0].clone().requires_grad_()
    out, tan = torch.func.jvp(lambda q: attention(q, *primals[1:]), (q,), (tangents[0],))
    node = out.grad_fn
    while node is not None and "Attention" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert node is not None
    saved = [t.data_ptr() for t in node.saved_tensors]
    assert tan.data_ptr() not in saved
    assert len(saved) == 5


def test_all_masked_rows_give_zeros(fuse):
    primals, tangents, _ = _make(2, 2, 3, 4, 2)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1] = False
    full = torch.ones(2, 2, 3, 4, dtype=torch.bool)
    full[0, 1, 2] = False
    bias = torch.zeros(2, 2, 3, 4, dtype=F64)
    bias[0, 0, 1] = -math.inf
    for mask, dead in ((keep, (1,)), (full, (0, 1, 2)), (bias, (0, 0, 1))):
        inputs = tuple(p.clone().requires_grad_() for p in primals)

        def fn(q, k, v, mask=mask):
            return attention(q, k, v, attn_mask=mask)

        out, tan = torch.func.jvp(fn, inputs, tangents)
        grads = torch.autograd.grad(out.sum(), inputs)
        for t in (out, tan, *grads):
            assert torch.isfinite(t).all()
        assert (out[dead] == 0).all() and (tan[dead] == 0).all()
    assert (grads[0][0, 0, 1] == 0).all()


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("chunk", [1, 8])
def test_reference_memory_is_bounded_by_the_chunk(chunk, fuse):
    b, h, s, d = 1, 2, 64, 4
    primals, tangents, _ = _make(b, h, s, s, d)
    inputs = tuple(p.clone().requires_grad_() for p in primals)
    bound = max(b * h * s * d, b * h * chunk * s)

    def fn(q, k, v):
        return attention(q, k, v, chunk_size=chunk)

    with _MaxNumel() as rec:
        out, _ = torch.func.jvp(fn, inputs, tangents)
        torch.autograd.grad(out.sum(), inputs)
    assert rec.max_numel <= bound < b * h * s * s


def test_automatic_chunk_honours_the_block_budget(monkeypatch):
    monkeypatch.setattr(attn_ref, "_BLOCK_ELEMENTS", 2 * 40 * 16)
    primals, _, _ = _make(1, 2, 200, 40, 4)
    with _MaxNumel() as rec:
        attention(*primals)
    assert rec.max_numel <= max(2 * 40 * 16, 2 * 200 * 4) < 2 * 200 * 40


def test_float32_and_bfloat16_compute_in_float32():
    primals, tangents, _ = _make(1, 2, 6, 5, 8)
    _, ref = torch.func.jvp(_math_sdpa, primals, tangents)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        p = tuple(x.to(dtype) for x in primals)
        t = tuple(x.to(dtype) for x in tangents)
        out, tan = torch.func.jvp(attention, p, t)
        assert out.dtype == tan.dtype == dtype
        assert _rel(tan.double(), ref) < tol


def test_compiled_module_tangents_match_eager():
    torch.manual_seed(1)
    model = _TinyAttention()
    x, tx = torch.randn(2, 5, 6, dtype=F64), torch.randn(2, 5, 6, dtype=F64)
    eager = torch.func.jvp(model, (x,), (tx,))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    out = torch.func.jvp(compiled, (x,), (tx,))
    for a, e in zip(out, eager, strict=True):
        assert _rel(a, e) < 1e-12


# --- use_jvp_attention ---------------------------------------------------------------


def test_context_manager_routes_and_restores():
    original = F.scaled_dot_product_attention
    model = _TinyAttention(sdpa=lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    x, tx = torch.randn(1, 4, 6, dtype=F64), torch.randn(1, 4, 6, dtype=F64)
    ref_model = _TinyAttention(sdpa=_math_sdpa)
    ref_model.load_state_dict(model.state_dict())
    with use_jvp_attention(backend="reference"):
        assert F.scaled_dot_product_attention is not original
        _, tan = torch.func.jvp(model, (x,), (tx,))
    assert F.scaled_dot_product_attention is original
    _, ref = torch.func.jvp(ref_model, (x,), (tx,))
    assert _rel(tan, ref) < 1e-10
    with pytest.raises(RuntimeError, match="boom"), use_jvp_attention():
        raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original


def test_context_manager_nests():
    original = F.scaled_dot_product_attention
    with use_jvp_attention():
        inner_before = F.scaled_dot_product_attention
        with use_jvp_attention(backend="reference"):
            pass
        assert F.scaled_dot_product_attention is inner_before
    assert F.scaled_dot_product_attention is original


@pytest.mark.parametrize("case", ["causal", "gqa", "3d", "mask2d", "mask3d"])
def test_context_manager_matches_sdpa_semantics(case):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 3, generator=g, dtype=F64)
    k = torch.randn(2, 4 if case != "gqa" else 2, 7, 3, generator=g, dtype=F64)
    v = torch.randn(k.shape, generator=g, dtype=F64)
    kwargs = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "gqa":
        kwargs["enable_gqa"] = True
    elif case == "3d":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    elif case == "mask2d":
        kwargs["attn_mask"] = torch.randn(5, 7, generator=g, dtype=F64)
    else:
        kwargs["attn_mask"] = torch.rand(4, 5, 7, generator=g) > 0.3
        kwargs["attn_mask"][..., 0] = True
    tangents = tuple(torch.randn(x.shape, generator=g, dtype=F64) for x in (q, k, v))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(fn, (q, k, v), tangents)
    with use_jvp_attention():
        out = torch.func.jvp(fn, (q, k, v), tangents)
    for a, r in zip(out, ref, strict=True):
        assert a.shape == r.shape
        assert _rel(a, r) < 1e-10


def test_context_manager_rejects_dropout_and_mask_with_causal():
    q = torch.randn(1, 1, 3, 2)
    with use_jvp_attention():
        with pytest.raises(ValueError, match="dropout_p"):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
        with pytest.raises(ValueError, match="is_causal"):
            F.scaled_dot_product_attention(
                q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True
            )
    with pytest.raises(ValueError, match="backend"):
        with use_jvp_attention(backend="flash"):
            pass


def test_diffusers_native_dispatch_goes_through_the_context_manager():
    """diffusers' native backend looks SDPA up on torch.nn.functional at call time."""
    dispatch = pytest.importorskip("diffusers.models.attention_dispatch")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 6, 3, 4, generator=g, dtype=F64) for _ in range(3))  # (B, S, H, D)
    tangents = tuple(torch.randn(x.shape, generator=g, dtype=F64) for x in (q, k, v))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False

    def fn(q, k, v):
        return dispatch.dispatch_attention_fn(q, k, v, attn_mask=keep)

    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.func.jvp(fn, (q, k, v), tangents)
    calls = []
    original_attention = attn_mod.attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original_attention(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, use_jvp_attention():
        mp.setattr(attn_mod, "attention", spy)
        out = torch.func.jvp(fn, (q, k, v), tangents)
    assert calls
    for a, r in zip(out, ref, strict=True):
        assert _rel(a, r) < 1e-10


# --- errors ----------------------------------------------------------------------------


def _qkv():
    return torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda q, k, v: ([1.0], k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q must have a floating"),
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have shape \(B, H, S, D\)"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k has dtype"),
        (lambda q, k, v: (q, k[:, :1], v), ValueError, "k must have the batch and head"),
        (lambda q, k, v: (q, k[..., :3], v), ValueError, "head dim"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "v must have the length"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "q must not be empty"),
    ],
)
def test_bad_inputs_raise(mutate, error, match):
    with pytest.raises(error, match=match):
        attention(*mutate(*_qkv()))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "flash"}, ValueError, "backend must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        ({"chunk_size": 2.0}, TypeError, "chunk_size must be an int"),
        ({"scale": "1"}, TypeError, "scale must be a float"),
        ({"scale": math.nan}, ValueError, "scale must be finite"),
        ({"attn_mask": [1]}, TypeError, "attn_mask must be a torch.Tensor"),
        ({"attn_mask": torch.ones(1, 5, dtype=torch.int64)}, TypeError, "boolean or floating"),
        ({"attn_mask": torch.ones(1, 4, dtype=torch.bool)}, ValueError, "key-padding mask"),
        ({"attn_mask": torch.ones(2, 3, 5, dtype=torch.bool)}, ValueError, "4-D mask"),
        ({"attn_mask": torch.ones(1, 3, 3, 5, dtype=torch.bool)}, ValueError, "dimension H"),
        ({"attn_mask": torch.full((1, 1, 3, 5), math.nan)}, ValueError, "NaN or \\+inf"),
        ({"attn_mask": torch.zeros(1, 5, requires_grad=True)}, ValueError, "require grad"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*_qkv(), **kwargs)


def test_triton_backend_unavailable_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention(*_qkv(), backend="triton")
    assert not triton_available("cpu")[0]
    monkeypatch.setitem(sys.modules, "triton", None)
    ok, reason = triton_available("cuda")
    assert not ok and "not installed" in reason


def test_triton_backend_rejects_unsupported_masks(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="key-padding"):
        attention(*_qkv(), attn_mask=torch.ones(1, 1, 3, 5, dtype=torch.bool), backend="triton")
    with pytest.raises(RuntimeError, match="float64"):
        attention(*(x.double() for x in _qkv()), backend="triton")


def test_auto_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = _qkv()
    assert attn_mod._select_path("auto", q, v, "none") == "reference"


def test_double_backward_matches_math_sdpa():
    # The "autograd" JVP backend differentiates a backward: it must be exact, not silent.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    )
    assert torch.autograd.gradgradcheck(lambda q, k, v: attention(q, k, v), (q, k, v))
