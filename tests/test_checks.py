"""The shared scalar validators."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfcore._checks import check_real


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
