"""Tile selection of the forward kernel (mfcore.kernels.flash_jvp): per-mode autotune lists,
the full-key-block flag, and the kernel on full key blocks (interpreted, in a fresh process
as tests/test_attention_triton.py explains)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests._attention_data import run_interpreted

CASES = Path(__file__).with_name("flash_jvp_tile_cases.py")


def test_interpreted_full_block_cases():
    pytest.importorskip("triton")
    run_interpreted(CASES)


@pytest.fixture(scope="module")
def fj():
    return pytest.importorskip("mfcore.kernels.flash_jvp")


def test_each_mode_has_its_own_short_tile_list(fj):
    assert set(fj._SHAPES) == {"primal", "fused", "tangent"} == set(fj._TUNED)
    for mode, shapes in fj._SHAPES.items():
        assert 4 <= len(shapes) <= 8, mode
        assert len(set(shapes)) == len(shapes), mode
        for block_m, block_n, warps, stages in shapes:
            assert block_m in (64, 128) and block_n in (32, 64, 128), mode
            assert warps in (4, 8) and 2 <= stages <= 4, mode
        assert len(fj._TUNED[mode].configs) == len(shapes)


def test_mode_names(fj):
    assert fj._mode(True, False) == "primal"
    assert fj._mode(True, True) == "fused"
    assert fj._mode(False, True) == "tangent"


@given(seq_k=st.integers(1, 10_000), block_n=st.sampled_from([16, 32, 64, 128]))
def test_even_n_means_full_key_blocks(fj, seq_k, block_n):
    even = fj._even_n({"seq_k": seq_k, "BLOCK_N": block_n})
    assert even == (-(-seq_k // block_n) * block_n == seq_k)


def test_compiled_fp32_does_not_fuse(fj, monkeypatch):
    monkeypatch.setattr(fj, "interpreting", lambda: False)
    assert not fj._fuses(torch.float32)
    assert fj._fuses(torch.bfloat16) and fj._fuses(torch.float16)
    monkeypatch.setattr(fj, "interpreting", lambda: True)
    assert fj._fuses(torch.float32)  # the interpreter keeps testing the fused fp32 math
