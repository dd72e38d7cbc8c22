"""Classifier-free guidance and MeanFlow's guided training velocity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.guidance import ClassifierFreeGuidance, MeanFlowGuidance, cfg_velocity


def _model(z, t, y):
    return z * y[:, None] + t[:, None]


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(0, 10), seed=st.integers(0, 1000))
def test_cfg_is_affine_in_scale(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    z, t = torch.randn(3, 2, generator=gen), torch.rand(3, generator=gen)
    y = torch.randn(3, generator=gen)
    guided = ClassifierFreeGuidance(_model, scale, {"y": torch.zeros(3)})
    v_c, v_u = _model(z, t, y), _model(z, t, torch.zeros(3))
    torch.testing.assert_close(guided(z, t, y=y), v_u + scale * (v_c - v_u))
    torch.testing.assert_close(cfg_velocity(v_c, v_u, 1.0), v_c)


def test_uncond_callable_and_scale_one():
    calls = []

    def model(z, t, y):
        calls.append(y)
        return z * y[:, None]

    z, t, y = torch.ones(2, 2), torch.rand(2), torch.ones(2)
    ClassifierFreeGuidance(model, 1.0, lambda c: {"y": 0 * c["y"]})(z, t, y=y)
    assert len(calls) == 1  # scale 1 needs no unconditional pass
    out = ClassifierFreeGuidance(model, 3.0, lambda c: {"y": 0 * c["y"]})(z, t, y=y)
    torch.testing.assert_close(out, 3 * z)


def test_meanflow_guidance_mixture():
    def student(z, r, t, y):
        return z * y[:, None] + 10 * (t - r)[:, None]

    z, t, y = torch.randn(4, 2), torch.rand(4), torch.full((4,), 2.0)
    v = torch.randn(4, 2)
    g = MeanFlowGuidance(2.0, 0.5, uncond={"y": torch.zeros(4)})
    out = g(v, student, z, t, {"y": y})
    expected = 2.0 * v + 0.5 * (2 * z) + (1 - 2.0 - 0.5) * torch.zeros_like(z)
    torch.testing.assert_close(out, expected)
    plain = MeanFlowGuidance(1.0, 0.0, uncond={"y": torch.zeros(4)})
    torch.testing.assert_close(plain(v, student, z, t, {"y": y}), v)


def test_bad_input():
    with pytest.raises(TypeError, match="uncond"):
        ClassifierFreeGuidance(_model, 2.0, uncond=3)
    with pytest.raises(ValueError, match="kappa"):
        MeanFlowGuidance(1.0, 1.0, uncond={})
    with pytest.raises(ValueError, match="omega"):
        MeanFlowGuidance(0.0, uncond={})
    with pytest.raises(ValueError, match="v_uncond"):
        cfg_velocity(torch.zeros(2, 2), torch.zeros(2, 3), 2.0)
    with pytest.raises(TypeError, match="mapping"):
        ClassifierFreeGuidance(_model, 2.0, uncond=lambda c: 3)(
            torch.zeros(1, 1), torch.zeros(1), y=torch.zeros(1)
        )
