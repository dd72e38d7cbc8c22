"""The three JVP backends compute the same total derivative du/dt along (v, 0, 1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.jvp import fd_step_size, total_derivative
from tests._nets import MixerStudent, MLPStudent

F64 = torch.float64


def _times(gen, batch, dtype=F64):
    t = torch.rand(batch, generator=gen, dtype=dtype)
    r = t * torch.rand(batch, generator=gen, dtype=dtype)
    return r, t


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), dim=st.integers(1, 6))
def test_backends_agree_on_mlp(seed, batch, dim):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MLPStudent(dim).to(F64)
    z = torch.randn(batch, dim, generator=gen, dtype=F64)
    v = torch.randn(batch, dim, generator=gen, dtype=F64)
    r, t = _times(gen, batch)
    _, d_func = total_derivative(net, z, r, t, v, method="func")
    _, d_auto = total_derivative(net, z, r, t, v, method="autograd")
    _, d_fd = total_derivative(net, z, r, t, v, method="fd")
    assert _rel(d_auto, d_func) < 1e-8
    assert _rel(d_fd, d_func) < 1e-4


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), seq=st.integers(1, 6), ch=st.integers(1, 5))
def test_backends_agree_on_mixer(seed, seq, ch):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MixerStudent(seq, ch).to(F64)
    z = torch.randn(3, seq, ch, generator=gen, dtype=F64)
    v = torch.randn(3, seq, ch, generator=gen, dtype=F64)
    r, t = _times(gen, 3)
    _, d_func = total_derivative(net, z, r, t, v, method="func")
    _, d_auto = total_derivative(net, z, r, t, v, method="autograd")
    _, d_fd = total_derivative(net, z, r, t, v, method="fd")
    assert _rel(d_auto, d_func) < 1e-8
    assert _rel(d_fd, d_func) < 1e-4


def test_against_closed_form():
    # u(z, r, t) = z * t^2 + r  =>  du/dt along (v, 0, 1) = v t^2 + 2 t z.
    def u_fn(z, r, t):
        return z * t[:, None] ** 2 + r[:, None]

    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)
    r, t = _times(gen, 4)
    expected = v * t[:, None] ** 2 + 2 * t[:, None] * z
    for method in ("func", "autograd", "fd"):
        u, dudt = total_derivative(u_fn, z, r, t, v, method=method)
        torch.testing.assert_close(u, u_fn(z, r, t))
        tol = 1e-6 if method == "fd" else 1e-12
        torch.testing.assert_close(dudt, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["func", "autograd", "fd"])
def test_keep_graph_and_detached_derivative(method):
    torch.manual_seed(0)
    net = MLPStudent(3).to(F64)
    gen = torch.Generator().manual_seed(1)
    z, v = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)
    r, t = _times(gen, 4)
    u, dudt = total_derivative(net, z, r, t, v, method=method, keep_graph=True)
    assert u.requires_grad and not dudt.requires_grad
    u.pow(2).sum().backward()
    ref_net = MLPStudent(3).to(F64)
    ref_net.load_state_dict(net.state_dict())
    ref_net(z, r, t).pow(2).sum().backward()
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    u2, _ = total_derivative(net, z, r, t, v, method=method, keep_graph=False)
    assert not u2.requires_grad


@pytest.mark.parametrize("method", ["func", "autograd", "fd"])
def test_cond_passes_through(method):
    torch.manual_seed(0)
    net = MLPStudent(2).to(F64)
    gen = torch.Generator().manual_seed(2)
    z, v = torch.randn(3, 2, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen, dtype=F64)
    r, t = _times(gen, 3)
    u1, d1 = total_derivative(net, z, r, t, v, method=method)
    u3, d3 = total_derivative(net, z, r, t, v, method=method, cond={"scale": 3.0})
    torch.testing.assert_close(u3, 3 * u1)
    torch.testing.assert_close(d3, 3 * d1, rtol=1e-6, atol=1e-9)


def test_fd_in_fp32_for_half_inputs_and_boundaries():
    def u_fn(z, r, t):
        return z.float() * t[:, None].float()

    z = torch.ones(3, 2, dtype=torch.bfloat16)
    v = torch.zeros_like(z)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.bfloat16)
    _, dudt = total_derivative(u_fn, z, torch.zeros_like(t), t, v, method="fd")
    assert dudt.dtype == torch.float32  # the dtype of u
    torch.testing.assert_close(dudt, torch.ones(3, 2), rtol=1e-3, atol=1e-3)
    assert fd_step_size(torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3))


def test_fd_stencil_stays_in_valid_intervals():
    seen = []

    def u_fn(z, r, t):
        seen.append(bool((r <= t).all()) and bool((t <= 1).all()))
        return z * t[:, None] ** 2

    z, v = torch.ones(3, 2, dtype=F64), torch.zeros(3, 2, dtype=F64)
    t = torch.tensor([0.3, 1.0, 1.0], dtype=F64)
    r = torch.tensor([0.3, 0.5, 1.0], dtype=F64)  # r = t, t at the top end, r = t = 1
    _, dudt = total_derivative(u_fn, z, r, t, v, method="fd")
    assert all(seen)
    torch.testing.assert_close(dudt[:2], 2 * t[:2, None].expand(2, 2), rtol=1e-4, atol=1e-4)
    assert (dudt[2] == 0).all()


def _good():
    z = torch.zeros(2, 3)
    return z, torch.zeros(2), torch.full((2,), 0.5), torch.zeros(2, 3)


def _u(z, r, t):
    return z * t[:, None]


@pytest.mark.parametrize(
    "change, exc, word",
    [
        (dict(z=[[0.0]]), TypeError, "z"),
        (dict(z=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "z"),
        (dict(r=torch.zeros(3)), ValueError, "r"),
        (dict(t=torch.full((2,), 1.5)), ValueError, "t"),
        (dict(r=torch.full((2,), 0.9)), ValueError, "r <= t"),
        (dict(v=torch.zeros(2, 4)), ValueError, "v"),
        (dict(v=torch.zeros(2, 3, device="meta")), ValueError, "v"),
        (dict(t=torch.full((2,), float("nan"))), ValueError, "t"),
        (dict(method="forward"), ValueError, "method"),
        (dict(fd_step=-1.0), ValueError, "fd_step"),
        (dict(cond=[1]), TypeError, "cond"),
    ],
)
def test_bad_input(change, exc, word):
    z, r, t, v = _good()
    kw = dict(z=z, r=r, t=t, v=v)
    opts = {k: change.pop(k) for k in list(change) if k in ("method", "fd_step", "cond")}
    kw.update(change)
    with pytest.raises(exc, match=word):
        total_derivative(_u, kw["z"], kw["r"], kw["t"], kw["v"], **opts)


def test_wrong_output_shape():
    z, r, t, v = _good()
    with pytest.raises(ValueError, match="u_fn returned shape"):
        total_derivative(lambda z, r, t: z[:, :1], z, r, t, v, method="fd")


class _AttnStudent(torch.nn.Module):
    """One attention block on tokens ``(B, S, C)``; ``sdpa`` picks torch's SDPA or ours."""

    def __init__(self, ch: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = torch.nn.Linear(ch, 3 * ch)
        self.time = torch.nn.Linear(2, ch)

    def forward(self, z, r, t):
        from mfcore.attention import attention

        b, s, c = z.shape
        h = z + self.time(torch.stack([t, t - r], 1))[:, None]
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        fn = torch.nn.functional.scaled_dot_product_attention if self.sdpa else attention
        return fn(q, k, v).transpose(1, 2).reshape(b, s, c) * torch.cos(t)[:, None, None]


@pytest.mark.parametrize("sdpa", [False, True], ids=["mfcore-attention", "routed-sdpa"])
def test_backends_agree_on_attention_model(sdpa):
    torch.manual_seed(0)
    net = _AttnStudent(8, 2, sdpa).to(F64)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 8, generator=gen, dtype=F64)
    v = torch.randn(2, 5, 8, generator=gen, dtype=F64)
    r, t = _times(gen, 2)
    _, d_func = total_derivative(net, z, r, t, v, method="func", route_sdpa=sdpa)
    _, d_auto = total_derivative(net, z, r, t, v, method="autograd", route_sdpa=sdpa)
    _, d_fd = total_derivative(net, z, r, t, v, method="fd")
    assert _rel(d_auto, d_func) < 1e-8
    assert _rel(d_fd, d_func) < 1e-4
    assert torch.nn.functional.scaled_dot_product_attention.__module__.startswith("torch")


