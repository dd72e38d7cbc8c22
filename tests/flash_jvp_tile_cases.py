"""Interpreted cases for tests/test_flash_jvp_tiles.py (not collected on its own).

The forward kernel drops the key/value bounds masks when every key block is full
(``EVEN_N``: ``S_k`` a multiple of ``BLOCK_N``) and the head dim needs no padding
(``EVEN_D``), and drops the score mask when, in addition, there is no key-padding mask.
These cases choose lengths that are multiples of the interpreter's tile, so those paths run,
and compare all three modes with the float64 reference. Triton must see
``TRITON_INTERPRET=1`` before it is first imported, hence the separate process.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_flash_jvp_tiles.py", allow_module_level=True)

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mfcore.attention_reference import ScoreSpec, reference_tangent  # noqa: E402

pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from mfcore.kernels import flash_jvp  # noqa: E402
from mfcore.kernels.common import interpreter_block  # noqa: E402
from tests._attention_data import TOL, _data, _exact, _rel  # noqa: E402

SHAPES = [  # (B, H, S_q, S_k, D) with S_k a multiple of the interpreter's tile
    (1, 2, 16, 16, 16),  # tile 16, EVEN_N and EVEN_D
    (2, 2, 21, 32, 32),  # tile 32
    (2, 1, 9, 64, 32),  # two key blocks
    (2, 1, 33, 64, 24),  # EVEN_N with a padded head dim (masks stay on the D axis)
]


@pytest.fixture(scope="module")
def fj():
    assert isinstance(flash_jvp._attn_jvp_kernel, InterpretedFunction)
    return flash_jvp


def _full_blocks(s_q: int, s_k: int) -> bool:
    return s_k % interpreter_block(s_q, s_k) == 0


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_full_key_blocks_fused_and_primal(fj, shape, dtype, masked):
    b, h, s_q, s_k, d = shape
    assert _full_blocks(s_q, s_k)  # the case runs the unmasked (EVEN_N) path
    primals, tangents, keep = _data(b, h, s_q, s_k, d, dtype, seed=11, masked=masked)
    scale = d**-0.5
    out, lse, tan = fj.attention_forward(*primals, tangents, key_mask=keep, scale=scale)
    ref_out, ref_lse, ref_tan = _exact(primals, tangents, keep, scale)
    assert _rel(out, ref_out) < TOL[dtype] and _rel(tan, ref_tan) < 2 * TOL[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert _rel(lse[finite], ref_lse[finite]) < 1e-5
    primal_only, lse2, none = fj.attention_forward(*primals, None, key_mask=keep, scale=scale)
    assert none is None and torch.equal(lse2, lse)
    assert _rel(primal_only, ref_out) < TOL[dtype]


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 1), (0, 1, 2)], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_full_key_blocks_tangent_from_lse(fj, which, masked):
    """Partial tangents: (2,) alone leaves no score tangent dS, (0, 1) no dV."""
    primals, tangents, keep = _data(2, 2, 19, 32, 16, torch.float32, seed=12, masked=masked)
    assert _full_blocks(19, 32)
    tangents = tuple(t if i in which else None for i, t in enumerate(tangents))
    out, lse, _ = fj.attention_forward(*primals, None, key_mask=keep, scale=0.3)
    tan = fj.attention_tangent(*primals, out, lse, tangents, key_mask=keep, scale=0.3)
    ref_out, ref_lse, _ = _exact(primals, (None,) * 3, keep, 0.3)
    t64 = [None if t is None else t.double() for t in tangents]
    kind = "none" if keep is None else "keys"
    saved = (*(x.double() for x in primals), ref_out, ref_lse)
    ref_tan = reference_tangent(saved, t64, ScoreSpec(kind, keep, 0.3))
    assert _rel(tan, ref_tan) < 4e-5


@settings(max_examples=8, deadline=None)
@given(
    s_q=st.integers(17, 40), blocks=st.integers(1, 3), d=st.sampled_from([16, 24, 32]),
    masked=st.booleans(), scale=st.floats(0.05, 2.0), seed=st.integers(0, 1000),
)  # fmt: skip
def test_full_key_blocks_property(fj, s_q, blocks, d, masked, scale, seed):
    """Any S_q with S_k = 32 * blocks: fused output and tangent equal the float64 ones."""
    s_k = 32 * blocks
    assert _full_blocks(s_q, s_k)
    primals, tangents, keep = _data(2, 1, s_q, s_k, d, torch.float32, seed=seed, masked=masked)
    out, _, tan = fj.attention_forward(*primals, tangents, key_mask=keep, scale=scale)
    ref_out, _, ref_tan = _exact(primals, tangents, keep, scale)
    assert _rel(out, ref_out) < 1e-4 and _rel(tan, ref_tan) < 1e-4


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_two_pass_route_equals_reference(fj, monkeypatch, masked):
    """The route compiled fp32 takes (primal kernel, then tangent kernel from its lse)."""
    modes = []
    launch = fj._launch

    def recording_launch(qkv, tangents, outputs, *, primal, **options):
        modes.append(fj._mode(primal, outputs[1] is not None))
        return launch(qkv, tangents, outputs, primal=primal, **options)

    monkeypatch.setattr(fj, "_fuses", lambda dtype: False)
    monkeypatch.setattr(fj, "_launch", recording_launch)
    primals, tangents, keep = _data(2, 2, 13, 21, 16, torch.float32, seed=13, masked=masked)
    out, lse, tan = fj.attention_forward(*primals, tangents, key_mask=keep, scale=0.3)
    assert modes == ["primal", "tangent"]
    ref_out, ref_lse, ref_tan = _exact(primals, tangents, keep, 0.3)
    assert _rel(out, ref_out) < 2e-5 and _rel(tan, ref_tan) < 4e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    modes.clear()
    fj.attention_forward(*primals, None, key_mask=keep, scale=0.3)
    assert modes == ["primal"]  # nothing to split without tangents
