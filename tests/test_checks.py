"""The shared validators: each accepts exactly what it should, names what it refuses, and
reads the host once on the happy path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mfcore._checks import (
    check_fraction,
    check_grid,
    check_instance,
    check_interval,
    check_real,
    check_state,
    check_time,
    lookup,
)
from tests._syncs import count_host_reads


@given(value=st.floats(allow_nan=True, allow_infinity=True), minimum=st.floats(-10, 10))
def test_check_real_accepts_exactly_the_finite_values_above_the_bound(value, minimum):
    for strict in (False, True):
        ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
        if ok:
            assert check_real("x", value, minimum=minimum, strict=strict) == value
        else:
            with pytest.raises(ValueError, match="x must be finite and"):
                check_real("x", value, minimum=minimum, strict=strict)


@pytest.mark.parametrize("bad", [True, "1", None, [1.0]])
def test_check_real_rejects_non_numbers(bad):
    with pytest.raises(TypeError, match="lr must be a real number"):
        check_real("lr", bad, minimum=0.0)


# --------------------------------------------------------------------------- times

_VALUES = st.lists(
    st.floats(allow_nan=True, allow_infinity=True, width=32) | st.floats(0.0, 1.0), min_size=1
)


@given(values=_VALUES)
def test_check_time_accepts_exactly_the_finite_times_in_the_unit_interval(values):
    t = torch.tensor(values)
    if all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
        assert check_time("t", t) is t
    else:
        with pytest.raises(ValueError, match="t must (be finite|lie in)"):
            check_time("t", t)


@given(pairs=st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1))
def test_check_interval_accepts_exactly_the_ordered_pairs(pairs):
    r = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    t = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    for strict in (False, True):
        ordered = all((a < b) if strict else (a <= b) for a, b in pairs)
        if ordered:
            assert check_interval(r, t, strict=strict) == (r, t)
        else:
            with pytest.raises(ValueError, match="r must satisfy r <=? t"):
                check_interval(r, t, strict=strict)


def test_check_interval_names_the_bad_end_and_reads_the_host_once():
    z, ok = torch.zeros(3, 2), torch.tensor([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="s must lie in"):
        check_interval(ok, torch.tensor([0.2, 1.5, 1.0]), z, names=("r", "s"))
    with pytest.raises(ValueError, match="r must be finite"):
        check_interval(torch.tensor([0.1, math.nan, 0.2]), ok, z)
    with pytest.raises(ValueError, match=r"r must have shape \(3,\)"):
        check_interval(ok[:2], ok, z)
    with count_host_reads() as reads:
        check_interval(0.5 * ok, ok, z)
    assert reads == ["aten._local_scalar_dense"] or reads == ["aten.is_nonzero"]


def test_check_grid_reads_the_host_once_and_names_what_is_wrong():
    with count_host_reads() as reads:
        check_grid(torch.tensor([1.0, 0.5, 0.0]), full_span=True)
    assert len(reads) == 1
    with pytest.raises(ValueError, match="exactly 1"):
        check_grid(torch.tensor([0.9, 0.5, 0.0]), full_span=True)
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_grid(torch.tensor([1.0, 0.5, 0.5, 0.0]), full_span=True)


# --------------------------------------------------------------------------- registries


def test_lookup_returns_the_registered_object_and_lists_the_valid_names():
    registry = {"euler": object(), "heun": object()}
    assert lookup("method", "heun", registry) is registry["heun"]
    with pytest.raises(ValueError, match="method must be one of 'euler', 'heun'; got 'rk5'"):
        lookup("method", "rk5", registry)


@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_check_fraction_accepts_exactly_the_unit_interval(value):
    for below_one in (False, True):
        ok = math.isfinite(value) and 0.0 <= value and (value < 1 if below_one else value <= 1)
        if ok:
            assert check_fraction("p", value, below_one=below_one) == value
        else:
            with pytest.raises(ValueError, match="p must"):
                check_fraction("p", value, below_one=below_one)


@given(keys=st.sets(st.sampled_from("abcde")), held=st.sets(st.sampled_from("abcde")))
def test_check_state_accepts_exactly_the_states_holding_every_key(keys, held):
    state = dict.fromkeys(held, 0)
    missing = sorted(k for k in "abcde" if k in keys and k not in held)
    if not missing:
        assert check_state("Owner", state, sorted(keys)) is state
    else:
        with pytest.raises(KeyError, match=f"Owner state is missing '{missing[0]}'") as err:
            check_state("Owner", state, sorted(keys))
        assert all(f"'{k}'" in str(err.value) for k in missing)  # every one, in one error


@pytest.mark.parametrize("bad", [None, [("a", 1)], "a"])
def test_check_state_refuses_what_is_not_a_mapping(bad):
    with pytest.raises(TypeError, match="the state of Owner must be a mapping"):
        check_state("Owner", bad, ("a",))


def test_check_instance_takes_none_only_when_optional():
    check_instance("gate", None, int, "an int", optional=True)
    check_instance("gate", 3, int, "an int", optional=True)
    with pytest.raises(TypeError, match="gate must be an int, got NoneType"):
        check_instance("gate", None, int, "an int")
    with pytest.raises(TypeError, match="gate must be an int, got str"):
        check_instance("gate", "3", int, "an int", optional=True)