def test_fd_runs_a_half_precision_model_in_its_dtype():
    torch.manual_seed(0)
    net = MLPStudent(3).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(4, 3, generator=gen).to(torch.bfloat16)
    v = torch.randn(4, 3, generator=gen).to(torch.bfloat16)
    t = torch.rand(4, generator=gen) * 0.5 + 0.25
    r = t * 0.5

    # the model gets bf16 states (fp32 times, cast inside MLPStudent's cat would fail on
    # mixed dtypes, so give it bf16 times too through a wrapper)
    def u_fn(z, r, t):
        return net(z, r.to(z.dtype), t.to(z.dtype))

    _, d_fd = total_derivative(u_fn, z, r.to(torch.bfloat16), t.to(torch.bfloat16), v, method="fd")
    _, d_func = total_derivative(u_fn, z, r.to(torch.bfloat16), t.to(torch.bfloat16), v)
    assert d_fd.dtype == torch.bfloat16 and torch.isfinite(d_fd).all()
    assert _rel(d_fd.float(), d_func.float()) < 0.15


@pytest.mark.parametrize("method", ["func", "autograd", "fd"])
def test_u_stays_differentiable_in_z(method):
    torch.manual_seed(0)
    net = MLPStudent(2).to(F64)
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 2, generator=gen, dtype=F64, requires_grad=True)
    v = torch.randn(3, 2, generator=gen, dtype=F64)
    r, t = _times(gen, 3)
    u, _ = total_derivative(net, z, r, t, v, method=method, keep_graph=True)
    (g,) = torch.autograd.grad(u.sum(), z)
    (ref,) = torch.autograd.grad(net(z, r, t).sum(), z)
    torch.testing.assert_close(g, ref)


