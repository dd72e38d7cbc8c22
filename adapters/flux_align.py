"""Trajectory distribution alignment for a FLUX student: a fake-velocity critic on shared weights.

MeanFlow regression alone is mean-seeking at one or two steps; :mod:`mfcore.critics` adds a
distribution-level loss on the student's own K-step trajectory through a critic (TDM,
arXiv 2503.06674; DMD, arXiv 2311.18828; Mean Flow Distillation, arXiv 2606.11155). The
critic's network is a *fake* velocity ``v_fake(z, t)`` fitted by flow matching to the
student's re-noised samples. At FLUX's size a second transformer is out of the question, so
:class:`FluxFakeVelocity` is a second LoRA adapter on the student's transformer: the base
weights are shared three ways (teacher = adapters off, student = its adapter plus the
interval embedding, fake = its own adapter), each call switching to its adapter
(:func:`mfcore.adapters.lora.lora_active`). Its LoRA updates start at zero, so
``v_fake = v_teacher`` before the critic trains, as DMD initialises the fake from the teacher.

:class:`FluxAlignment` is the :class:`~mfcore.adapters.flux_distill.AlignmentHook` that the
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

from mfcore._checks import check_choice, check_positive_int, check_real, check_time
from mfcore.adapters.flux import SharedWeightsStudent, _checked_call, _transformer_velocity
from mfcore.adapters.lora import LoraSpec, adapter_parameters, add_lora, lora_active
from mfcore.critics import AlignmentLoss, FakeVelocityCritic, MeanFlowCritic

__all__ = ["CRITICS", "FluxFakeVelocity", "FluxAlignment"]

#: Critics the FLUX entry point can build (the kernel critic needs teacher samples and
#: works only in low dimensions).
CRITICS = ("fake", "meanflow")


class FluxFakeVelocity(nn.Module):
    """A fake velocity field ``v_fake(z, t, **cond)``: a second LoRA adapter on a student's
    transformer, its updates zero at initialisation (so it starts as the teacher).

    The module owns only the adapter's LoRA weights (:meth:`parameters` and
    :meth:`state_dict` hold nothing else; the names are the transformer's with ``/`` for
    ``.``); the transformer stays the student's.

    Args:
        student: the FLUX student (:class:`~mfcore.adapters.flux.FluxStudent`) whose
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
        if not isinstance(student, SharedWeightsStudent):
            raise TypeError(f"student must be a FLUX student, got {type(student).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        tr = student.transformer
        if adapter_name in getattr(tr, "peft_config", {}):
            raise ValueError(f"the transformer already has an adapter named {adapter_name!r}")
        spec = lora if lora is not None else student.lora_spec
        add_lora(tr, spec, adapter_name=adapter_name, activate=False)
        object.__setattr__(self, "_transformer", tr)  # shared, not a submodule of the fake
        self.adapter_name = adapter_name
        self.lora_spec = spec
        self.guidance_scale = student.guidance_scale
        self.lora = nn.ParameterDict(
            {n.replace(".", "/"): p for n, p in adapter_parameters(tr, adapter_name).items()}
        )

    def active(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: the fake's adapter is the active one inside the block."""
        return lora_active(self._transformer, self.adapter_name)

    def forward(
        self,
        z: Tensor,
        t: Tensor,
        *,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        guidance: float | Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
    ) -> Tensor:
        """Fake velocity ``v_fake(z, t)``, in mfcore's convention (``t = 1`` noise).

        Args:
            z: latents ``(B, C, H, W)`` at time ``t``.
            t: times ``(B,)`` in ``[0, 1]``.
            prompt_embeds: ``(B, L, joint_attention_dim)``.
            pooled_prompt_embeds: ``(B, pooled_projection_dim)``.
            guidance: guidance input (guidance-distilled checkpoints only; defaults to the
                student's ``guidance_scale``).
            negative_prompt_embeds: accepted and ignored (one ``cond`` serves every model).
            negative_pooled_prompt_embeds: likewise ignored.

        Returns:
            velocity ``(B, C, H, W)`` in ``z``'s dtype.
        """
        tr = self._transformer
        g = _checked_call(tr, z, prompt_embeds, pooled_prompt_embeds, guidance, self.guidance_scale)
        check_time("t", t, z)
        with self.active():
            return _transformer_velocity(tr, z, t, prompt_embeds, pooled_prompt_embeds, g)


class FluxAlignment:
    """The alignment term of the FLUX entry point (an ``AlignmentHook``).

    Per training step ``step``: from ``start`` on, :meth:`critic_step` trains the fake
    ``critic_updates`` times on the student's detached ``steps``-step trajectory; from
    ``start + critic_lead`` on, :meth:`student_loss` returns the student's alignment loss,
    which the entry point adds as ``weight *`` it to the MeanFlow loss. Both draw their
    starting noise ``(B, C, H, W)`` from the term's own generator (part of
    :meth:`state_dict`, so a resumed run continues exactly).

    Args:
        fake: the fake velocity (:class:`FluxFakeVelocity`) on the student's transformer.
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
        fake: FluxFakeVelocity,
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
        if not isinstance(fake, FluxFakeVelocity):
            raise TypeError(f"fake must be a FluxFakeVelocity, got {type(fake).__name__}")
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

    def _noise(self, x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

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
        noise = self._noise(x)
        _, metrics = self.loss.critic_step(student, noise, cond=cond, generator=self.generator)
        return metrics

    def student_loss(
        self, student: nn.Module, teacher: Any, x: Tensor, cond: dict, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's alignment loss (with graph) on its trajectory from fresh noise.

        Args:
            student: ``u(z, r, t, **cond)``; gradients flow through every step.
            teacher: ``v(z, t, **cond)``.
            x: the data batch ``(B, C, H, W)`` (its shape, device and dtype only).
            cond: conditioning of every model.
            step: the training step.

        Returns:
            ``(loss, metrics)``; a zero loss and no metrics before ``start + critic_lead``.
        """
        if step < self.start + self.critic_lead:
            return x.new_zeros(()), {}
        noise = self._noise(x)
        return self.loss.student_loss(
            student, noise, teacher=teacher, cond=cond, generator=self.generator
        )

    def state_dict(self) -> dict:
        """The fake's LoRA weights, its optimiser, the update count and the generator."""
        return {"loss": self.loss.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; raises ``KeyError`` naming a missing entry."""
        for key in ("loss", "generator"):
            if key not in state:
                raise KeyError(f"FluxAlignment state is missing {key!r}")
        self.loss.load_state_dict(state["loss"])
        self.generator.set_state(state["generator"])
