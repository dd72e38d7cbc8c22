"""Trajectory distribution alignment for any family's student: a fake-velocity critic on
shared weights.

MeanFlow regression alone is mean-seeking at one or two steps; :mod:`mfcore.critics` adds a
distribution-level loss on the student's own K-step trajectory through a critic (TDM,
arXiv 2503.06674; DMD, arXiv 2311.18828; Mean Flow Distillation, arXiv 2606.11155). The
critic's network is a *fake* velocity ``v_fake(z, t)`` fitted by flow matching to the
student's re-noised samples. At FLUX's or HunyuanImage's size a second transformer is out of
the question, so :class:`FakeVelocity` is a second LoRA adapter on the student's
transformer: the base weights are shared three ways (teacher = adapters off, student =
its adapter plus the interval embedding, fake = its own adapter), each call switching to its
adapter
(:func:`mfcore.adapters.lora.lora_active`). Its LoRA updates start at zero, so
``v_fake = v_teacher`` before the critic trains, as DMD initialises the fake from the teacher.

:class:`Alignment` is the :class:`~mfcore.adapters.distill.AlignmentHook` that the
distillation entry point adds to the MeanFlow loss (``--align fake`` or ``--align
meanflow``): per training step it trains the fake on the detached trajectory from fresh
noise (:meth:`~mfcore.critics.AlignmentLoss.critic_step`), then gives the student the
alignment loss of another trajectory with its graph
(:meth:`~mfcore.critics.AlignmentLoss.student_loss`), weighted by ``weight``.

Gradient checkpointing recomputes blocks in the backward with whichever adapter is active
*then*; every call of the shared transformer therefore pins its adapter switches into the
checkpoints it takes (:func:`mfcore.adapters.lora.pinned_checkpointing`), so each model's
backward recomputes through its own adapter however the calls and backwards interleave.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from mfcore._checks import (
    check_choice,
    check_instance,
    check_positive_int,
    check_real,
    check_state,
    check_time,
)
from mfcore.adapters.lora import LoraSpec, adapter_parameters, add_lora, lora_active
from mfcore.adapters.student import SharedWeightsStudent, check_cond_keys, pinned_velocity
from mfcore.critics import AlignmentLoss, FakeVelocityCritic, MeanFlowCritic
from mfcore.draws import BatchRows, draw_normal

__all__ = ["CRITICS", "FakeVelocity", "Alignment"]

#: Critics the entry point can build (the kernel critic needs teacher samples and
#: works only in low dimensions).
CRITICS = ("fake", "meanflow")


class FakeVelocity(nn.Module):
    """A fake velocity field ``v_fake(z, t, **cond)``: a second LoRA adapter on a student's
    transformer, its updates zero at initialisation (so it starts as the teacher).

    The module owns only the adapter's LoRA weights (:meth:`parameters` and
    :meth:`state_dict` hold nothing else; the names are the transformer's with ``/`` for
    ``.``); the transformer stays the student's.

    Args:
        student: the student (:class:`~mfcore.adapters.student.SharedWeightsStudent`) whose
            transformer the fake shares; build the fake after the student.
        lora: rank and target modules of the fake's adapter (default: the student's).
        adapter_name: peft's name for the fake's adapter.
    """

    def __init__(
        self,
        student: SharedWeightsStudent,
        *,
        lora: LoraSpec | None = None,
        adapter_name: str = "mfcore_fake",
    ) -> None:
        super().__init__()
        check_instance("student", student, SharedWeightsStudent, "a shared-weights student")
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        tr = student.transformer
        if adapter_name in getattr(tr, "peft_config", {}):
            raise ValueError(f"the transformer already has an adapter named {adapter_name!r}")
        spec = (lora or student.lora_spec).with_default_targets(student.lora_spec.target_modules)
        add_lora(tr, spec, adapter_name=adapter_name, activate=False)
        object.__setattr__(self, "_transformer", tr)  # shared, not a submodule of the fake
        self.adapter_name = adapter_name
        self.lora_spec = spec
        self.guidance_scale = student.guidance_scale
        self.family = student.family
        self.track_parameters()

    def track_parameters(self) -> None:
        """Hold the adapter's parameters as the transformer holds them now.

        FSDP2's ``fully_shard`` replaces a module's parameters with sharded ones: call this
        after sharding, and build the fake's optimiser after it.
        """
        params = adapter_parameters(self._transformer, self.adapter_name)
        self.lora = nn.ParameterDict({n.replace(".", "/"): p for n, p in params.items()})

    def active(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: the fake's adapter is the active one inside the block."""
        return lora_active(self._transformer, self.adapter_name)

    def forward(self, z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Fake velocity ``v_fake(z, t)``, in mfcore's convention (``t = 1`` noise).

        Args:
            z: latents ``(B, C, H, W)`` at time ``t``.
            t: times ``(B,)`` in ``[0, 1]``.
            **cond: the family's conditioning (as the student's; negatives are ignored).

        Returns:
            velocity ``(B, C, H, W)`` in ``z``'s dtype.
        """
        check_cond_keys(self.family, cond)
        tr = self._transformer
        call = self.family.call_inputs(tr, z, cond, self.guidance_scale, False)
        check_time("t", t, z)
        with self.active():
            return pinned_velocity(self.family, tr, z, t, call.inputs)


class Alignment:
    """The alignment term of the entry point (an ``AlignmentHook``).

    Per training step ``step``: from ``start`` on, :meth:`critic_step` trains the fake
    ``critic_updates`` times on the student's detached ``steps``-step trajectory; from
    ``start + critic_lead`` on, :meth:`student_loss` returns the student's alignment loss,
    which the entry point adds as ``weight *`` it to the MeanFlow loss. Both draw their
    starting noise ``(B, C, H, W)`` from the term's own generator (part of
    :meth:`state_dict`, so a resumed run continues exactly).

    Args:
        fake: the fake velocity (:class:`FakeVelocity`) on the student's transformer.
        critic: ``"fake"`` (velocity critic) or ``"meanflow"`` (average-velocity critic).
        steps: student steps ``K`` of the aligned trajectory.
        weight: ``lambda`` of the alignment loss.
        lr: AdamW learning rate of the fake's LoRA weights.
        critic_updates: fake updates per student update.
        ode_steps: Heun steps of the mean-flow critic's transports.
        start: first training step with critic updates.
        critic_lead: critic-only steps before the student feels the alignment.
        seed: seed of the term's generator.
    """

    def __init__(
        self,
        fake: FakeVelocity,
        *,
        critic: str = "fake",
        steps: int = 1,
        weight: float = 0.3,
        lr: float = 1e-4,
        critic_updates: int = 1,
        ode_steps: int = 2,
        start: int = 0,
        critic_lead: int = 0,
        seed: int = 0,
    ) -> None:
        check_instance("fake", fake, FakeVelocity, "a FakeVelocity")
        check_choice("critic", critic, CRITICS)
        weight = check_real("weight", weight, minimum=0.0)
        lr = check_real("lr", lr, minimum=0.0, strict=True)
        start = check_positive_int("start", start, minimum=0)
        critic_lead = check_positive_int("critic_lead", critic_lead, minimum=0)
        optimizer = torch.optim.AdamW(fake.parameters(), lr=lr, weight_decay=0.0)
        if critic == "meanflow":
            ode_steps = check_positive_int("ode_steps", ode_steps)
            net = MeanFlowCritic(fake, optimizer, ode_steps=ode_steps)
        else:
            net = FakeVelocityCritic(fake, optimizer)
        self.fake = fake
        self.loss = AlignmentLoss(net, steps=steps, critic_updates=critic_updates)
        self.weight = weight
        self.start = start
        self.critic_lead = critic_lead
        device = next(iter(fake.parameters())).device
        self.generator = torch.Generator(device=device).manual_seed(int(seed))

    def noise(self, x: Tensor, rows: BatchRows | None = None) -> Tensor:
        """Starting noise shaped like ``x`` from the term's generator: ``rows`` of the global
        batch's draw when given (a :class:`~mfcore.draws.BatchRows` on :attr:`generator`)."""
        return draw_normal(x.shape, self._draws(rows), device=x.device, dtype=x.dtype)

    def _draws(self, rows: BatchRows | None) -> torch.Generator | BatchRows:
        if rows is None:
            return self.generator
        if rows.generator is not self.generator:
            raise ValueError("rows must draw from the alignment term's own generator")
        return rows

    def critic_loss(
        self, student: nn.Module, noise: Tensor, cond: dict, rows: BatchRows | None = None
    ) -> Tensor:
        """One critic update's loss on the student's trajectory from ``noise``, with the
        fake's graph (for a trainer that accumulates it over micro-batches and steps
        :attr:`optimizer` itself); ``rows`` as in :meth:`noise`."""
        return self.loss.critic_loss(student, noise, cond=cond, generator=self._draws(rows))

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The fake's optimiser."""
        return self.loss.critic.optimizer

    def critic_step(
        self, student: nn.Module, teacher: Any, x: Tensor, cond: dict, step: int
    ) -> dict[str, Tensor]:
        """Train the fake on the student's trajectory from fresh noise shaped like ``x``.

        Args:
            student: ``u(z, r, t, **cond)``.
            teacher: unused (the fake's flow matching needs no teacher).
            x: the data batch ``(B, C, H, W)`` (its shape, device and dtype only).
            cond: conditioning of every model.
            step: the training step.

        Returns:
            metrics (``critic_fm``, ``critic_updates``); empty before ``start``.
        """
        del teacher
        if step < self.start:
            return {}
        noise = self.noise(x)
        _, metrics = self.loss.critic_step(student, noise, cond=cond, generator=self.generator)
        return metrics

    def student_loss(
        self,
        student: nn.Module,
        teacher: Any,
        x: Tensor,
        cond: dict,
        step: int,
        rows: BatchRows | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's alignment loss (with graph) on its trajectory from fresh noise.

        Args:
            student: ``u(z, r, t, **cond)``; gradients flow through every step.
            teacher: ``v(z, t, **cond)``.
            x: the data batch ``(B, C, H, W)`` (its shape, device and dtype only).
            cond: conditioning of every model.
            step: the training step.
            rows: which rows of the global batch ``x`` holds, drawing from :attr:`generator`
                (a :class:`~mfcore.draws.BatchRows`); None: draw for ``x`` alone.

        Returns:
            ``(loss, metrics)``; a zero loss and no metrics before ``start + critic_lead``.
        """
        if step < self.start + self.critic_lead:
            return x.new_zeros(()), {}
        return self.loss.student_loss(
            student, self.noise(x, rows), teacher=teacher, cond=cond, generator=self._draws(rows)
        )

    def state_dict(self) -> dict:
        """The fake's LoRA weights, its optimiser, the update count and the generator."""
        return {"loss": self.loss.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; raises ``KeyError`` naming a missing entry."""
        check_state("Alignment", state, ("loss", "generator"))
        self.loss.load_state_dict(state["loss"])
        self.generator.set_state(state["generator"])
