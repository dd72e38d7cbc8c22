r"""FLUX.1 as an ArcFlow student: a momentum-mixture head on diffusers' FluxTransformer2DModel.

ArcFlow (Yang et al., arXiv 2602.09014) predicts, at the source time ``s0`` of each step,
``K`` velocity components ``m_k``, mixture weights ``pi_k`` and rates ``g_k``; the velocity
inside the step is ``v(s) = sum_k pi_k m_k exp(g_k (s0 - s))``, integrated in closed form by
:func:`mfcore.arcflow.arc_step`. The paper trains LoRA adapters on the backbone and an output
head; this module does the same on FLUX:

- the head is an :class:`mfcore.arcflow.ArcFlowHead` on the features that FLUX's final
  ``proj_out`` reads (the output of ``norm_out``, ``(B, L, inner_dim)`` per packed token). It
  is initialised from the pretrained ``proj_out`` (component 0 holds the velocity, the others
  start at zero), so at initialisation one ArcFlow step is the teacher's Euler step;
- the backbone gets LoRA updates (:func:`mfcore.adapters.lora.add_lora`) on every target of
  :data:`mfcore.adapters.flux.FLUX_LORA_TARGETS` except the final ``proj_out``, which the head
  replaces (:func:`arcflow_lora_targets`);
- the teacher is the same transformer with LoRA off and the head off
  (:class:`mfcore.adapters.flux.FluxTeacher`): the base weights exist once.

Per packed token the head emits ``K (4C + 2)`` numbers: the ``K`` components' packed
velocities (``4C`` channels: a 2x2 patch of ``C`` latent channels), ``K`` logits and ``K``
rates (the layout of :func:`mfcore.arcflow.split_arc_output`). Components are unpacked to
the VAE's ``(B, C, H, W)`` layout with :func:`mfcore.adapters.flux.unpack_latents`; the weights
and rates of a token are shared by the ``C`` channels and the four pixels of its patch.

Times are FLUX's sigma, i.e. mfcore's ``t`` unchanged (t = 0 data, t = 1 noise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from mfcore._checks import check_instance, check_real, check_time
from mfcore.adapters._state import read_tensors
from mfcore.adapters.flux import (
    FAMILY,
    FLUX_LORA_TARGETS,
    SharedWeightsStudent,
    latent_image_ids,
    pack_latents,
    text_ids,
    unpack_latents,
)
from mfcore.adapters.lora import (
    LoraSpec,
    add_lora,
    load_lora_state_dict,
    lora_active,
    lora_state_dict,
    pinned_checkpointing,
)
from mfcore.adapters.student import load_exactly, read_saved_config, split_state
from mfcore.arcflow import ArcFlowHead, ArcParams, sample_arcflow, split_arc_output

__all__ = ["arcflow_lora_targets", "FluxArcFlowStudent", "ARCFLOW_CONFIG_NAME"]

#: The JSON config of a saved ArcFlow student, and its head's weights.
ARCFLOW_CONFIG_NAME = "mfcore_flux_arcflow_student.json"
_HEAD_WEIGHT_NAME = "arcflow_head.safetensors"
_ARC_FORMAT = "mfcore-flux-arcflow-student"

logger = logging.getLogger(__name__)

# The module name of FLUX's final projection, which the ArcFlow head replaces.
_OUTPUT_NAME = "proj_out"


def arcflow_lora_targets(transformer: FluxTransformer2DModel) -> tuple[str, ...]:
    """LoRA targets for an ArcFlow FLUX student: FLUX's, minus the final ``proj_out``.

    :data:`~mfcore.adapters.flux.FLUX_LORA_TARGETS` names ``proj_out``, which peft matches both
    in the single-stream blocks and at the top level. The top-level one is the head's
    business, so the single-stream ones are listed by their full names instead.

    Args:
        transformer: the FLUX transformer the student will be built on.

    Returns:
        module-name suffixes for :class:`~mfcore.adapters.lora.LoraSpec`.
    """
    FAMILY.check_model(transformer)
    n_single = len(transformer.single_transformer_blocks)
    single = tuple(f"single_transformer_blocks.{i}.{_OUTPUT_NAME}" for i in range(n_single))
    return tuple(t for t in FLUX_LORA_TARGETS if t != _OUTPUT_NAME) + single


def _check_output_layer(transformer: FluxTransformer2DModel) -> nn.Linear:
    layer = getattr(transformer, _OUTPUT_NAME, None)
    if type(layer) is not nn.Linear:
        raise TypeError(
            f"transformer.{_OUTPUT_NAME} must be a plain nn.Linear (no LoRA or other wrapper on "
            f"it yet), got {type(layer).__name__}"
        )
    return layer


def _arcflow_spec(spec: object, transformer: FluxTransformer2DModel) -> LoraSpec:
    """``spec`` with a bare ``"proj_out"`` target narrowed to the single-stream blocks' ones."""
    check_instance("lora", spec, LoraSpec, "a LoraSpec or None", optional=True)
    if spec is None:
        return LoraSpec(target_modules=arcflow_lora_targets(transformer))
    assert isinstance(spec, LoraSpec)
    if spec.target_modules is None:
        return spec.with_default_targets(arcflow_lora_targets(transformer))
    if _OUTPUT_NAME not in spec.target_modules:
        return spec
    logger.info(
        "LoRA target %r narrowed to the single-stream blocks (the head replaces the final one)",
        _OUTPUT_NAME,
    )
    single = [t for t in arcflow_lora_targets(transformer) if t.endswith("." + _OUTPUT_NAME)]
    kept = [t for t in spec.target_modules if t != _OUTPUT_NAME]
    return dataclasses.replace(spec, target_modules=tuple(kept + single))


