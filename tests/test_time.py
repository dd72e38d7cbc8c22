"""Tests for mfcore.time: distributions (KS), shift identities, pair sampler, grids, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mfcore.time import (
    ClampedPairSampler,
    GridPairSampler,
    LogitNormalTime,
    ResolutionShiftedTime,
    ShiftedTime,
    TimePairSampler,
    TimeSampler,
    UniformTime,
    exponential_shift,
    resolution_shift_mu,
    shift_time,
    shifted_grid,
    uniform_grid,
    valid_by_construction,
)

N_KS = 20_000
P_MIN = 1e-3  # fixed seeds: deterministic; a correct sampler sits far above this


def _draw(sampler, n=N_KS, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return sampler(n, generator=gen, dtype=torch.float64, **kw).numpy()


def _logit(x):
    return np.log(x) - np.log1p(-x)


def _logit_normal_cdf(x, mean, std):
    return stats.norm.cdf((_logit(np.clip(x, 1e-300, 1 - 1e-16)) - mean) / std)


def _inverse_shift(x, s):
    """Inverse of t -> s t / (1 + (s - 1) t), derived by hand: t = x / (s - (s - 1) x)."""
    return x / (s - (s - 1.0) * x)


CPU_GEN = torch.Generator()
unit = st.floats(0.0, 1.0, allow_nan=False)
shifts = st.floats(0.05, 20.0)
mus = st.floats(-4.0, 4.0)


# --------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (0.2, 0.7)])
def test_uniform_matches_its_cdf(low, high):
    x = _draw(UniformTime(low, high))
    assert stats.kstest(x, stats.uniform(low, high - low).cdf).pvalue > P_MIN
    assert x.min() >= low and x.max() <= high


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.4, 1.0), (1.0, 0.5)])
def test_logit_normal_matches_its_cdf(mean, std):
    x = _draw(LogitNormalTime(mean, std))
    assert stats.kstest(x, lambda q: _logit_normal_cdf(q, mean, std)).pvalue > P_MIN


def test_ks_has_power_against_a_wrong_distribution():
    x = _draw(LogitNormalTime(-0.4, 1.0))
    assert stats.kstest(x, lambda q: _logit_normal_cdf(q, 0.0, 1.0)).pvalue < P_MIN
    assert stats.kstest(x, stats.uniform().cdf).pvalue < P_MIN


@pytest.mark.parametrize("s", [0.3, 3.0])
def test_shifted_uniform_matches_the_transformed_cdf(s):
    x = _draw(ShiftedTime(UniformTime(), s))
    assert stats.kstest(x, lambda q: _inverse_shift(q, s)).pvalue > P_MIN


@pytest.mark.parametrize("mu", [-0.7, 1.15])
def test_resolution_shifted_logit_normal_matches_the_transformed_cdf(mu):
    # The exponential shift adds mu in logit space, so sigmoid(N(m, s)) -> sigmoid(N(m + mu, s)).
    x = _draw(ResolutionShiftedTime(LogitNormalTime(0.2, 0.8), mu))
    assert stats.kstest(x, lambda q: _logit_normal_cdf(q, 0.2 + mu, 0.8)).pvalue > P_MIN


@pytest.mark.parametrize(
    "sampler",
    [
        UniformTime(),
        LogitNormalTime(),
        ShiftedTime(LogitNormalTime(), 3.0),
        ResolutionShiftedTime(UniformTime(), 0.5),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_samplers_honour_dtype_range_and_generator(sampler, dtype):
    assert isinstance(sampler, TimeSampler)
    a = sampler(257, dtype=dtype, generator=torch.Generator().manual_seed(3))
    b = sampler(257, dtype=dtype, generator=torch.Generator().manual_seed(3))
    c = sampler(257, dtype=dtype, generator=torch.Generator().manual_seed(4))
    assert a.shape == (257,) and a.dtype == dtype and a.device.type == "cpu"
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(((a >= 0) & (a <= 1)).all())


def test_samplers_follow_the_meta_device():
    t = LogitNormalTime()(5, device="meta")
    r, t2 = TimePairSampler()(5, device="meta")
    assert t.device.type == r.device.type == t2.device.type == "meta"


def test_reprs_name_the_parameters():
    assert repr(UniformTime(0.1, 0.9)) == "UniformTime(low=0.1, high=0.9)"
    assert repr(LogitNormalTime(-0.4, 1)) == "LogitNormalTime(mean=-0.4, std=1.0)"
    assert "shift=3.0" in repr(ShiftedTime(UniformTime(), 3))
    assert "mu=0.5" in repr(ResolutionShiftedTime(UniformTime(), 0.5))
    assert "equal_fraction=0.75" in repr(TimePairSampler())


# --------------------------------------------------------------------------- shifts


@given(t=unit, s=shifts)
def test_shift_time_matches_the_sd3_formula(t, s):
    got = shift_time(torch.tensor([t], dtype=torch.float64), s).item()
    assert got == pytest.approx(s * t / (1 + (s - 1) * t), rel=1e-12, abs=1e-15)


@given(t=st.floats(1e-6, 1 - 1e-6), s=shifts)
def test_shift_time_adds_log_shift_in_logit_space(t, s):
    got = shift_time(torch.tensor([t], dtype=torch.float64), s).item()
    assert _logit(got) == pytest.approx(_logit(t) + math.log(s), rel=1e-9, abs=1e-9)


@given(t=unit, a=shifts, b=shifts)
def test_shifts_compose_and_invert(t, a, b):
    x = torch.tensor([t], dtype=torch.float64)
    both = shift_time(shift_time(x, a), b)
    assert both.item() == pytest.approx(shift_time(x, a * b).item(), abs=1e-12)
    assert shift_time(shift_time(x, a), 1 / a).item() == pytest.approx(t, abs=1e-12)
    assert shift_time(x, 1.0).item() == t


@given(s=shifts, mu=mus)
def test_shifts_fix_the_endpoints_exactly(s, mu):
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert shift_time(ends.to(dtype), s).tolist() == [0.0, 1.0]
        assert exponential_shift(ends.to(dtype), mu).tolist() == [0.0, 1.0]


@given(t=st.floats(1e-6, 1.0), mu=mus)
def test_exponential_shift_matches_flux_formula(t, mu):
    flux = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    got = exponential_shift(torch.tensor([t], dtype=torch.float64), mu).item()
    assert got == pytest.approx(flux, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("mu", [-700.0, -30.0, 30.0, 700.0])
def test_exponential_shift_has_no_nan_for_extreme_mu(mu):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    out = exponential_shift(t, mu)
    assert bool(torch.isfinite(out).all()) and bool(((out >= 0) & (out <= 1)).all())


def test_shift_keeps_shape_dtype_and_computes_in_fp32():
    t = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = shift_time(t, 3.0)
    assert out.shape == (2, 3, 4) and out.dtype == torch.bfloat16
    ref = 3 * t.double() / (1 + 2 * t.double())
    assert torch.allclose(out.double(), ref, rtol=2**-8, atol=0)  # one bf16 rounding, no more


@given(
    n=st.integers(1, 10_000),
    lo=st.integers(1, 1000),
    span=st.integers(1, 5000),
    b=st.floats(-2, 2),
    m=st.floats(-2, 2),
)
def test_resolution_shift_mu_is_linear_through_its_anchors(n, lo, span, b, m):
    kw = {"base_seq_len": lo, "max_seq_len": lo + span, "base_shift": b, "max_shift": m}
    assert resolution_shift_mu(lo, **kw) == pytest.approx(b, abs=1e-12)
    assert resolution_shift_mu(lo + span, **kw) == pytest.approx(m, abs=1e-12)
    expected = b + (m - b) * (n - lo) / span
    assert resolution_shift_mu(n, **kw) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_resolution_shift_mu_flux_defaults():
    assert resolution_shift_mu(256) == pytest.approx(0.5)
    assert resolution_shift_mu(4096) == pytest.approx(1.15)
    assert resolution_shift_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


# --------------------------------------------------------------------------- pair sampler


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), f=unit, seed=st.integers(0, 2**31 - 1))
def test_pairs_are_ordered_and_equal_count_is_rounded_fraction(n, f, seed):
    sampler = TimePairSampler(UniformTime(), equal_fraction=f)
    r, t = sampler(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert r.shape == t.shape == (n,)
    assert bool((r <= t).all())
    count = int((r == t).sum())
    assert math.floor(f * n + 1e-9) <= count <= math.ceil(f * n - 1e-9)


def _equal(sampler, n, gen):
    r, t = sampler(n, generator=gen)
    return r == t


def test_equal_count_is_exact_when_the_fraction_divides_the_batch():
    sampler = TimePairSampler(equal_fraction=0.75)
    for seed in range(20):
        r, t = sampler(8, generator=torch.Generator().manual_seed(seed))
        assert int((r == t).sum()) == 6


def test_equal_fraction_is_unbiased_on_average():
    sampler = TimePairSampler(UniformTime(), equal_fraction=0.3)
    gen = torch.Generator().manual_seed(0)
    counts = [
        int((lambda rt: (rt[0] == rt[1]).sum())(sampler(5, generator=gen))) for _ in range(4000)
    ]
    assert set(counts) == {1, 2}  # 0.3 * 5 = 1.5: one or two, never anything else
    assert np.mean(counts) / 5 == pytest.approx(0.3, abs=0.01)


def test_equal_pairs_are_placed_at_random():
    sampler = TimePairSampler(UniformTime(), equal_fraction=0.5)
    gen = torch.Generator().manual_seed(0)
    hits = sum(
        (lambda rt: (rt[0] == rt[1]).double())(sampler(4, generator=gen)) for _ in range(4000)
    )
    assert torch.allclose(hits / 4000, torch.full((4,), 0.5, dtype=torch.float64), atol=0.04)


def test_unequal_pairs_are_min_and_max_of_two_draws():
    # With F the uniform CDF, max of two draws has CDF x^2 and min has 1 - (1 - x)^2.
    sampler = TimePairSampler(UniformTime(), equal_fraction=0.0)
    r, t = sampler(N_KS, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert stats.kstest(t.numpy(), lambda x: x**2).pvalue > P_MIN
    assert stats.kstest(r.numpy(), lambda x: 1 - (1 - x) ** 2).pvalue > P_MIN


def test_r_sampler_draws_the_second_time():
    # t = max(U, V) with U ~ uniform, V ~ shifted uniform: CDF x * F_V(x).
    sampler = TimePairSampler(UniformTime(), ShiftedTime(UniformTime(), 4.0), equal_fraction=0.0)
    r, t = sampler(N_KS, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert stats.kstest(t.numpy(), lambda x: x * _inverse_shift(x, 4.0)).pvalue > P_MIN
    assert bool((r <= t).all())


def test_pair_sampler_defaults_follow_meanflow():
    sampler = TimePairSampler()
    assert sampler.t_sampler == LogitNormalTime(-0.4, 1.0)
    assert sampler.r_sampler is None and sampler.equal_fraction == 0.75


def test_pair_sampler_is_reproducible():
    sampler = TimePairSampler(equal_fraction=0.4)
    a = sampler(33, generator=torch.Generator().manual_seed(7))
    b = sampler(33, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _py_meanflow_v1(n):
    """py-meanflow's default pair sampler as its definition states it, on torch's global RNG:
    t ~ LN(-0.6, 1.6), r' ~ LN(-4, 1.6) (those draws first, in that order), then r' = t with
    probability 1 - ratio = 0.25, then r = min(t, r')."""
    t = torch.sigmoid(torch.randn(n) * 1.6 - 0.6)
    r = torch.sigmoid(torch.randn(n) * 1.6 - 4.0)
    r = torch.where(torch.rand(n) < 0.25, t, r)
    return torch.minimum(t, r), t


def test_clamped_pairs_reproduce_py_meanflow_v1_bit_for_bit():
    torch.manual_seed(123)
    expected = _py_meanflow_v1(1000)
    torch.manual_seed(123)
    r, t = ClampedPairSampler()(1000)
    assert torch.equal(t, expected[1]) and torch.equal(r, expected[0])


def test_clamped_pairs_follow_their_law():
    # t keeps LN(-0.6, 1.6); P(r != t) = 0.75 P(r' < t) = 0.75 Phi(3.4 / (1.6 sqrt 2)) = 0.700;
    # given r != t, r is r' conditioned on r' < t.
    r, t = ClampedPairSampler()(
        N_KS, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    assert bool((r <= t).all()) and bool(((r >= 0) & (t <= 1)).all())
    assert stats.kstest(t.numpy(), lambda q: _logit_normal_cdf(q, -0.6, 1.6)).pvalue > P_MIN
    p_distinct = 0.75 * stats.norm.cdf(3.4 / (1.6 * math.sqrt(2)))
    frac = (r != t).double().mean().item()
    assert abs(frac - p_distinct) < 4 * math.sqrt(p_distinct * (1 - p_distinct) / N_KS)
    assert abs(p_distinct - 0.7001) < 1e-4


def test_clamped_pairs_keep_t_and_clamp_r():
    # With r' uniform on [0, 1] and equal_prob 0, r = min(t, r'): P(r = t) = P(r' >= t) = 1/2
    # for t uniform, and t's own law is untouched (not the max of two draws).
    sampler = ClampedPairSampler(UniformTime(), UniformTime(), equal_prob=0.0)
    r, t = sampler(N_KS, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert stats.kstest(t.numpy(), stats.uniform().cdf).pvalue > P_MIN
    assert abs((r == t).double().mean().item() - 0.5) < 0.015
    every = ClampedPairSampler(UniformTime(), UniformTime(), equal_prob=1.0)
    r, t = every(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r, t)


def test_clamped_pairs_are_reproducible_and_typed():
    sampler = ClampedPairSampler(equal_prob=0.4)
    a = sampler(33, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    b = sampler(33, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.float64
    assert sampler == ClampedPairSampler(
        LogitNormalTime(-0.6, 1.6), LogitNormalTime(-4.0, 1.6), equal_prob=0.4
    )
    assert "equal_prob=0.4" in repr(sampler)


# --------------------------------------------------------------------------- grids


@given(steps=st.integers(1, 500))
def test_uniform_grid_is_monotone_with_exact_endpoints(steps):
    for dtype in (torch.float32, torch.float64):
        g = uniform_grid(steps, dtype=dtype)
        assert g.shape == (steps + 1,) and g.dtype == dtype
        assert g[0].item() == 1.0 and g[-1].item() == 0.0
        assert bool((g[1:] < g[:-1]).all())
    g = uniform_grid(steps, dtype=torch.float64)
    assert torch.allclose(g[:-1] - g[1:], torch.full((steps,), 1 / steps, dtype=torch.float64))


@given(steps=st.integers(1, 200), s=shifts, mu=mus)
def test_shifted_grid_is_the_shifted_uniform_grid(steps, s, mu):
    g = shifted_grid(steps, shift=s, dtype=torch.float64)
    assert g[0].item() == 1.0 and g[-1].item() == 0.0 and bool((g[1:] < g[:-1]).all())
    assert torch.allclose(g, shift_time(uniform_grid(steps, dtype=torch.float64), s))
    gm = shifted_grid(steps, mu=mu, dtype=torch.float64)
    assert torch.allclose(gm, shifted_grid(steps, shift=math.exp(mu), dtype=torch.float64))


def test_shift_above_one_packs_steps_near_noise():
    g = shifted_grid(10, shift=3.0, dtype=torch.float64)
    widths = g[:-1] - g[1:]
    assert widths[0] < widths[-1]


def test_grids_follow_device_and_dtype():
    assert uniform_grid(3, device="meta").device.type == "meta"
    assert shifted_grid(3, shift=2.0, dtype=torch.bfloat16).dtype == torch.bfloat16


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": -3}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"batch_size": 2, "dtype": torch.int64}, TypeError, "dtype"),
        ({"batch_size": 2, "dtype": "float32"}, TypeError, "dtype"),
        ({"batch_size": 2, "device": 3}, TypeError, "device"),
        ({"batch_size": 2, "device": "nonsense"}, ValueError, "device"),
        ({"batch_size": 2, "generator": 1}, TypeError, "generator"),
        (
            {"batch_size": 2, "device": "meta", "generator": torch.Generator()},
            ValueError,
            "generator",
        ),
    ],
)
@pytest.mark.parametrize(
    "sampler",
    [
        UniformTime(),
        LogitNormalTime(),
        ShiftedTime(UniformTime(), 2.0),
        TimePairSampler(),
        ClampedPairSampler(),
    ],
)
def test_sampler_calls_reject_bad_arguments(sampler, kwargs, exc, match):
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=match):
        sampler(kwargs.pop("batch_size"), **kwargs)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: UniformTime(0.5, 0.5), ValueError, "low"),
        (lambda: UniformTime(-0.1, 1.0), ValueError, "low"),
        (lambda: UniformTime(0.0, 1.5), ValueError, "high"),
        (lambda: UniformTime("0", 1.0), TypeError, "low"),
        (lambda: LogitNormalTime(0.0, 0.0), ValueError, "std"),
        (lambda: LogitNormalTime(0.0, -1.0), ValueError, "std"),
        (lambda: LogitNormalTime(math.nan, 1.0), ValueError, "mean"),
        (lambda: LogitNormalTime(0.0, math.inf), ValueError, "std"),
        (lambda: ShiftedTime(UniformTime(), 0.0), ValueError, "shift"),
        (lambda: ShiftedTime(UniformTime(), -2.0), ValueError, "shift"),
        (lambda: ShiftedTime(UniformTime(), math.inf), ValueError, "shift"),
        (lambda: ShiftedTime(0.5, 2.0), TypeError, "base"),
        (lambda: ResolutionShiftedTime(UniformTime(), math.nan), ValueError, "mu"),
        (lambda: ResolutionShiftedTime(UniformTime(), 1e4), ValueError, "mu"),
        (lambda: ResolutionShiftedTime(None, 0.5), TypeError, "base"),
        (lambda: TimePairSampler(equal_fraction=-0.1), ValueError, "equal_fraction"),
        (lambda: TimePairSampler(equal_fraction=1.1), ValueError, "equal_fraction"),
        (lambda: TimePairSampler(equal_fraction=None), TypeError, "equal_fraction"),
        (lambda: TimePairSampler(t_sampler=3), TypeError, "t_sampler"),
        (lambda: TimePairSampler(r_sampler="uniform"), TypeError, "r_sampler"),
        (lambda: ClampedPairSampler(equal_prob=1.5), ValueError, "equal_prob"),
        (lambda: ClampedPairSampler(equal_prob=math.nan), ValueError, "equal_prob"),
        (lambda: ClampedPairSampler(equal_prob="0.25"), TypeError, "equal_prob"),
        (lambda: ClampedPairSampler(t_sampler=0.5), TypeError, "t_sampler"),
        (lambda: ClampedPairSampler(r_sampler=[]), TypeError, "r_sampler"),
    ],
)
def test_constructors_reject_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: shift_time(torch.tensor([0.5]), 0.0), ValueError, "shift"),
        (lambda: shift_time(torch.tensor([0.5]), True), TypeError, "shift"),
        (lambda: shift_time(torch.tensor([1.5]), 2.0), ValueError, "t"),
        (lambda: shift_time(torch.tensor([math.nan]), 2.0), ValueError, "t"),
        (lambda: shift_time(torch.tensor([0, 1]), 2.0), TypeError, "t"),
        (lambda: shift_time([0.5], 2.0), TypeError, "t"),
        (lambda: exponential_shift(torch.tensor([-0.1]), 0.5), ValueError, "t"),
        (lambda: exponential_shift(torch.tensor([0.5]), math.inf), ValueError, "mu"),
        (lambda: exponential_shift(torch.tensor([0.5]), -800.0), ValueError, "mu"),
        (lambda: resolution_shift_mu(0), ValueError, "seq_len"),
        (lambda: resolution_shift_mu(256.0), TypeError, "seq_len"),
        (lambda: resolution_shift_mu(256, base_seq_len=512, max_seq_len=512), ValueError, "max"),
        (lambda: resolution_shift_mu(256, max_shift=math.nan), ValueError, "max_shift"),
        (lambda: uniform_grid(0), ValueError, "steps"),
        (lambda: uniform_grid(2.5), TypeError, "steps"),
        (lambda: uniform_grid(2, dtype=torch.int32), TypeError, "dtype"),
        (lambda: shifted_grid(4), ValueError, "exactly one"),
        (lambda: shifted_grid(4, shift=2.0, mu=0.5), ValueError, "exactly one"),
        (lambda: shifted_grid(4, shift=-1.0), ValueError, "shift"),
        (lambda: shifted_grid(4, mu=math.nan), ValueError, "mu"),
    ],
)
def test_functions_reject_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_extreme_shifts_stay_finite_with_exact_limits():
    from mfcore.time import exponential_shift, shift_time

    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(exponential_shift(t, 100.0), torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(exponential_shift(t, -110.0), torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(shift_time(t, 1e-50), torch.tensor([0.0, 0.0, 1.0]))


def test_valid_by_construction_trusts_only_this_modules_samplers_all_the_way_down():
    def mine(batch, **kw):
        return torch.rand(batch)

    class Subclass(UniformTime):
        pass

    trusted = [
        UniformTime(),
        LogitNormalTime(),
        ShiftedTime(LogitNormalTime(), 3.0),
        ResolutionShiftedTime(UniformTime(0.2, 0.9), 0.5),
        TimePairSampler(),
        TimePairSampler(ShiftedTime(UniformTime(), 2.0), LogitNormalTime()),
        ClampedPairSampler(),
        GridPairSampler(TimePairSampler(), (uniform_grid(2),)),
    ]
    foreign = [
        mine,
        Subclass(),
        ShiftedTime(mine, 2.0),
        TimePairSampler(mine),
        TimePairSampler(UniformTime(), mine),
        ClampedPairSampler(UniformTime(), mine),
        GridPairSampler(TimePairSampler(mine), (uniform_grid(2),)),
    ]
    assert all(valid_by_construction(s) for s in trusted)
    assert not any(valid_by_construction(s) for s in foreign)


# ---------------------------------------------------------------- grid pairs


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 64),
    fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    steps=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    shift=st.sampled_from([None, 3.0]),
)
def test_grid_pairs_are_grid_intervals_or_the_base_pairs(seed, n, fraction, steps, shift):
    grids = [uniform_grid(k, dtype=torch.float64) if shift is None else
             shifted_grid(k, shift=shift, dtype=torch.float64) for k in steps]  # fmt: skip
    base = TimePairSampler(equal_fraction=0.5)
    r, t = GridPairSampler(base, grids, fraction)(
        n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    r0, t0 = base(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    intervals = {(float(g[i + 1]), float(g[i])) for g in grids for i in range(len(g) - 1)}
    on_grid = [(float(a), float(b)) in intervals for a, b in zip(r, t, strict=True)]
    from_base = (r == r0) & (t == t0)
    assert all(g or bool(b) for g, b in zip(on_grid, from_base, strict=True))
    assert bool((r <= t).all()) and bool((r >= 0).all()) and bool((t <= 1).all())
    if fraction == 0.0:
        assert bool(from_base.all())
    if fraction == 1.0:
        assert all(on_grid)


def test_grid_pairs_draw_every_interval_of_every_grid_uniformly():
    grids = (uniform_grid(1), uniform_grid(2), uniform_grid(4))
    r, t = GridPairSampler(TimePairSampler(), grids, 1.0)(
        30_000, generator=torch.Generator().manual_seed(0)
    )
    # a grid with probability 1/3, then one of its K intervals: 1/3, 1/6 and 1/12 each
    for lo, hi, p in [(0.0, 1.0, 1 / 3), (0.5, 1.0, 1 / 6), (0.0, 0.5, 1 / 6), (0.75, 1.0, 1 / 12)]:
        share = ((r == lo) & (t == hi)).double().mean().item()
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / 30_000), (lo, hi, share)


def test_grid_pairs_refuse_grids_that_are_not_sampling_grids():
    base = TimePairSampler()
    for bad in ([], [torch.tensor([1.0, 0.5])], [torch.tensor([0.0, 1.0])],
                [torch.tensor([1.0, 0.5, 0.5, 0.0])], [torch.ones(2, 2)],
                [torch.tensor([1.0, float("nan"), 0.0])]):  # fmt: skip
        with pytest.raises(ValueError, match="grids"):
            GridPairSampler(base, bad)
    with pytest.raises(ValueError, match="fraction"):
        GridPairSampler(base, [uniform_grid(1)], 1.5)
    with pytest.raises(TypeError, match="base"):
        GridPairSampler(3, [uniform_grid(1)])
