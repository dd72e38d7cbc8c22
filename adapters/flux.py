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
from mfcore.adapters.family import Call, FamilyBase, Synthetic, guidance_input
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
    "check_flux_transformer",
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
    return guidance_input(tr.config.guidance_embeds, guidance, default_guidance, z, "FLUX")


def _flux_velocity(
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


def _required(cond: Mapping[str, Any], *names: str) -> list[Any]:
    missing = [n for n in names if cond.get(n) is None]
    if missing:
        raise TypeError(f"a FLUX call needs {', '.join(missing)}")
    return [cond[n] for n in names]


# --------------------------------------------------------------------------- the family


class FluxFamily(PipelinePrompts, FamilyBase):
    """FLUX.1's conventions for the adapter core (:class:`mfcore.adapters.family.Family`)."""

    name = "flux"
    label = "FLUX"
    class_names = ("FluxTransformer2DModel",)
    cond_keys = frozenset(
        {
            "prompt_embeds",
            "pooled_prompt_embeds",
            "guidance",
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
        }
    )
    student_config_name = STUDENT_CONFIG_NAME
    student_format = _FORMAT
    summary_keys = tuple(sorted(TINY_FLUX_CONFIG))
    attention_class = FluxAttention
    model_class, vae_class, pipeline_class = FluxTransformer2DModel, AutoencoderKL, FluxPipeline
    time_embedding = "time_text_embed"

    def check_model(self, model: object) -> FluxTransformer2DModel:
        return check_flux_transformer(model)

    def check_call(
        self,
        model: FluxTransformer2DModel,
        z: Tensor,
        cond: Mapping[str, Any],
        guidance: float,
        negative: bool,
    ) -> Call:
        pe, pooled = _required(cond, "prompt_embeds", "pooled_prompt_embeds")
        g = _checked_call(model, z, pe, pooled, cond.get("guidance"), guidance)
        inputs = {"prompt_embeds": pe, "pooled": pooled, "guidance": g}
        if not negative:
            return Call(inputs)
        neg, neg_pooled = (
            cond.get("negative_prompt_embeds"),
            cond.get("negative_pooled_prompt_embeds"),
        )
        if neg is None or neg_pooled is None:
            raise ValueError(
                "true_cfg_scale > 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds"
            )
        _check_prompt(model, z, neg, neg_pooled, "negative_")
        return Call(inputs, {"prompt_embeds": neg, "pooled": neg_pooled, "guidance": g})

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
    data_keys = ("prompt_embeds", "pooled_prompt_embeds")
    optional_keys = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
    negative_key = "negative_prompt_embeds"
    tiny_dims = {"channels": 1, "joint_attention_dim": 32, "pooled_projection_dim": 32}

    def check_data(self, shapes: Mapping[str, tuple[int, ...]], model: nn.Module) -> None:
        cfg = model.config
        c, h, w = shapes["latents"]
        if 4 * c != cfg.in_channels:
            raise ValueError(
                f"latents have {c} channels; this FLUX takes {cfg.in_channels // 4} "
                f"({cfg.in_channels} packed)"
            )
        if h % 2 or w % 2:
            raise ValueError(f"latents need an even height and width, got {h}x{w}")
        pe = shapes["prompt_embeds"]
        if len(pe) != 2 or pe[1] != cfg.joint_attention_dim:
            raise ValueError(
                f"prompt_embeds must be (N, L, {cfg.joint_attention_dim}), got (N, *{pe})"
            )
        if shapes["pooled_prompt_embeds"] != (cfg.pooled_projection_dim,):
            raise ValueError(
                f"pooled_prompt_embeds must be (N, {cfg.pooled_projection_dim}), "
                f"got (N, *{shapes['pooled_prompt_embeds']})"
            )

    def synthetic_sample(self, request: Synthetic) -> dict[str, Tensor]:
        r, g = request, request.generator
        n, jd, pd = r.n, r.dims["joint_attention_dim"], r.dims["pooled_projection_dim"]
        data = {
            "latents": torch.randn(n, r.dims["channels"], r.height, r.width, generator=g),
            "prompt_embeds": torch.randn(n, r.seq_len, jd, generator=g),
            "pooled_prompt_embeds": torch.randn(n, pd, generator=g),
        }
        if r.negatives:
            data["negative_prompt_embeds"] = torch.randn(n, r.seq_len, jd, generator=g)
            data["negative_pooled_prompt_embeds"] = torch.randn(n, pd, generator=g)
        return data

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
