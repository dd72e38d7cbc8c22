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

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.transformers.transformer_flux import FluxAttention
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from mfcore._checks import (
    check_choice,
    check_interval,
    check_positive_int,
    check_tensor,
    check_time,
)
from mfcore.adapters.lora import (
    LoraSpec,
    adapter_parameters,
    add_lora,
    load_lora,
    load_lora_state_dict,
    lora_active,
    lora_disabled,
    lora_state_dict,
    pinned_checkpointing,
    save_lora,
)
from mfcore.attention import use_jvp_attention
from mfcore.solvers import sample_meanflow
from mfcore.time import resolution_shift_mu, shifted_grid, uniform_grid

__all__ = [
    "SharedWeightsStudent",
    "FLUX_DEV_CONFIG",
    "TINY_FLUX_CONFIG",
    "STUDENT_CONFIG_NAME",
    "INTERVAL_WEIGHT_NAME",
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
    "text_ids",
    "flux_mu",
    "check_flux_transformer",
    "ATTENTION_MODES",
    "attention_mode_for",
    "IntervalEmbedding",
    "FluxTeacher",
    "FluxStudent",
    "sampling_grid",
    "generate_latents",
    "decode_latents",
    "generate_images",
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

STUDENT_CONFIG_NAME = "mfcore_flux_student.json"
INTERVAL_WEIGHT_NAME = "interval_embedding.safetensors"
_FORMAT = "mfcore.adapters.flux.FluxStudent"


# --------------------------------------------------------------------------- latents and ids


def _check_latents(
    name: str, z: object, transformer: FluxTransformer2DModel | None = None
) -> Tensor:
    check_tensor(name, z)
    assert isinstance(z, Tensor)
    if z.ndim != 4:
        raise ValueError(f"{name} must be VAE latents (B, C, H, W), got shape {tuple(z.shape)}")
    if z.shape[2] % 2 or z.shape[3] % 2:
        raise ValueError(
            f"{name} needs an even height and width for 2x2 packing, got {tuple(z.shape)}"
        )
    if transformer is not None and 4 * z.shape[1] != transformer.config.in_channels:
        raise ValueError(
            f"{name} has {z.shape[1]} channels but the transformer takes "
            f"{transformer.config.in_channels} (4 x C packed channels)"
        )
    return z


def pack_latents(latents: Tensor) -> Tensor:
    """Pack VAE latents into FLUX's 2x2 patch tokens (``FluxPipeline._pack_latents``).

    Args:
        latents: ``(B, C, H, W)`` with even ``H`` and ``W``.

    Returns:
        tokens ``(B, H W / 4, 4 C)``, row-major over the ``(H/2, W/2)`` patch grid.
    """
    b, c, h, w = _check_latents("latents", latents).shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` (``FluxPipeline._unpack_latents`` at latent resolution).

    Args:
        tokens: ``(B, height * width / 4, 4 C)``.
        height: latent height ``H`` (even).
        width: latent width ``W`` (even).

    Returns:
        latents ``(B, C, H, W)``.
    """
    check_tensor("tokens", tokens)
    if tokens.ndim != 3 or tokens.shape[2] % 4:
        raise ValueError(f"tokens must have shape (B, N, 4C), got {tuple(tokens.shape)}")
    for name, n in (("height", height), ("width", width)):
        if check_positive_int(name, n) % 2:
            raise ValueError(f"{name} must be even, got {n}")
    if tokens.shape[1] * 4 != height * width:
        raise ValueError(f"tokens hold {tokens.shape[1]} patches, not {height}x{width}/4")
    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def latent_image_ids(
    height: int, width: int, *, device: torch.device | str | None = None, dtype=torch.float32
) -> Tensor:
    """Position ids of the packed image tokens (``FluxPipeline._prepare_latent_image_ids``).

    Args:
        height: latent height ``H`` (even).
        width: latent width ``W`` (even).

    Returns:
        ids ``(H W / 4, 3)``: ``(0, row, column)`` of each 2x2 patch.
    """
    for name, n in (("height", height), ("width", width)):
        if check_positive_int(name, n) % 2:
            raise ValueError(f"{name} must be even, got {n}")
    return FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)


def text_ids(
    seq_len: int, *, device: torch.device | str | None = None, dtype=torch.float32
) -> Tensor:
    """Position ids of the text tokens: zeros ``(seq_len, 3)``, as the pipeline's."""
    return torch.zeros(check_positive_int("seq_len", seq_len), 3, device=device, dtype=dtype)


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


def check_flux_transformer(transformer: object) -> FluxTransformer2DModel:
    """Raise ``TypeError`` unless ``transformer`` is a diffusers ``FluxTransformer2DModel``."""
    if not isinstance(transformer, FluxTransformer2DModel):
        raise TypeError(
            "transformer must be a diffusers FluxTransformer2DModel, "
            f"got {type(transformer).__name__}"
        )
    if transformer.config.patch_size != 1:
        raise ValueError(
            f"only patch_size 1 (FLUX.1's 2x2 latent packing) is supported, "
            f"got {transformer.config.patch_size}"
        )
    return transformer


def _check_prompt(
    transformer: FluxTransformer2DModel,
    z: Tensor,
    prompt_embeds: object,
    pooled: object,
    tag: str = "",
) -> None:
    names = (f"{tag}prompt_embeds", f"{tag}pooled_prompt_embeds")
    check_tensor(names[0], prompt_embeds)
    check_tensor(names[1], pooled)
    assert isinstance(prompt_embeds, Tensor) and isinstance(pooled, Tensor)
    cfg = transformer.config
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[2] != cfg.joint_attention_dim:
        raise ValueError(
            f"{names[0]} must have shape (B, L, {cfg.joint_attention_dim}), "
            f"got {tuple(prompt_embeds.shape)}"
        )
    if pooled.ndim != 2 or pooled.shape[1] != cfg.pooled_projection_dim:
        raise ValueError(
            f"{names[1]} must have shape (B, {cfg.pooled_projection_dim}), "
            f"got {tuple(pooled.shape)}"
        )
    for name, x in zip(names, (prompt_embeds, pooled), strict=True):
        if x.shape[0] != z.shape[0]:
            raise ValueError(f"{name} has batch {x.shape[0]} but z has batch {z.shape[0]}")
        if x.device != z.device:
            raise ValueError(f"{name} is on {x.device} but z is on {z.device}")


def _guidance_tensor(
    transformer: FluxTransformer2DModel, guidance: float | Tensor | None, z: Tensor
) -> Tensor | None:
    """The guidance input of a guidance-distilled FLUX, ``(B,)`` float32 (as the pipeline)."""
    if not transformer.config.guidance_embeds:
        if guidance is not None:
            raise ValueError(
                "guidance was given but this FLUX checkpoint has no guidance embedding "
                "(guidance_embeds=False); use true_cfg_scale with negative prompts instead"
            )
        return None
    if guidance is None:
        raise ValueError("this FLUX checkpoint is guidance-distilled: a guidance scale is required")
    if isinstance(guidance, Tensor):
        if guidance.shape != (z.shape[0],):
            raise ValueError(
                f"guidance must be a float or have shape ({z.shape[0]},), "
                f"got {tuple(guidance.shape)}"
            )
        return guidance.to(device=z.device, dtype=torch.float32)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"guidance must be a float or a tensor, got {type(guidance).__name__}")
    return torch.full((z.shape[0],), float(guidance), device=z.device, dtype=torch.float32)


def _checked_call(
    tr: FluxTransformer2DModel,
    z: Tensor,
    prompt_embeds: Tensor,
    pooled: Tensor,
    guidance: float | Tensor | None,
    default_guidance: float,
) -> Tensor | None:
    """Check one call's latents and prompt (times are the caller's); return the guidance
    tensor ``(B,)`` (``default_guidance`` for guidance-distilled checkpoints), or None."""
    _check_latents("z", z, tr)
    _check_prompt(tr, z, prompt_embeds, pooled)
    if guidance is None and tr.config.guidance_embeds:
        guidance = default_guidance
    return _guidance_tensor(tr, guidance, z)


def _transformer_velocity(
    transformer: FluxTransformer2DModel,
    z: Tensor,
    t: Tensor,
    prompt_embeds: Tensor,
    pooled: Tensor,
    guidance: Tensor | None,
) -> Tensor:
    """One call of the transformer on unpacked latents; output in ``z``'s dtype."""
    _, _, h, w = z.shape
    dtype = transformer.dtype
    with pinned_checkpointing(transformer):  # recomputed blocks keep this call's adapters
        out = transformer(
            hidden_states=pack_latents(z.to(dtype)),
            encoder_hidden_states=prompt_embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=t,
            img_ids=latent_image_ids(h, w, device=z.device, dtype=dtype),
            txt_ids=text_ids(prompt_embeds.shape[1], device=z.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
    return unpack_latents(out, h, w).to(z.dtype)


# --------------------------------------------------------------------------- teacher


class FluxTeacher:
    """FLUX's velocity as a :class:`mfcore.fields.VelocityField` ``v(z, t, **cond)``.

    The teacher is frozen: it runs under ``torch.no_grad()`` with every LoRA update of the
    transformer switched off, so it can share the transformer of a :class:`FluxStudent`.

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
        self.transformer = check_flux_transformer(transformer)
        if not true_cfg_scale >= 1.0:
            raise ValueError(f"true_cfg_scale must be >= 1, got {true_cfg_scale!r}")
        self.guidance_scale = float(guidance_scale)
        self.true_cfg_scale = float(true_cfg_scale)

    def __call__(
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
        """Velocity ``v(z, t) = eps - x`` of the (guided) teacher.

        Args:
            z: latents ``(B, C, H, W)`` at time ``t`` (``4 C`` = the transformer's in_channels).
            t: times ``(B,)`` in ``[0, 1]``; ``t = 1`` is noise.
            prompt_embeds: T5 embeddings ``(B, L, joint_attention_dim)``.
            pooled_prompt_embeds: CLIP pooled embeddings ``(B, pooled_projection_dim)``.
            guidance: guidance input of a guidance-distilled checkpoint (float or ``(B,)``);
                defaults to ``guidance_scale``; must be None for other checkpoints.
            negative_prompt_embeds: ``(B, L', joint_attention_dim)``, needed when
                ``true_cfg_scale > 1``.
            negative_pooled_prompt_embeds: ``(B, pooled_projection_dim)``, likewise.

        Returns:
            velocity ``(B, C, H, W)`` in ``z``'s dtype.
        """
        tr = self.transformer
        g = _checked_call(tr, z, prompt_embeds, pooled_prompt_embeds, guidance, self.guidance_scale)
        check_time("t", t, z)
        cfg = self.true_cfg_scale != 1.0
        if cfg:
            if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
                raise ValueError(
                    "true_cfg_scale > 1 needs negative_prompt_embeds and "
                    "negative_pooled_prompt_embeds"
                )
            _check_prompt(tr, z, negative_prompt_embeds, negative_pooled_prompt_embeds, "negative_")
        with torch.no_grad(), lora_disabled(tr):
            v = _transformer_velocity(tr, z, t, prompt_embeds, pooled_prompt_embeds, g)
            if cfg:
                v_neg = _transformer_velocity(
                    tr, z, t, negative_prompt_embeds, negative_pooled_prompt_embeds, g
                )
                v = v_neg + self.true_cfg_scale * (v - v_neg)
        return v


# --------------------------------------------------------------------------- attention

#: How the student's attention runs (see :class:`FluxStudent`).
ATTENTION_MODES = ("auto", "math", "mfcore")

# Which attention each backend of mfcore.jvp.total_derivative needs: forward-mode AD needs a
# tangent rule (mfcore.attention; "auto" switches to it when tangents are present), the
# double-backward trick needs attention whose backward is itself differentiable (torch's math
# SDPA; neither the fused kernels nor mfcore.attention's backward are), and the finite
# difference needs neither.
_ATTENTION_FOR_JVP = {"func": "auto", "autograd": "math", "fd": "auto"}


def attention_mode_for(jvp_method: str) -> str:
    """The :class:`FluxStudent` attention mode that the JVP backend ``jvp_method`` needs."""
    return _ATTENTION_FOR_JVP[check_choice("jvp_method", jvp_method, _ATTENTION_FOR_JVP)]


def _has_tangent(*xs: Tensor) -> bool:
    """Whether an input carries a forward-mode tangent (in ``torch.func.jvp`` or a dual level)."""
    return any(fwAD.unpack_dual(x).tangent is not None for x in xs)


def _attention_context(mode: str, x: Tensor) -> contextlib.AbstractContextManager:
    """The attention for one call, from the mode, the tangent of ``x`` and the grad mode.

    The choice depends only on state that is the same when gradient checkpointing
    recomputes a block during backward (grad enabled, no tangents), so the recomputation
    runs the same attention as the forward it replaces.
    """
    if mode == "math" and (_has_tangent(x) or torch.is_grad_enabled()):
        return sdpa_kernel(SDPBackend.MATH)
    if _has_tangent(x) or (mode == "mfcore" and torch.is_grad_enabled()):
        return use_jvp_attention()
    return contextlib.nullcontext()


class _AttentionRouting:
    """The mode shared by a student and the processors it wraps."""

    def __init__(self, mode: str) -> None:
        self.mode = mode


class _RoutedAttnProcessor:
    """Wraps a FLUX attention processor, running it inside the routing's attention context.

    Its ``__call__`` has the signature of diffusers' ``FluxAttnProcessor`` (which
    ``FluxAttention.forward`` inspects to filter keyword arguments).
    """

    def __init__(self, inner: Any, routing: _AttentionRouting) -> None:
        self.inner = inner
        self.routing = routing

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Tensor | None = None,
    ) -> Any:
        with _attention_context(self.routing.mode, hidden_states):
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )


def _route_attention(transformer: FluxTransformer2DModel, routing: _AttentionRouting) -> None:
    for module in transformer.modules():
        if isinstance(module, FluxAttention) and not isinstance(
            module.processor, _RoutedAttnProcessor
        ):
            module.processor = _RoutedAttnProcessor(module.processor, routing)


@contextlib.contextmanager
def _checkpointing_off(transformer: FluxTransformer2DModel, off: bool) -> Iterator[None]:
    """Switch gradient checkpointing off inside the block when ``off`` (restored after)."""
    saved = transformer.gradient_checkpointing
    if off and saved:
        logger.debug("gradient checkpointing is off while a JVP with a graph is taken")
        transformer.gradient_checkpointing = False
    try:
        yield
    finally:
        transformer.gradient_checkpointing = saved


# --------------------------------------------------------------------------- student

_HALF = (torch.float16, torch.bfloat16)


class IntervalEmbedding(nn.Module):
    """Embedding of the interval ``d = t - r`` added to FLUX's time embedding.

    ``e(d) = M(phi(1000 d)) - M(phi(0))``, with ``phi`` FLUX's sinusoidal time projection and
    ``M`` a diffusers ``TimestepEmbedding`` MLP whose last layer starts at zero. So ``e = 0``
    before training (the student is the teacher for every ``r``) and ``e(0) = 0`` always: at
    ``r = t`` the student is the LoRA model alone, which stock diffusers can load.

    Args:
        time_proj: FLUX's ``Timesteps`` module (its settings are reused, not its object).
        timestep_embedder: FLUX's ``TimestepEmbedding``; its first layer initialises ``M``'s.
    """

    def __init__(self, time_proj: Timesteps, timestep_embedder: TimestepEmbedding) -> None:
        super().__init__()
        self.time_proj = Timesteps(
            num_channels=time_proj.num_channels,
            flip_sin_to_cos=time_proj.flip_sin_to_cos,
            downscale_freq_shift=time_proj.downscale_freq_shift,
            scale=time_proj.scale,
        )
        lin1 = timestep_embedder.linear_1
        self.mlp = TimestepEmbedding(
            in_channels=lin1.in_features, time_embed_dim=timestep_embedder.linear_2.out_features
        ).to(device=lin1.weight.device, dtype=lin1.weight.dtype)
        with torch.no_grad():
            self.mlp.linear_1.weight.copy_(lin1.weight)
            self.mlp.linear_1.bias.copy_(lin1.bias)
            self.mlp.linear_2.weight.zero_()
            self.mlp.linear_2.bias.zero_()

    def forward(self, delta: Tensor) -> Tensor:
        """Embed intervals ``delta`` ``(B,)`` in ``[0, 1]`` into ``(B, inner_dim)``."""
        d = torch.cat([delta, delta.new_zeros(1)]) * 1000
        h = self.mlp(self.time_proj(d).to(self.mlp.linear_1.weight.dtype))
        return h[:-1] - h[-1:]


class SharedWeightsStudent(nn.Module):
    """What every FLUX student shares: the transformer (with LoRA) and its teacher.

    The teacher is the same transformer with the student's additions switched off, so no
    second copy of the base weights exists. Subclasses set ``self.transformer`` and
    ``self.guidance_scale``.
    """

    transformer: FluxTransformer2DModel
    guidance_scale: float
    adapter_name: str

    def teacher(self, *, true_cfg_scale: float = 1.0) -> FluxTeacher:
        """The teacher on the same base weights (LoRA and the student's additions off)."""
        return FluxTeacher(
            self.transformer, guidance_scale=self.guidance_scale, true_cfg_scale=true_cfg_scale
        )

    def _train_in_fp32(self) -> None:
        """Keep the student's own trained weights in fp32 on a half-precision base, so small
        optimiser steps are not rounded away (the layers cast their inputs to them)."""
        foreign = self._foreign_lora()
        for p in self.parameters():
            if p.requires_grad and id(p) not in foreign and p.dtype in _HALF:
                p.data = p.data.float()

    def _foreign_lora(self) -> set[int]:
        """Ids of the LoRA weights of other adapters on the shared transformer (a critic's)."""
        others = set(getattr(self.transformer, "peft_config", {})) - {self.adapter_name}
        return {
            id(p) for name in others for p in adapter_parameters(self.transformer, name).values()
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's trained parameters: its LoRA weights and additions (``requires_grad``),
        not the weights of other adapters that share the transformer."""
        foreign = self._foreign_lora()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in foreign]

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (works on the meta device); other adapters
        on the shared transformer count in neither."""
        foreign = self._foreign_lora()
        params = [p for p in self.parameters() if id(p) not in foreign]
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class FluxStudent(SharedWeightsStudent):
    """A FLUX transformer as a MeanFlow student ``u(z, r, t, **cond)`` (arXiv 2505.13447).

    The transformer gets LoRA updates (:func:`mfcore.adapters.lora.add_lora`; its base
    weights are frozen) and an :class:`IntervalEmbedding` of ``t - r`` added to its time
    embedding ``temb(t) + temb_guidance + temb_text`` through a forward hook on
    ``time_text_embed``. Both start at zero, so ``u(z, r, t) = v_teacher(z, t)`` for every
    ``r`` at initialisation. :meth:`teacher` returns the teacher on the same weights.

    Attention: each FLUX attention processor is wrapped so that diffusers' native backend
    (which calls ``F.scaled_dot_product_attention``) runs, per call, as ``attention`` says.
    ``"auto"``: torch's SDPA (flash on a GPU), and :func:`mfcore.attention.use_jvp_attention`
    while a JVP is taken (the hidden states carry a forward-mode tangent, as inside
    ``mfcore.jvp.total_derivative(method="func")``). ``"math"``: torch's math SDPA whenever
    gradients or tangents are tracked (twice differentiable, which the ``"autograd"`` JVP
    backend needs). ``"mfcore"``: :mod:`mfcore.attention` whenever gradients or tangents are
    tracked. Without either (the teacher, sampling) attention is torch's SDPA. Pick the mode
    with :func:`attention_mode_for`. Gradient checkpointing is switched off for a call that
    takes a JVP with a graph (it cannot recompute forward-mode AD); a no-grad JVP followed
    by a separate forward keeps it (``DifferentialTarget(single_forward=False)``).

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` (modified in place).
        lora: LoRA rank and target modules.
        guidance_scale: guidance input of a guidance-distilled checkpoint (the student
            distils the teacher at this scale).
        adapter_name: peft's name for the adapter.
        attention: ``"auto"``, ``"math"`` or ``"mfcore"`` (see above).
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        *,
        lora: LoraSpec | None = None,
        guidance_scale: float = 3.5,
        adapter_name: str = "mfcore",
        attention: str = "auto",
    ) -> None:
        super().__init__()
        check_flux_transformer(transformer)
        self._routing = _AttentionRouting(check_choice("attention", attention, ATTENTION_MODES))
        _route_attention(transformer, self._routing)
        self.lora_spec = lora if lora is not None else LoraSpec()
        self.guidance_scale = float(guidance_scale)
        self.adapter_name = adapter_name
        self.transformer = transformer
        add_lora(transformer, self.lora_spec, adapter_name=adapter_name)
        embed = transformer.time_text_embed
        self.interval = IntervalEmbedding(embed.time_proj, embed.timestep_embedder)
        self._train_in_fp32()
        self._delta: Tensor | None = None
        self._hook = embed.register_forward_hook(self._add_interval)

    @property
    def attention(self) -> str:
        """How attention runs: ``"auto"``, ``"math"`` or ``"mfcore"``."""
        return self._routing.mode

    @attention.setter
    def attention(self, mode: str) -> None:
        self._routing.mode = check_choice("attention", mode, ATTENTION_MODES)

    def _add_interval(self, module: nn.Module, args: tuple, temb: Tensor) -> Tensor | None:
        if self._delta is None:
            return None
        return temb + self.interval(self._delta).to(temb.dtype)

    @contextlib.contextmanager
    def _interval_on(self, delta: Tensor) -> Iterator[None]:
        self._delta = delta
        try:
            yield
        finally:
            self._delta = None

    def forward(
        self,
        z: Tensor,
        r: Tensor,
        t: Tensor,
        *,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        guidance: float | Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
    ) -> Tensor:
        """Average velocity ``u(z_t, r, t)``; one step is ``z_r = z_t - (t - r) u``.

        Args:
            z: latents ``(B, C, H, W)`` at time ``t``.
            r: end times ``(B,)``, ``r <= t``.
            t: start times ``(B,)`` in ``[0, 1]``.
            prompt_embeds: ``(B, L, joint_attention_dim)``.
            pooled_prompt_embeds: ``(B, pooled_projection_dim)``.
            guidance: guidance input (guidance-distilled checkpoints only; defaults to
                ``guidance_scale``).
            negative_prompt_embeds: accepted and ignored: the student distils the guided
                teacher in one pass (so one ``cond`` dict serves teacher and student).
            negative_pooled_prompt_embeds: likewise ignored.

        Returns:
            ``u`` ``(B, C, H, W)`` in ``z``'s dtype.
        """
        tr = self.transformer
        g = _checked_call(tr, z, prompt_embeds, pooled_prompt_embeds, guidance, self.guidance_scale)
        check_interval(r, t, z)
        # checkpointing cannot recompute a forward-mode AD forward: off under a JVP with graph
        jvp_graph = torch.is_grad_enabled() and _has_tangent(z, t)
        with (
            self._interval_on(t - r),
            _checkpointing_off(tr, jvp_graph),
            lora_active(tr, self.adapter_name),
        ):
            return _transformer_velocity(tr, z, t, prompt_embeds, pooled_prompt_embeds, g)

    # ----------------------------------------------------------------------- trainable state

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Every trained tensor, keyed ``lora.<module>...`` and ``interval.<name>``, detached."""
        state = {
            f"lora.{k}": v
            for k, v in lora_state_dict(self.transformer, adapter_name=self.adapter_name).items()
        }
        state.update({f"interval.{k}": v.detach() for k, v in self.interval.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a :meth:`trainable_state_dict`; every key must match (``ValueError`` otherwise)."""
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        interval = {k[9:]: v for k, v in state.items() if k.startswith("interval.")}
        other = [k for k in state if not k.startswith(("lora.", "interval."))]
        if other:
            raise ValueError(f"unexpected keys in the student state: {other[:3]}")
        load_lora_state_dict(self.transformer, lora, adapter_name=self.adapter_name)
        missing, unexpected = self.interval.load_state_dict(interval, strict=False)
        if missing or unexpected:
            raise ValueError(f"interval state mismatch: missing {missing}, unexpected {unexpected}")

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the trained state to ``directory`` as safetensors (no pickle).

        Files: ``pytorch_lora_weights.safetensors`` (diffusers' FLUX LoRA format, loadable by
        ``FluxPipeline.load_lora_weights``), ``interval_embedding.safetensors`` and
        ``mfcore_flux_student.json`` (LoRA spec, guidance scale, transformer config).
        """
        os.makedirs(directory, exist_ok=True)
        save_lora(
            directory, self.transformer, loader_cls=FluxPipeline, adapter_name=self.adapter_name
        )
        interval = {k: v.detach().contiguous() for k, v in self.interval.state_dict().items()}
        save_file(interval, os.path.join(directory, INTERVAL_WEIGHT_NAME))
        meta = {
            "format": _FORMAT,
            "version": 1,
            "lora": self.lora_spec.to_dict(),
            "guidance_scale": self.guidance_scale,
            "adapter_name": self.adapter_name,
            "transformer_config": _config_summary(self.transformer),
        }
        with open(os.path.join(directory, STUDENT_CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)

    def load_pretrained(self, directory: str | os.PathLike) -> None:
        """Load what :meth:`save_pretrained` wrote into this student (same LoRA spec and model)."""
        meta = _read_student_config(directory)
        if meta["transformer_config"] != _config_summary(self.transformer):
            raise ValueError(
                f"{directory} was saved for transformer {meta['transformer_config']}, "
                f"not this one {_config_summary(self.transformer)}"
            )
        if LoraSpec(**meta["lora"]) != self.lora_spec:
            raise ValueError(
                f"{directory} has LoRA {meta['lora']}, this student {self.lora_spec.to_dict()}"
            )
        load_lora(directory, self.transformer, adapter_name=self.adapter_name)
        state = load_file(os.path.join(directory, INTERVAL_WEIGHT_NAME))
        missing, unexpected = self.interval.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"interval state mismatch: missing {missing}, unexpected {unexpected}")

    @classmethod
    def from_pretrained(
        cls, transformer: FluxTransformer2DModel, directory: str | os.PathLike
    ) -> FluxStudent:
        """Build a student on ``transformer`` from a :meth:`save_pretrained` folder."""
        meta = _read_student_config(directory)
        student = cls(
            transformer,
            lora=LoraSpec(**meta["lora"]),
            guidance_scale=meta["guidance_scale"],
            adapter_name=meta["adapter_name"],
        )
        student.load_pretrained(directory)
        return student


def _config_summary(transformer: FluxTransformer2DModel) -> dict[str, Any]:
    cfg = transformer.config
    keys = sorted(TINY_FLUX_CONFIG)
    return {k: (list(cfg[k]) if isinstance(cfg[k], (tuple, list)) else cfg[k]) for k in keys}


def _read_student_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(directory, STUDENT_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no saved FLUX student at {directory} (missing {STUDENT_CONFIG_NAME})"
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a saved FLUX student (format {meta.get('format')!r})")
    return meta


# --------------------------------------------------------------------------- generation


def sampling_grid(
    steps: int, height: int, width: int, *, shift: bool = True, device=None, dtype=torch.float32
) -> Tensor:
    """Times ``(steps + 1,)`` from 1 to 0 for a ``height x width`` latent.

    With ``shift`` the uniform grid is shifted by FLUX's resolution-dependent ``mu``
    (:func:`flux_mu` of ``H W / 4`` tokens), as the FLUX pipeline's scheduler does.
    """
    steps = check_positive_int("steps", steps)
    if not shift:
        return uniform_grid(steps, device=device, dtype=dtype)
    mu = flux_mu(check_positive_int("height", height) * check_positive_int("width", width) // 4)
    return shifted_grid(steps, mu=mu, device=device, dtype=dtype)


def _noise(shape: tuple[int, ...], seed: int, device, dtype) -> Tensor:
    """Gaussian noise from a CPU generator, so a seed gives the same latents on any device."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def generate_latents(
    student: FluxStudent,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
    *,
    height: int,
    width: int,
    steps: int = 1,
    seed: int = 0,
    guidance: float | None = None,
    shift: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Few-step MeanFlow generation: ``z_r = z_t - (t - r) u(z_t, r, t)`` over a grid from 1 to 0.

    Args:
        student: the trained student.
        prompt_embeds: ``(B, L, joint_attention_dim)``.
        pooled_prompt_embeds: ``(B, pooled_projection_dim)``.
        height: latent height ``H`` (pixels / 8 for FLUX's VAE; even).
        width: latent width ``W`` (even).
        steps: number of student steps (1, 2, 4, ...).
        seed: seed of the initial noise (drawn on the CPU).
        guidance: guidance input (guidance-distilled checkpoints; default the student's).
        shift: shift the grid by FLUX's resolution-dependent ``mu`` (:func:`sampling_grid`).
        dtype: dtype of the latents.

    Returns:
        latents ``(B, C, H, W)`` at ``t = 0``, normalised as the VAE's training latents.
    """
    steps = check_positive_int("steps", steps)
    check_tensor("prompt_embeds", prompt_embeds, ndim_min=3)
    channels = student.transformer.config.in_channels // 4
    shape = (prompt_embeds.shape[0], channels, height, width)
    noise = _noise(shape, seed, prompt_embeds.device, dtype)
    grid = sampling_grid(steps, height, width, shift=shift, device=noise.device, dtype=dtype)
    cond: dict[str, Any] = {
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled_prompt_embeds,
    }
    if guidance is not None:
        cond["guidance"] = guidance
    return sample_meanflow(student, noise, steps, grid=grid, cond=cond)


def decode_latents(vae: nn.Module, latents: Tensor, *, output_type: str = "pil") -> list:
    """Decode normalised latents with a diffusers ``AutoencoderKL`` into images.

    Undoes the normalisation ``(latent - shift_factor) * scaling_factor`` and post-processes
    with diffusers' ``VaeImageProcessor`` (as ``FluxPipeline`` does).

    Args:
        vae: the pipeline's VAE.
        latents: ``(B, C, H, W)`` with ``C`` = the VAE's latent channels.
        output_type: ``"pil"``, ``"np"`` or ``"pt"``.

    Returns:
        the images (a list of PIL images for ``"pil"``).
    """
    _check_latents("latents", latents)
    cfg = vae.config
    if latents.shape[1] != cfg.latent_channels:
        raise ValueError(f"latents have {latents.shape[1]} channels, the VAE {cfg.latent_channels}")
    shift = cfg.shift_factor if cfg.shift_factor is not None else 0.0
    z = latents / cfg.scaling_factor + shift
    param = next(vae.parameters())
    with torch.no_grad():
        image = vae.decode(z.to(device=param.device, dtype=param.dtype), return_dict=False)[0]
    scale = 2 ** (len(cfg.block_out_channels) - 1)
    return VaeImageProcessor(vae_scale_factor=scale * 2).postprocess(image, output_type=output_type)


def generate_images(
    student: FluxStudent,
    vae: nn.Module,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
    *,
    height: int,
    width: int,
    steps: int = 1,
    seed: int = 0,
    guidance: float | None = None,
) -> list:
    """Pixels end to end: :func:`generate_latents` at ``height x width`` pixels, then the VAE.

    ``height`` and ``width`` are in pixels and must be multiples of twice the VAE's
    downsampling factor (16 for FLUX). Returns a list of PIL images.
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for name, n in (("height", height), ("width", width)):
        if check_positive_int(name, n) % (2 * factor):
            raise ValueError(f"{name} must be a multiple of {2 * factor} pixels, got {n}")
    latents = generate_latents(
        student,
        prompt_embeds,
        pooled_prompt_embeds,
        height=height // factor,
        width=width // factor,
        steps=steps,
        seed=seed,
        guidance=guidance,
    )
    return decode_latents(vae, latents)
