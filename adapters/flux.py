"""FLUX.1 as an mfcore teacher and MeanFlow student (diffusers' FluxTransformer2DModel).

FLUX's own conventions, converted here and nowhere else:

- time: the transformer takes ``sigma in [0, 1]`` with sigma = 1 pure noise and multiplies
  it by 1000 inside; that is mfcore's ``t`` unchanged.
- velocity: the pipeline's scheduler steps ``z_next = z + (sigma_next - sigma) * out``
  (``FlowMatchEulerDiscreteScheduler.step``), so the transformer's output is
  ``dz/dsigma = eps - x``: mfcore's ``v`` with no sign flip.
- latents: the VAE's ``(B, C, H, W)`` latents are packed into 2x2 patches
  ``(B, H W / 4, 4 C)`` with position ids ``(H W / 4, 3)``; text tokens get zero ids.
  The fields here take and return unpacked ``(B, C, H, W)`` latents (the VAE's, already
  normalised as ``(latent - shift_factor) * scaling_factor``).
- guidance: guidance-distilled checkpoints (FLUX.1-dev) take the guidance scale as an
  embedding (``guidance_embeds=True``); others get true two-pass classifier-free guidance
  ``v = v_neg + s (v_pos - v_neg)`` from negative prompt embeddings.
- schedule: the sampling grid is shifted by the resolution-dependent ``mu`` of
  :func:`flux_mu` (:func:`mfcore.time.exponential_shift`).

The student (:class:`FluxStudent`) is the same transformer with LoRA updates and an extra
embedding of the interval ``t - r`` added to FLUX's time embedding; both start at zero, so
the student equals the teacher for every ``r`` before training. The teacher
(:class:`FluxTeacher`) is that transformer with the updates off: the base weights exist once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import Tensor, nn

from mfcore._checks import check_positive_int, check_tensor
from mfcore.adapters.conditions import PooledTextConditions
from mfcore.adapters.family import Call, FamilyBase, guidance_input
from mfcore.adapters.interval import IntervalEmbedding
from mfcore.adapters.lora import load_lora, save_lora
from mfcore.adapters.prepare import PipelinePrompts
from mfcore.adapters.routing import ATTENTION_MODES, attention_mode_for
from mfcore.adapters.student import (
    INTERVAL_WEIGHT_NAME,
    MeanFlowStudent,
    SharedWeightsStudent,
    Teacher,
)
from mfcore.time import resolution_shift_mu

__all__ = [
    "FAMILY",
    "FluxFamily",
    "SharedWeightsStudent",
    "FLUX_DEV_CONFIG",
    "TINY_FLUX_CONFIG",
    "FLUX_LORA_TARGETS",
    "STUDENT_CONFIG_NAME",
    "INTERVAL_WEIGHT_NAME",
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
    "text_ids",
    "flux_mu",
    "ATTENTION_MODES",
    "attention_mode_for",
    "IntervalEmbedding",
    "FluxTeacher",
    "FluxStudent",
]

logger = logging.getLogger(__name__)

#: ``FluxTransformer2DModel`` config of FLUX.1-dev (about 11.9B parameters).
FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

#: diffusers' own test config: a random FLUX with one block of each kind (runs on a CPU).
TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 4, 8),
}

#: The linear layers of a FLUX transformer that get LoRA updates: every attention
#: projection of the double- and single-stream blocks, their MLPs, and the output layers.
FLUX_LORA_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)

STUDENT_CONFIG_NAME = "mfcore_flux_student.json"
_FORMAT = "mfcore.adapters.flux.FluxStudent"


# --------------------------------------------------------------------------- latents and ids


def _check_latents(name: str, z: object) -> Tensor:
    """``z`` if it is a floating ``(B, C, H, W)`` tensor with an even ``H`` and ``W``."""
    check_tensor(name, z)
    assert isinstance(z, Tensor)
    if z.ndim != 4 or z.shape[2] % 2 or z.shape[3] % 2:
        raise ValueError(
            f"{name} must be VAE latents (B, C, H, W) with an even height and width for 2x2 "
            f"packing, got shape {tuple(z.shape)}"
        )
    return z


def _check_even(name: str, n: object) -> int:
    if check_positive_int(name, n) % 2:
        raise ValueError(f"{name} must be even, got {n}")
    return int(n)


def pack_latents(latents: Tensor, *, validate: bool = True) -> Tensor:
    """Pack VAE latents into FLUX's 2x2 patch tokens (``FluxPipeline._pack_latents``).

    Args:
        latents: ``(B, C, H, W)`` with even ``H`` and ``W``.
        validate: check ``latents`` (off for latents checked already).

    Returns:
        tokens ``(B, H W / 4, 4 C)``, row-major over the ``(H/2, W/2)`` patch grid.
    """
    if validate:
        _check_latents("latents", latents)
    return FluxPipeline._pack_latents(latents, *latents.shape)


def unpack_latents(tokens: Tensor, height: int, width: int, *, validate: bool = True) -> Tensor:
    """Inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents`` at latent resolution).

    Args:
        tokens: ``(B, height * width / 4, 4 C)``.
        height: latent height ``H`` (even).
        width: latent width ``W`` (even).
        validate: check the arguments (off for arguments checked already).

    Returns:
        latents ``(B, C, H, W)``.
    """
    if not validate:
        return FluxPipeline._unpack_latents(tokens, height, width, 1)
    check_tensor("tokens", tokens)
    n = _check_even("height", height) * _check_even("width", width) // 4
    if tokens.ndim != 3 or tokens.shape[1] != n or tokens.shape[2] % 4:
        raise ValueError(
            f"tokens must be (B, {n}, 4C), the {n} patches of a {height}x{width} latent, got "
            f"shape {tuple(tokens.shape)}"
        )
    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def latent_image_ids(
    height: int,
    width: int,
    *,
    device: torch.device | str | None = None,
    dtype=torch.float32,
    validate: bool = True,
) -> Tensor:
    """Position ids of the packed image tokens (``FluxPipeline._prepare_latent_image_ids``).

    Args:
        height: latent height ``H`` (even).
        width: latent width ``W`` (even).
        validate: check the sizes (off for sizes checked already).

    Returns:
        ids ``(H W / 4, 3)``: ``(0, row, column)`` of each 2x2 patch.
    """
    if validate:
        _check_even("height", height)
        _check_even("width", width)
    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


def text_ids(
    seq_len: int,
    *,
    device: torch.device | str | None = None,
    dtype=torch.float32,
    validate: bool = True,
) -> Tensor:
    """Position ids of the text tokens: zeros ``(seq_len, 3)``, as the pipeline's (``validate``
    checks ``seq_len``)."""
    n = check_positive_int("seq_len", seq_len) if validate else seq_len
    return torch.zeros(n, 3, device=device, dtype=dtype)


def flux_mu(image_seq_len: int, scheduler_config: Mapping[str, Any] | None = None) -> float:
    """FLUX's resolution-dependent log-shift ``mu`` for ``image_seq_len`` packed tokens.

    Reads ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift`` and ``max_shift``
    from a ``FlowMatchEulerDiscreteScheduler`` config when given (FLUX.1's defaults
    otherwise) and evaluates :func:`mfcore.time.resolution_shift_mu`.
    """
    cfg = dict(scheduler_config or {})
    return resolution_shift_mu(
        image_seq_len,
        base_seq_len=int(cfg.get("base_image_seq_len", 256)),
        max_seq_len=int(cfg.get("max_image_seq_len", 4096)),
        base_shift=float(cfg.get("base_shift", 0.5)),
        max_shift=float(cfg.get("max_shift", 1.15)),
    )


# --------------------------------------------------------------------------- one transformer call


def _flux_velocity(
    transformer: FluxTransformer2DModel,
    z: Tensor,
    t: Tensor,
    prompt_embeds: Tensor,
    pooled: Tensor,
    guidance: Tensor | None,
) -> Tensor:
    """One call of the transformer on unpacked latents, checked by the caller; output in
    ``z``'s dtype."""
    _, _, h, w = z.shape
    dtype = transformer.dtype
    ids = {"device": z.device, "dtype": dtype, "validate": False}
    out = transformer(
        hidden_states=pack_latents(z.to(dtype), validate=False),
        encoder_hidden_states=prompt_embeds.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=t,
        img_ids=latent_image_ids(h, w, **ids),
        txt_ids=text_ids(prompt_embeds.shape[1], **ids),
        guidance=guidance,
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w, validate=False).to(z.dtype)


