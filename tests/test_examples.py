"""The ``Example:`` blocks of the main docstrings run as doctests, and pass.

Each name below must carry an example (so one cannot disappear unnoticed), and every
example found in these modules must run without a failure.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = (
    "mfcore",
    "mfcore.fields",
    "mfcore.losses",
    "mfcore.targets",
    "mfcore.warmup",
    "mfcore.time",
    "mfcore.schedule",
    "mfcore.solvers",
    "mfcore.jvp",
    "mfcore.tangent_rules",
    "mfcore.guidance",
    "mfcore.velocity_critics",
    "mfcore.kernel_critic",
    "mfcore.alignment_loss",
    "mfcore.curricula",
    "mfcore.path",
    "mfcore.adapters.family",
    "mfcore.adapters.distill",
    "mfcore.adapters.step",
)
#: The names whose docstrings must hold an example (``module.qualname``).
DOCUMENTED = {
    "mfcore",
    "mfcore.fields.velocity_of",
    "mfcore.losses.MeanFlowLoss",
    "mfcore.losses.FlowMatchingLoss",
    "mfcore.losses.AdaptiveWeight",
    "mfcore.targets.differential_target",
    "mfcore.targets.teacher_ode_target",
    "mfcore.targets.DifferentialTarget",
    "mfcore.targets.TeacherODETarget",
    "mfcore.warmup.WarmupTarget",
    "mfcore.time.TimePairSampler",
    "mfcore.time.ClampedPairSampler",
    "mfcore.schedule.uniform_grid",
    "mfcore.schedule.shifted_grid",
    "mfcore.solvers.odeint",
    "mfcore.solvers.sample_teacher",
    "mfcore.solvers.sample_meanflow",
    "mfcore.jvp.total_derivative",
    "mfcore.tangent_rules.use_tangent_rules",
    "mfcore.guidance.MeanFlowGuidance",
    "mfcore.alignment_loss.AlignmentLoss",
    "mfcore.velocity_critics.FakeVelocityCritic",
    "mfcore.kernel_critic.kernel_discrepancy",
    "mfcore.curricula.LinearSpan",
    "mfcore.curricula.HalvingSpan",
    "mfcore.curricula.SplitCurriculumTarget",
    "mfcore.guidance.apg_velocity",
    "mfcore.path.FlowPoint",
    "mfcore.adapters.family.Family",
    "mfcore.adapters.distill.build_run",
    "mfcore.adapters.step.train_step",
}


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    # only the module's own objects (not the names it re-exports)
    return [test for test in finder.find(module, name) if test.examples]


def test_every_main_name_has_an_example():
    found = {test.name for name in MODULES for test in _examples(name)}
    assert DOCUMENTED <= found, sorted(DOCUMENTED - found)


@pytest.mark.parametrize("module", MODULES)
def test_the_examples_pass(module):
    tests = _examples(module)
    assert tests, f"{module} has no example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted == sum(len(t.examples) for t in tests)
    assert results.failed == 0
