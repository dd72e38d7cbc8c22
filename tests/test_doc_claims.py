"""What the docs say about the peers (FastGen, zhuyu-cs), held to the peers' numbers, fp64.

The stored values come from each peer's own code (``tests/data/cfg_peers.json``); where a
peer's formula is needed beyond them it is written out by hand in ``tests/_cfg_peers.py``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mfcore.guidance import MeanFlowGuidance
from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from tests._cfg_peers import (
    F64,
    fastgen_gradient_gap,
    peer_data,
    peer_guidance,
    peer_inputs,
    peer_student,
    reference_loss,
)
from tests._close import FP64, assert_close_to
from tests._doc_blocks import ROOT

CONCEPTS = ROOT / "docs" / "concepts.md"
FASTGEN_P, FASTGEN_C = 1.0, 0.1  # FastGen's LossConfig: norm_method="poly_1.0", norm_const=0.1


def _flat(text: str) -> str:
    return " ".join(text.split())


def _loss(guidance, case, drop) -> torch.Tensor:
    d = peer_inputs()
    loss_fn = MeanFlowLoss(weighting=AdaptiveWeight(case["p"], case["c"]), guidance=guidance)
    cond = {"y": d["y"]}
    kw = {"noise": d["eps"], "cond": cond, "r": d["r"], "t": d["t"], "cond_drop": drop}
    return loss_fn(peer_student(), d["x"], **kw)[0]


# --------------------------------------------------------------------------- FastGen opt_grad


def test_fastgen_opt_grad_weighting_as_printed_gives_fastgen_gradient():
    printed = re.findall(r"lambda sq, r, t: ([^`\n#]+)", CONCEPTS.read_text())
    assert printed, "concepts.md prints FastGen's opt_grad weighting"
    for expr in printed:
        weighting = eval(f"lambda sq, r, t: {expr}", {"p": FASTGEN_P, "c": FASTGEN_C})
        gap = fastgen_gradient_gap(weighting, p=FASTGEN_P, c=FASTGEN_C)
        assert gap < 1e-12, f"{expr.strip()}: {gap:.2e} off FastGen's gradient"  # fp64


def test_opt_grad_weighting_without_detach_is_48_percent_off():
    # mfcore differentiates a custom weighting: what concepts.md warns about
    gap = fastgen_gradient_gap(
        lambda sq, r, t: (sq.sqrt() + FASTGEN_C) ** -FASTGEN_P, p=FASTGEN_P, c=FASTGEN_C
    )
    assert round(100 * gap) == 48 and "48 % off" in _flat(CONCEPTS.read_text())


# --------------------------------------------------------------------------- zhuyu's mode


def test_docs_say_zhuyu_runs_the_guidance_passes_in_the_current_mode():
    texts = {
        "CHANGELOG.md": (ROOT / "CHANGELOG.md").read_text(),
        "docs/concepts.md": CONCEPTS.read_text(),
        "MeanFlowGuidance": MeanFlowGuidance.__doc__,
    }
    for name, text in texts.items():
        flat = _flat(text)
        if "zhuyu" in flat and re.search(r"dropout off|eval mode", flat):
            assert re.search(r"zhuyu[^.;]*current mode", flat), name


class _DropoutStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net, self.drop = peer_student(), nn.Dropout(0.3)

    def forward(self, z, r, t, y):
        return self.drop(self.net(z, r, t, y))


def test_eval_mode_false_is_zhuyus_train_mode_passes():
    key = "w1.5_k0.3/l2"
    case, d = peer_data()["cases"][key], peer_inputs()
    student = _DropoutStudent().train()
    z, v = d["x"] + d["eps"], d["eps"] - d["x"]
    t = torch.full((8,), 0.5, dtype=F64)
    torch.manual_seed(0)
    ours = peer_guidance(key, eval_mode=False)(v, student, z, t, {"y": d["y"]})
    torch.manual_seed(0)  # zhuyu-cs: both passes in the model's mode, train here
    with torch.no_grad():
        u_c, u_u = student(z, t, t, d["y"]), student(z, t, t, torch.full_like(d["y"], 3))
    w, k = case["omega"], case["kappa"]
    torch.testing.assert_close(ours, w * v + k * u_c + (1 - w - k) * u_u, rtol=0, atol=0)
    assert student.training
    torch.manual_seed(0)
    in_eval = peer_guidance(key)(v, student, z, t, {"y": d["y"]})
    assert (in_eval - ours).abs().max() > 1e-2  # with dropout the two differ
    plain = peer_student().train()  # without, they agree
    modes = [peer_guidance(key, eval_mode=e)(v, plain, z, t, {"y": d["y"]}) for e in (True, False)]
    assert_close_to(*modes, FP64, "guidance in eval and train mode without dropout")  # fp64


# --------------------------------------------------------------------------- FastGen's dtype


def _fastgen_float(value: float) -> float:
    """FastGen's ``torch.where(mask, python_float, ...)``: a tensor of the default dtype."""
    return torch.where(torch.tensor([True]), value, 0.0).item()


def test_fixture_fastgen_values_are_its_float64_default_run():
    assert "set_default_dtype(torch.float64)" in peer_data()["notes"]["fastgen"]
    for key, case in peer_data()["cases"].items():
        if not case["guided"] or case["kappa"] != 0.3:
            continue
        stored = torch.tensor(case["peers"]["fastgen"]["loss"], dtype=F64)
        exact = _loss(peer_guidance(key), case, peer_inputs()["drop"])
        torch.testing.assert_close(exact, stored, rtol=1e-12, atol=1e-12)  # fp64
        assert torch.get_default_dtype() == torch.float32
        kappa32 = _fastgen_float(case["kappa"])
        assert kappa32 != case["kappa"] and _fastgen_float(case["omega"]) == case["omega"]
        rounded = MeanFlowGuidance(
            case["omega"], kappa32, uncond={"y": 3}, t_max=0.75, label_dropout=0.1
        )
        gap = (_loss(rounded, case, peer_inputs()["drop"]) - stored).abs().item()
        if key == "w1.5_k0.3/l2":  # the numbers concepts.md gives
            assert f"{gap:.1e}" == "1.6e-08" and f"{gap / stored.item():.1e}" == "1.2e-09"
        else:
            assert gap < 1e-8


# --------------------------------------------------------------------------- cond_dropout_prob


def test_fastgen_default_cond_dropout_none_ports_as_label_dropout_zero():
    key = "w1.5_k0.3/l2"
    case, d = peer_data()["cases"][key], peer_inputs()
    loss = _loss(peer_guidance(key, label_dropout=0.0), case, None)
    # FastGen with cond_dropout_prob=None: keep = all, every sample in the window guided
    window = d["t"] <= peer_data()["window"]["t_max"]
    ref, _, _ = reference_loss(
        peer_student(), d["x"], d["eps"], d["r"], d["t"], d["y"], p=0.0, c=case["c"],
        omega=case["omega"], kappa=case["kappa"], guided=window,
    )  # fmt: skip
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)  # fp64
    stored = case["peers"]["fastgen"]["loss"]  # cond_dropout_prob=0.1, sample 0 dropped
    assert round(100 * (loss.item() - stored) / stored) == 34
    flat = _flat(CONCEPTS.read_text())
    assert "`cond_dropout_prob` defaults to `None`: no label dropout" in flat
    assert "dropping none moves the loss by 34 %" in flat