# --------------------------------------------------------------------------- the family


class FluxFamily(PipelinePrompts, PooledTextConditions, FamilyBase):
    """FLUX.1's conventions for the adapter core (:class:`mfcore.adapters.family.Family`)."""

    name = "flux"
    label = "FLUX"
    class_names = ("FluxTransformer2DModel",)
    cond_keys = PooledTextConditions.cond_keys | {"guidance"}
    supported = {"patch_size": 1}  # FLUX.1's 2x2 latent packing
    missing_condition = TypeError  # like a missing keyword argument
    student_config_name = STUDENT_CONFIG_NAME
    student_format = _FORMAT
    summary_keys = tuple(sorted(TINY_FLUX_CONFIG))
    attention_class = FluxAttention
    model_class, vae_class, pipeline_class = FluxTransformer2DModel, AutoencoderKL, FluxPipeline
    time_embedding = "time_text_embed"

    def call_inputs(
        self,
        model: FluxTransformer2DModel,
        z: Tensor,
        cond: Mapping[str, Any],
        guidance: float,
        negative: bool,
        *,
        validate: bool = True,
    ) -> Call:
        if validate:
            self.check_latents(model, z)
        embeds = model.config.guidance_embeds
        g = guidance_input(embeds, cond.get("guidance"), guidance, z, self.label)
        call = self.text_call(model, z, cond, negative, validate=validate)
        neg = None if call.negative is None else {**call.negative, "guidance": g}
        return Call({**call.inputs, "guidance": g}, neg)

    def velocity(
        self, model: FluxTransformer2DModel, z: Tensor, t: Tensor, inputs: dict[str, Any]
    ) -> Tensor:
        return _flux_velocity(model, z, t, **inputs)

    def lora_targets(self, model: nn.Module) -> tuple[str, ...]:
        return FLUX_LORA_TARGETS

    def save_lora(self, directory: str, model: nn.Module, adapter_name: str) -> None:
        save_lora(directory, model, loader_cls=FluxPipeline, adapter_name=adapter_name)

    def load_lora(self, directory: str, model: nn.Module, adapter_name: str) -> None:
        load_lora(directory, model, adapter_name=adapter_name, prefix="transformer")

    def latent_channels(self, model: FluxTransformer2DModel) -> int:
        return model.config.in_channels // 4

    def sampling_shift(
        self, height: int, width: int, scheduler: Mapping[str, Any] | None
    ) -> dict[str, float]:
        return {"mu": flux_mu(height * width // 4, scheduler)}

    # ----------------------------------------------------------------------- entry point

    latent_multiple = 2  # latents are packed in 2x2 patches: even heights and widths
    tiny_dims = {"channels": 1, "joint_attention_dim": 32, "pooled_projection_dim": 32}

    def tiny_model(self, seed: int, dtype: torch.dtype, guidance: bool) -> nn.Module:
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**dict(TINY_FLUX_CONFIG, guidance_embeds=guidance)).to(dtype)

    def encode_prompts(self, pipe: FluxPipeline, prompts: list[str], tag: str) -> dict[str, Tensor]:
        """The pipeline's own prompt encoding: T5 embeddings and CLIP's pooled embedding."""
        pe, pooled, _ = pipe.encode_prompt(
            prompts, None, device=pipe.text_encoder.device, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        return {f"{tag}prompt_embeds": pe, f"{tag}pooled_prompt_embeds": pooled}

    def prompt_too_long(self, pipe: FluxPipeline, prompt: str) -> str | None:
        """Why T5 would truncate ``prompt`` (the pipeline cuts silently), or None."""
        n = len(pipe.tokenizer_2(prompt).input_ids)
        if n > MAX_SEQUENCE_LENGTH:
            return f"{n} T5 tokens, the encoder takes {MAX_SEQUENCE_LENGTH}"
        return None

    vae_factor = 8


#: T5 tokens FLUX.1-dev's pipeline encodes (``max_sequence_length``).
MAX_SEQUENCE_LENGTH = 512


FAMILY = FluxFamily()


# --------------------------------------------------------------------------- teacher and student


class FluxTeacher(Teacher):
    """FLUX's velocity as a :class:`mfcore.fields.VelocityField` ``v(z, t, **cond)``.

    The teacher is frozen: it runs under ``torch.no_grad()`` with every LoRA update of the
    transformer switched off, so it can share the transformer of a :class:`FluxStudent`.
    Its condition: ``prompt_embeds`` (T5, ``(B, L, joint_attention_dim)``),
    ``pooled_prompt_embeds`` (CLIP, ``(B, pooled_projection_dim)``), ``guidance`` (float or
    ``(B,)``, guidance-distilled checkpoints only, default ``guidance_scale``) and, for
    ``true_cfg_scale > 1``, ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds``.

    Args:
        transformer: a diffusers ``FluxTransformer2DModel``.
        guidance_scale: default guidance input of a guidance-distilled checkpoint
            (``guidance_embeds=True``; FLUX.1-dev's pipeline default is 3.5). Ignored otherwise.
        true_cfg_scale: scale ``s`` of two-pass classifier-free guidance
            ``v = v_neg + s (v_pos - v_neg)``; 1 disables it (one pass, negatives unused).
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        *,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
    ) -> None:
        super().__init__(
            transformer, FAMILY, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale
        )


class FluxStudent(MeanFlowStudent):
    """A FLUX transformer as a MeanFlow student ``u(z, r, t, **cond)`` (arXiv 2505.13447).

    The adapter core's :class:`~mfcore.adapters.student.MeanFlowStudent` with FLUX's
    conventions: LoRA on :data:`FLUX_LORA_TARGETS` and the interval embedding added to
    FLUX's time embedding ``temb(t) + temb_guidance + temb_text`` by a hook on
    ``time_text_embed``. Both start at zero, so ``u(z, r, t) = v_teacher(z, t)`` for every
    ``r`` at initialisation; :meth:`teacher` returns the teacher on the same weights. The
    condition is the teacher's (:class:`FluxTeacher`); negatives are accepted and ignored.

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` (modified in place).
        lora: LoRA rank and target modules.
        guidance_scale: guidance input of a guidance-distilled checkpoint (the student
            distils the teacher at this scale).
        adapter_name: peft's name for the adapter.
        attention: ``"auto"``, ``"math"`` or ``"mfcore"`` (:mod:`mfcore.adapters.routing`).
    """

    default_family = FAMILY
