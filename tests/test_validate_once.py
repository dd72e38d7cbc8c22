"""Checks written once (issue 23): a family's declared condition shapes are checked by one
function that names every problem; a training step checks its batch once and its model
calls trust it (``validate=False``), computing exactly what checked calls compute."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.adapters._shapes import Shape, check_conditions, data_problems
from mfcore.adapters.data import make_synthetic_data
from mfcore.adapters.distill import build_run, distill, train_step
from mfcore.adapters.distill_config import DistillConfig
from mfcore.adapters.family import Synthetic
from mfcore.adapters.flux import FAMILY as FLUX
from mfcore.adapters.hunyuanimage2 import FAMILY as HY21
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.student import MeanFlowStudent
from tests._syncs import count_host_reads

F64 = torch.float64
SPEC = {"prompt_embeds": Shape(("B", "L", "width")), "pooled": Shape(("B", "pool"))}
CONFIG = {"width": 6, "pool": 3}


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    got=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(5, 7)),
    pooled=st.tuples(st.integers(1, 4), st.integers(2, 4)),
)
def test_declared_shapes_accept_exactly_the_matching_tensors(batch, got, pooled):
    z = torch.zeros(batch, 4, 2, 2)
    cond = {"prompt_embeds": torch.zeros(got), "pooled": torch.zeros(pooled)}
    good = {
        "prompt_embeds": got[0] == batch and got[2] == CONFIG["width"],
        "pooled": pooled == (batch, CONFIG["pool"]),
    }
    if all(good.values()):
        out = check_conditions(SPEC, cond, z, CONFIG, tag="", label="toy")
        assert out.keys() == cond.keys() and all(out[k] is cond[k] for k in cond)
        return
    with pytest.raises(ValueError) as err:
        check_conditions(SPEC, cond, z, CONFIG, tag="", label="toy")
    for key, ok in good.items():  # every wrong tensor named in the one error, no right one
        assert (f"{key} must have shape" in str(err.value)) is not ok


def test_one_error_names_every_problem_of_a_call_and_of_a_data_folder():
    z = torch.zeros(2, 4, 2, 2)
    cond = {"prompt_embeds": torch.zeros(2, 3, 5, dtype=torch.int64), "pooled": torch.zeros(1, 3)}
    with pytest.raises(ValueError) as err:
        check_conditions(SPEC, cond, z, CONFIG, tag="", label="toy")
    message = str(err.value)
    assert "prompt_embeds must hold floating-point values, got torch.int64" in message
    assert "prompt_embeds must have shape (2, L, 6), got (2, 3, 5)" in message
    assert "pooled must have shape (2, 3), got (1, 3)" in message
    with pytest.raises(TypeError, match="a call needs pooled for a toy model"):
        check_conditions(SPEC, {"prompt_embeds": cond["prompt_embeds"]}, z, CONFIG, tag="",
                         label="toy")  # fmt: skip
    problems = data_problems(SPEC, {"prompt_embeds": (3, 5), "pooled": (4,)}, CONFIG)
    assert problems == [
        "prompt_embeds must be (N, L, 6), got (N, 3, 5)",
        "pooled must be (N, 3), got (N, 4)",
    ]


def _flux(validate: bool) -> MeanFlowStudent:
    student = MeanFlowStudent(FLUX.tiny_model(0, F64, True), FLUX, lora=LoraSpec(rank=2))
    with torch.no_grad():
        for p in student.trainable_parameters():  # away from the teacher
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1),
                                      dtype=F64))  # fmt: skip
    student.validate = validate
    return student


def _batch(family, n=2):
    gen = torch.Generator().manual_seed(0)
    data = family.synthetic_sample(Synthetic(n, 4, 4, 4, gen, False, family.tiny_dims))
    return data.pop("latents").to(F64), {k: v.to(F64) for k, v in data.items()}


def test_unchecked_calls_equal_checked_ones_and_read_the_host_never():
    z, cond = _batch(FLUX)
    r, t = torch.tensor([0.2, 0.5], dtype=F64), torch.tensor([0.7, 0.5], dtype=F64)
    checked, trusting = _flux(True), _flux(False)
    with torch.no_grad():
        with count_host_reads() as reads:
            u, v = trusting(z, r, t, **cond), trusting.teacher()(z, t, **cond)
        assert reads == []  # a checked call reads the host to check its times
        assert torch.equal(u, checked(z, r, t, **cond))
        assert torch.equal(v, checked.teacher()(z, t, **cond))
        with count_host_reads() as reads:
            checked.teacher()(z, t, **cond)
        assert reads == ["aten._local_scalar_dense"]


def test_the_teacher_checks_a_batch_as_its_calls_would():
    teacher = _flux(False).teacher()
    z, cond = _batch(FLUX)
    teacher.check_inputs(z, cond)
    with pytest.raises(ValueError, match="prompt_embeds must have shape"):
        teacher.check_inputs(z, {**cond, "prompt_embeds": cond["prompt_embeds"][..., :3]})
    with pytest.raises(TypeError, match="unexpected keyword argument 'y'"):
        teacher.check_inputs(z, {**cond, "y": z})
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        _flux(False).teacher(true_cfg_scale=2.0).check_inputs(z, cond)


def test_a_training_step_checks_its_batch_once_and_its_calls_trust_it(tmp_path, monkeypatch):
    make_synthetic_data(tmp_path / "data", family="hunyuanimage2", num_files=1, per_file=2,
                        height=4, width=4, seq_len=3)  # fmt: skip
    cfg = DistillConfig(data=str(tmp_path / "data"), output=str(tmp_path / "out"), tiny=True,
                        family="hunyuanimage2", steps=2, lora_rank=2, device="cpu",
                        weights_dtype="fp32", progress=False, preview_every=0,
                        report_to="none", batch_size=2)  # fmt: skip
    run = build_run(cfg)
    assert run.student.validate is False and run.teacher.validate is False
    checks = []
    original = HY21.call_inputs

    def counting(*args, validate=True, **kwargs):
        checks.append(validate)
        return original(*args, validate=validate, **kwargs)

    monkeypatch.setattr(HY21, "call_inputs", counting)
    train_step(run)
    assert checks[0] is True and not any(checks[1:]) and len(checks) > 2
    batch = run.data.batch

    def fractional_mask(*args, **kwargs):
        x, cond = batch(*args, **kwargs)
        return x, {**cond, "prompt_attention_mask": torch.full_like(
            cond["prompt_attention_mask"], 0.5, dtype=torch.float32)}  # fmt: skip

    monkeypatch.setattr(run.data, "batch", fractional_mask)
    with pytest.raises(ValueError, match="prompt_attention_mask must hold only 0 and 1"):
        train_step(run)


def test_the_student_distill_returns_checks_its_calls_again(tmp_path):
    make_synthetic_data(tmp_path / "data", family="flux", num_files=1, per_file=2, height=4,
                        width=4, seq_len=3)  # fmt: skip
    cfg = DistillConfig(data=str(tmp_path / "data"), output=str(tmp_path / "out"), tiny=True,
                        family="flux", steps=1, lora_rank=2, device="cpu", weights_dtype="fp32",
                        progress=False, preview_every=0, report_to="none", batch_size=2,
                        align="none")  # fmt: skip
    student = distill(cfg)
    assert student.validate is True and student.teacher().validate is True
    z, cond = _batch(FLUX)
    with pytest.raises(ValueError, match="t must lie in"):
        student.teacher()(
            z.float(), torch.full((2,), 2.0), **{k: v.float() for k, v in cond.items()}
        )


def test_hunyuanimage2_checks_all_its_masks_with_one_host_read():
    model = HY21.tiny_model(0, F64, False)
    gen = torch.Generator().manual_seed(0)
    data = HY21.synthetic_sample(Synthetic(2, 4, 4, 3, gen, True, HY21.tiny_dims))
    z, cond = data.pop("latents").to(F64), {k: v.to(F64) for k, v in data.items()}
    masks = [k for k in cond if "mask" in k]
    assert len(masks) >= 2  # the prompt's and the negative prompt's
    with count_host_reads() as reads:
        HY21.call_inputs(model, z, cond, 3.5, True)
    assert reads == ["aten._local_scalar_dense"]
    bad = {**cond, masks[-1]: cond[masks[-1]] * 0.5}
    with pytest.raises(ValueError, match=f"{masks[-1]} must hold only 0 and 1"):
        HY21.call_inputs(model, z, bad, 3.5, True)
