"""mfcore.draws: parts of a batch draw exactly the rows of the whole batch's draw."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.critics import AlignmentLoss, FakeVelocityCritic, KernelCritic
from mfcore.draws import BatchRows, draw_normal, draw_uniform

DRAWS = {"normal": draw_normal, "uniform": draw_uniform}


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    width=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    kind=st.sampled_from(sorted(DRAWS)),
)
def test_parts_concatenate_to_the_whole_draw(cuts, width, seed, kind):
    draw, total = DRAWS[kind], sum(cuts)
    gen = torch.Generator().manual_seed(seed)
    whole = draw((total, width), gen, dtype=torch.float64)
    end = gen.get_state()
    parts, start = [], 0
    for n in cuts:  # each part starts from the same generator state, as each rank does
        part = torch.Generator().manual_seed(seed)
        parts.append(
            draw((n, width), BatchRows(part, start, start + n, total), dtype=torch.float64)
        )
        assert torch.equal(part.get_state(), end)  # and ends where the whole draw ends
        start += n
    assert torch.equal(torch.cat(parts), whole)


def test_a_plain_generator_draws_as_torch_does():
    a = draw_normal((3, 2), torch.Generator().manual_seed(1))
    assert torch.equal(a, torch.randn((3, 2), generator=torch.Generator().manual_seed(1)))


def test_bad_rows_are_named():
    gen = torch.Generator()
    with pytest.raises(TypeError, match="generator"):
        BatchRows(None, 0, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stop"):
        BatchRows(gen, 2, 2, 4)
    with pytest.raises(ValueError, match="total"):
        BatchRows(gen, 0, 5, 4)
    with pytest.raises(TypeError, match="start"):
        BatchRows(gen, 0.5, 1, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rows"):
        draw_normal((3, 2), BatchRows(gen, 0, 2, 4))


class _Fake(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, z, t):
        return self.lin(z) * (1 + t)[:, None]


def _critic_run(rows_of):
    """A critic update and a student loss on a toy batch of 4, as ``rows_of(gen)`` parts."""
    torch.manual_seed(0)
    fake = _Fake()
    critic = FakeVelocityCritic(fake, torch.optim.SGD(fake.parameters(), lr=0.0))
    loss = AlignmentLoss(critic, steps=2)

    def student(z, r, t):
        return torch.tanh(z) * (1 + t - r)[:, None]

    def teacher(z, t):
        return z * t[:, None]

    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values = []
    for part in rows_of(torch.Generator().manual_seed(7)):
        rows = slice(part.start, part.stop)
        values.append(loss.critic_loss(student, noise[rows], generator=part) * part.rows)
        align, _ = loss.student_loss(student, noise[rows], teacher=teacher, generator=part)
        values.append(align * part.rows)
    return torch.stack(values).view(-1, 2).sum(0) / 4


def test_critics_draw_the_global_batch_in_any_split():
    whole = _critic_run(lambda g: [BatchRows(g, 0, 4, 4)])

    def halves(gen):
        state = gen.get_state()
        for a in (0, 2):
            gen.set_state(state)  # each part starts where the whole batch would
            yield BatchRows(gen, a, a + 2, 4)

    torch.testing.assert_close(_critic_run(halves), whole, rtol=1e-12, atol=0)
    plain = _critic_run(lambda g: [BatchRows(g, 0, 2, 4), BatchRows(g, 2, 4, 4)])
    assert not torch.allclose(plain, whole)  # without the restore the parts draw anew


def test_critic_loss_is_the_loss_critic_step_trains_on():
    def student(z, r, t):
        return torch.tanh(z) * (1 + t - r)[:, None]

    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values = []
    for stepped in (False, True):
        torch.manual_seed(0)
        fake = _Fake()
        loss = AlignmentLoss(FakeVelocityCritic(fake, torch.optim.SGD(fake.parameters(), lr=0.1)))
        gen = torch.Generator().manual_seed(7)
        if stepped:
            values.append(loss.critic_step(student, noise, generator=gen)[0])
        else:
            values.append(loss.critic_loss(student, noise, generator=gen).detach())
    assert torch.equal(values[0], values[1])
    with pytest.raises(ValueError, match="network"):
        AlignmentLoss(KernelCritic()).critic_loss(student, noise)
