"""The warm-up's decisions under torch.distributed: 2 gloo ranks with different local batches
switch and revert at the same step once ``reduce`` sums their statistics (and would not
without it)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mfcore.path import FlowPoint
from mfcore.targets import DifferentialTarget, TeacherODETarget
from mfcore.warmup import SwitchGate, SwitchGuard, WarmupTarget, target_agreement
from tests import _distributed as D

# Multi-process runs go on one pytest-xdist worker, one after another (CI runs the slow step
# with --dist loadgroup): two gloo jobs at once on 2 cores slowed each other enough to trip
# a rare teardown abort once in about ten runs.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


def teacher(z, t):
    return torch.sin(z) + t[:, None] * z


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.9, dtype=torch.float64))

    def forward(self, z, r, t):
        return self.scale * teacher(z, t) + (t - r)[:, None] * torch.cos(z)


def _batch(rank):
    """Each rank's own rows: the same law at another scale, so local signals differ."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64) * (0.5 if rank == 0 else 3.0)
    t = 0.3 + 0.6 * torch.rand(8, generator=g, dtype=torch.float64)
    r = t * torch.rand(8, generator=g, dtype=torch.float64)
    z = (1 - t[:, None]) * x + t[:, None] * torch.randn(8, 4, generator=g, dtype=torch.float64)
    return z, r, t, teacher(z, t)


def _both(value: float) -> list[float]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _total(value: float) -> float:
    return sum(_both(value))


def _between(local: float, pooled: float, passing: str) -> float:
    """A bar between the pooled value and the ranks' local values, so that alone the ranks
    decide apart and together they take the ``passing`` side (``"below"``: pass under it)."""
    values = _both(local)
    far = max(values) if passing == "below" else min(values)
    return (far + pooled) / 2


def _events(make, student, batch, steps, hook=None):
    """The (step, kind) events of a warm-up target over ``steps`` calls on one batch."""
    target = make()
    for step in range(steps):
        if hook is not None:
            hook(step, student)
        target(student, FlowPoint(*batch), teacher=teacher, step=step)
    return target.events


def warmup_worker(rank: int, folder: str) -> None:
    z, r, t, v = batch = _batch(rank)
    student, disc, diff = Student(), TeacherODETarget(steps=2), DifferentialTarget("func")
    pred = student(z, r, t).detach()
    point = FlowPoint(z, r, t, v)
    u_disc = disc.compute(student, point, teacher=teacher)
    u_diff = diff.compute(student, point)
    sq = {"gap": (u_diff - u_disc).square().sum().item(), "disc": u_disc.square().sum().item()}
    delta = target_agreement(pred, u_disc, u_diff, r, t).delta
    pooled = (_total(sq["gap"]) / _total(sq["disc"])) ** 0.5
    gate = SwitchGate(_between(delta, pooled, "below"), rho_max=1e9, patience=1, min_count=99)
    fit = ((pred - u_disc).square().sum() / u_disc.square().sum()).item()
    threshold = _between(fit, _total(fit) / dist.get_world_size(), "below")
    # the guard: the student drifts at step 2; the bar lies between the ranks' rises
    with torch.no_grad():
        before = (student(z, r, t) - u_disc).square().sum().item()
        student.scale.mul_(1.3)
        after = (student(z, r, t) - u_disc).square().sum().item()
        student.scale.div_(1.3)
    margin = _between(after / before - 1, _total(after) / _total(before) - 1, "above")

    def drift(step, model):
        if step == 2:
            with torch.no_grad():
                model.scale.mul_(1.3)

    scenarios = {
        "gate": (lambda reduce: WarmupTarget(disc, diff, switch_step=0, gate=gate, every=1,
                                              reduce=reduce), None),
        "threshold": (lambda reduce: WarmupTarget(disc, diff, threshold=threshold, ema=0.0,
                                                   every=1, reduce=reduce), None),
        "guard": (lambda reduce: WarmupTarget(disc, diff, switch_step=0, every=1, reduce=reduce,
                                               guard=SwitchGuard(margin=margin, patience=1)),
                  drift),
    }  # fmt: skip

    def summed(x):
        dist.all_reduce(x)
        return x

    report = {}
    for name, (make, hook) in scenarios.items():
        for label, reduce in (("local", None), ("reduced", summed)):
            events = _events(lambda m=make, r=reduce: m(r), Student(), batch, 5, hook)
            report[f"{name}/{label}"] = _both([list(e) for e in events])
    if rank == 0:
        with open(os.path.join(folder, "warmup.json"), "w") as f:
            json.dump(report, f)


def test_ranks_with_different_batches_decide_at_the_same_step(tmp_path):
    D.spawn(warmup_worker, tmp_path)
    report = json.loads((tmp_path / "warmup.json").read_text())
    for name in ("gate", "threshold", "guard"):
        local, reduced = report[f"{name}/local"], report[f"{name}/reduced"]
        assert local[0] != local[1], name  # alone, the ranks would decide apart
        assert reduced[0] == reduced[1], name  # summed, they decide together
    assert any(kind == "revert" for _, kind in report["guard/reduced"][0])
    assert report["gate/reduced"][0] and report["threshold/reduced"][0]  # they do switch