# --------------------------------------------------------------------------- detach_tangents


def _keep_graph_step(net, z, r, t, v, **kw):
    net.zero_grad(set_to_none=True)
    u, dudt = total_derivative(net, z, r, t, v, method="func", keep_graph=True, **kw)
    (u.square() * torch.arange(1, u.numel() + 1, dtype=u.dtype).view_as(u)).sum().backward()
    return u.detach(), dudt, [p.grad.clone() for p in net.parameters()]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), seq=st.integers(1, 6), ch=st.integers(1, 5))
def test_detached_tangents_change_no_value(seed, seq, ch):
    """Cutting the tangents' history at every module leaves u, du/dt and gradients exact."""
    torch.manual_seed(seed)
    net = MixerStudent(seq, ch).to(F64)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, seq, ch, generator=gen, dtype=F64)
    v = torch.randn(3, seq, ch, generator=gen, dtype=F64)
    r, t = _times(gen, 3)
    cut = _keep_graph_step(net, z, r, t, v)
    kept = _keep_graph_step(net, z, r, t, v, detach_tangents=False)  # torch.func.jvp
    for a, b in zip([cut[0], cut[1], *cut[2]], [kept[0], kept[1], *kept[2]], strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("detach", [True, False])
def test_detached_tangents_reach_the_next_module_without_history(detach):
    """What the next module receives: a tangent cut from its history (with the cut), or one
    that still carries it (without). The memory this saves is measured in benchmarks/."""
    torch.manual_seed(0)
    net = MixerStudent(4, 3).to(F64)
    seen = []

    def spy(module, args):
        tangent = torch.autograd.forward_ad.unpack_dual(args[0]).tangent
        seen.append(tangent is not None and tangent.grad_fn is not None)

    net.token[1].register_forward_pre_hook(spy)  # its input is token[0]'s output
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 3, generator=gen, dtype=F64)
    v = torch.randn(2, 4, 3, generator=gen, dtype=F64)
    r, t = _times(gen, 2)
    if detach:
        u, _ = total_derivative(net, z, r, t, v, keep_graph=True)
    else:  # the same forward-AD path with the cut switched off
        with torch.autograd.forward_ad.dual_level():
            dual_z = torch.autograd.forward_ad.make_dual(z, v)
            dual_t = torch.autograd.forward_ad.make_dual(t, torch.ones_like(t))
            u = torch.autograd.forward_ad.unpack_dual(net(dual_z, r, dual_t)).primal
    assert seen == [not detach] and u.requires_grad


def test_detached_tangents_fall_back_inside_transforms():
    """Inside a functorch transform (here jacrev) the plain torch.func path runs, and u
    keeps its derivatives through it."""
    torch.manual_seed(0)
    net = MLPStudent(3).to(F64)
    gen = torch.Generator().manual_seed(5)
    z, v = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)
    r, t = _times(gen, 4)
    jac = torch.func.jacrev(lambda z_: total_derivative(net, z_, r, t, v, keep_graph=True)[0])
    assert torch.allclose(jac(z), torch.func.jacrev(lambda z_: net(z_, r, t))(z), rtol=1e-12)


def test_detached_tangents_fall_back_for_compiled_models(caplog):
    """forward_ad cannot enter a compiled region; torch.func.jvp can: same values, logged."""
    torch.manual_seed(0)
    net = _AttnStudent(8, 2, sdpa=False).to(F64)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 8, generator=gen, dtype=F64)
    v = torch.randn(2, 5, 8, generator=gen, dtype=F64)
    r, t = _times(gen, 2)
    u_eager, d_eager = total_derivative(net, z, r, t, v, keep_graph=True)
    compiled = torch.compile(net, backend="aot_eager")
    with caplog.at_level("WARNING", logger="mfcore.jvp"):
        u, dudt = total_derivative(compiled, z, r, t, v, keep_graph=True)
    assert "torch.func.jvp" in caplog.text and u.requires_grad
    assert torch.allclose(u, u_eager, rtol=1e-12) and torch.allclose(dudt, d_eager, rtol=1e-10)