def _tokens_to_latents(x: Tensor, height: int, width: int) -> Tensor:
    """``(B, K, D, L)`` per-token values -> ``(B, K, D / 4, H, W)`` (FLUX's 2x2 unpacking)."""
    b, k, d, n = x.shape
    tokens = x.movedim(2, -1).reshape(b * k, n, d)
    return unpack_latents(tokens, height, width).reshape(b, k, d // 4, height, width)


def _unpack_params(params: ArcParams, height: int, width: int, dtype: torch.dtype) -> ArcParams:
    """Packed-token :class:`ArcParams` (``m (B, K, 4C, L)``) -> latent layout ``(B, K, C, H, W)``.

    The per-token weights and rates ``(B, K, 1, L)`` are repeated over the 2x2 patch (as a
    4-channel token) and come out as ``(B, K, 1, H, W)``.
    """
    m = _tokens_to_latents(params.m, height, width).to(dtype)
    per_pixel = [
        _tokens_to_latents(x.expand(-1, -1, 4, -1), height, width)
        for x in (params.weights, params.rates)
    ]
    return ArcParams(m=m, weights=per_pixel[0], rates=per_pixel[1], s0=params.s0)


class FluxArcFlowStudent(SharedWeightsStudent):
    """A FLUX transformer as an ArcFlow student ``f(z, s0, **cond) -> ArcParams``.

    ArcFlow, Yang et al., arXiv 2602.09014: LoRA on the backbone and a momentum-mixture head
    in place of the final projection. The student satisfies
    :class:`mfcore.arcflow.ArcFlowStudent`, so it plugs into
    :func:`mfcore.arcflow.sample_arcflow` and :class:`mfcore.arcflow.ArcFlowDistillationLoss`
    with :meth:`teacher` as the teacher. At initialisation (LoRA updates zero, head copied
    from ``proj_out``) the mixture is the constant velocity ``v_teacher(z, s0)``, so one
    closed-form step from ``s_a`` to ``s_b`` is ``z - (s_a - s_b) v_teacher(z, s_a)``.

    The head runs through a forward hook on ``transformer.proj_out`` that is active only
    inside :meth:`forward`; everywhere else (the teacher, a plain pipeline) the transformer
    is the base model with its own ``proj_out``.

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` (LoRA is injected in place).
        num_components: momentum components ``K >= 1`` (component 0 has rate 0).
        max_rate: smooth cap on the head's rates, in ``(0, mfcore.arcflow.MAX_RATE]``.
        lora: LoRA rank and targets (rank 64 on :func:`arcflow_lora_targets` by default). A
            bare ``"proj_out"`` target (as in ``FLUX_LORA_TARGETS``, the ``LoraSpec``
            default) is narrowed to the single-stream blocks' ``proj_out``: the final one is
            the head's. :attr:`lora_spec` holds the spec as applied.
        guidance_scale: guidance input of a guidance-distilled checkpoint (the student
            distils the teacher at this scale).
        adapter_name: peft's name for the adapter.

    Raises:
        TypeError: ``transformer`` is not a FLUX transformer, or its ``proj_out`` is already
            wrapped; ``lora`` is not a :class:`~mfcore.adapters.lora.LoraSpec`.
        ValueError: a bad ``num_components`` or ``max_rate``.
    """

    #: How a few-step sample is drawn from it (:func:`~.generation.generate_latents` reads it).
    sampler = staticmethod(sample_arcflow)

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        *,
        num_components: int = 2,
        max_rate: float = 10.0,
        lora: LoraSpec | None = None,
        guidance_scale: float = 3.5,
        adapter_name: str = "mfcore",
    ) -> None:
        super().__init__()
        FAMILY.check_model(transformer)
        output = _check_output_layer(transformer)
        self.lora_spec = _arcflow_spec(lora, transformer)
        self.head = ArcFlowHead.from_velocity_projection(output, num_components, max_rate=max_rate)
        self.guidance_scale = check_real("guidance_scale", guidance_scale)
        self.adapter_name = adapter_name
        self.family = FAMILY
        self.transformer = transformer
        add_lora(transformer, self.lora_spec, adapter_name=adapter_name)
        self._train_in_fp32()
        self._head_active = False
        self._hook = output.register_forward_hook(self._replace_output)

    @property
    def num_components(self) -> int:
        """The number ``K`` of momentum components."""
        return self.head.num_components

    def _replace_output(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """While :meth:`forward` runs, the transformer's output is the head's raw output."""
        if not self._head_active:
            return None
        features = args[0]
        return self.head.proj(features.to(self.head.proj.weight.dtype))

    @contextlib.contextmanager
    def _head_on(self) -> Iterator[None]:
        self._head_active = True
        try:
            yield
        finally:
            self._head_active = False

    def forward(
        self,
        z: Tensor,
        s0: Tensor,
        *,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        guidance: float | Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
    ) -> ArcParams:
        """The momentum mixture of the step that starts at ``s0``.

        Args:
            z: latents ``(B, C, H, W)`` at ``s0`` (``4 C`` = the transformer's in_channels).
            s0: source times ``(B,)`` in ``[0, 1]`` (FLUX's sigma; 1 is noise).
            prompt_embeds: ``(B, L, joint_attention_dim)``.
            pooled_prompt_embeds: ``(B, pooled_projection_dim)``.
            guidance: guidance input (guidance-distilled checkpoints only; defaults to
                ``guidance_scale``).
            negative_prompt_embeds: accepted and ignored, so that one ``cond`` dict serves
                the (possibly CFG) teacher and the student.
            negative_pooled_prompt_embeds: likewise ignored.

        Returns:
            :class:`~mfcore.arcflow.ArcParams` with ``m (B, K, C, H, W)`` in ``z``'s dtype,
            weights and rates ``(B, K, 1, H, W)`` (fp32 at least) and ``s0``.
        """
        tr = self.transformer
        cond = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
        if guidance is not None:
            cond["guidance"] = guidance
        g = FAMILY.call_inputs(tr, z, cond, self.guidance_scale, False).inputs["guidance"]
        check_time("s0", s0, z)
        with self._head_on():
            raw = self._transformer_tokens(z, s0, prompt_embeds, pooled_prompt_embeds, g)
        packed = split_arc_output(
            raw.movedim(-1, 1), s0, num_components=self.num_components, max_rate=self.head.max_rate
        )
        return _unpack_params(packed, z.shape[2], z.shape[3], z.dtype)

    def _transformer_tokens(
        self, z: Tensor, s0: Tensor, prompt_embeds: Tensor, pooled: Tensor, g: Tensor | None
    ) -> Tensor:
        """One transformer call on packed latents; the raw head output ``(B, L, K (4C + 2))``."""
        tr = self.transformer
        _, _, h, w = z.shape
        dtype = tr.dtype
        ids = {"device": z.device, "dtype": dtype, "validate": False}  # checked by forward
        with lora_active(tr, self.adapter_name), pinned_checkpointing(tr):
            return tr(
                hidden_states=pack_latents(z.to(dtype), validate=False),
                encoder_hidden_states=prompt_embeds.to(dtype),
                pooled_projections=pooled.to(dtype),
                timestep=s0,
                img_ids=latent_image_ids(h, w, **ids),
                txt_ids=text_ids(prompt_embeds.shape[1], **ids),
                guidance=g,
                return_dict=False,
            )[0]

    # ----------------------------------------------------------------------- trainable state

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Every trained tensor, keyed ``lora.<module>...`` and ``head.<name>``, detached."""
        lora = lora_state_dict(self.transformer, adapter_name=self.adapter_name)
        state = {f"lora.{k}": v for k, v in lora.items()}
        state.update({f"head.{k}": v.detach() for k, v in self.head.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`trainable_state_dict`; every key must match (``ValueError`` otherwise)."""
        lora, head = split_state(state, ("lora.", "head."))
        load_lora_state_dict(self.transformer, lora, adapter_name=self.adapter_name)
        load_exactly(self.head, head, "head")

    # ----------------------------------------------------------------------- saved students

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the trained state to ``directory`` as safetensors plus JSON: the LoRA in
        diffusers' format (``pytorch_lora_weights.safetensors``), the head
        (``arcflow_head.safetensors``) and :data:`ARCFLOW_CONFIG_NAME`."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.family.save_lora(directory, self.transformer, self.adapter_name)
        head = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, os.path.join(directory, _HEAD_WEIGHT_NAME))
        meta = {
            "format": _ARC_FORMAT,
            "version": 1,
            "num_components": self.num_components,
            "max_rate": self.head.max_rate,
            "lora": self.lora_spec.to_dict(),
            "guidance_scale": self.guidance_scale,
            "adapter_name": self.adapter_name,
            "transformer_config": self.family.config_summary(self.transformer),
        }
        with open(os.path.join(directory, ARCFLOW_CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(
        cls, transformer: FluxTransformer2DModel, directory: str | os.PathLike
    ) -> FluxArcFlowStudent:
        """Build a student on ``transformer`` from a :meth:`save_pretrained` folder.

        Raises:
            FileNotFoundError: the folder holds no saved ArcFlow student.
            ValueError: it was saved for another transformer.
        """
        meta = read_saved_config(directory, ARCFLOW_CONFIG_NAME, _ARC_FORMAT, "FLUX ArcFlow")
        if meta["transformer_config"] != FAMILY.config_summary(transformer):
            raise ValueError(f"{directory} was saved for transformer {meta['transformer_config']}")
        student = cls(
            transformer,
            num_components=meta["num_components"],
            max_rate=meta["max_rate"],
            lora=LoraSpec(**meta["lora"]),
            guidance_scale=meta["guidance_scale"],
            adapter_name=meta["adapter_name"],
        )
        student.family.load_lora(os.fspath(directory), transformer, student.adapter_name)
        student.head.load_state_dict(
            read_tensors(os.path.join(directory, _HEAD_WEIGHT_NAME), what="student file")
        )
        return student
