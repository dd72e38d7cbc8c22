"""HunyuanImage 2.1 on the adapter core (diffusers' ``HunyuanImageTransformer2DModel``).

Its conventions, converted here and nowhere else (checked on diffusers 0.42.1):

- time: the transformer takes ``timestep = sigma * 1000`` and does **not** rescale it
  (FLUX scales inside); ``sigma`` is mfcore's ``t``.
- velocity: the pipeline's Euler step is ``z + (sigma_next - sigma) * out``, so the output is
  ``eps - x``: mfcore's ``v``, no sign flip.
- latents: unpacked ``(B, 64, H/32, W/32)`` from a 32x VAE (patch size 1, no packing).
- conditioning: Qwen2.5-VL embeddings ``prompt_embeds (B, L, text_embed_dim)`` with a
  key-padding mask ``prompt_attention_mask (B, L)``; optional ByT5 glyph embeddings
  ``prompt_embeds_2 (B, L2, text_embed_2_dim)`` and ``prompt_attention_mask_2`` (the
  pipeline passes zeros and an all-zero mask when a prompt quotes no text).
- guidance: the distilled checkpoint (``guidance_embeds=True``) embeds ``scale * 1000``; the
  base checkpoint needs true two-pass CFG (``true_cfg_scale`` with ``negative_*`` inputs).
- ``use_meanflow`` checkpoints average the embeddings of t and r, ``(e(t) + e_r(r)) / 2``, so
  they are MeanFlow models already (Tencent's distilled student): :class:`HunyuanMeanFlow`
  runs one through mfcore's few-step sampler via its native ``timestep_r``. A base checkpoint
  is the teacher; its student gets mfcore's zero-initialised interval embedding, added to
  ``time_guidance_embed``'s output (which every block and ``norm_out`` read; the token
  refiner embeds ``timestep`` itself and is not reached), or, as
  :class:`HunyuanImage2NativeStudent`, the ``use_meanflow`` branch itself
  (:mod:`mfcore.adapters.native_meanflow`), which the stock pipeline runs.
- LoRA: ``to_q``/``to_k``/``to_v``/``to_out.0``/``ff.net.*`` also name modules of the token
  refiner and ``proj_out`` the final layer, so the targets are the dual- and single-stream
  blocks' layers by full name (:func:`lora_targets`).
- schedule: a constant shift (``FlowMatchEulerDiscreteScheduler.shift``, read from the
  checkpoint's scheduler config; 5 for the base model in Tencent's inference code).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanImage,
    HunyuanImagePipeline,
    HunyuanImageTransformer2DModel,
)
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from mfcore._checks import check_real, check_time
from mfcore.adapters._shapes import Shape
from mfcore.adapters.family import Call, FamilyBase, Synthetic, guidance_input
from mfcore.adapters.lora import lora_disabled
from mfcore.adapters.native_meanflow import NativeMeanFlowStudent
from mfcore.adapters.prepare import PipelinePrompts
from mfcore.adapters.student import MeanFlowStudent, check_cond_keys

__all__ = [
    "FAMILY",
    "HunyuanImage2Family",
    "HY21_BASE_CONFIG",
    "HY21_DISTILLED_CONFIG",
    "TINY_HY21_CONFIG",
    "DEFAULT_SHIFT",
    "lora_targets",
    "HunyuanImage2Student",
    "HunyuanImage2NativeStudent",
    "HunyuanMeanFlow",
]

#: ``HunyuanImageTransformer2DModel`` config of HunyuanImage-2.1 (17.43B parameters), from
#: diffusers' conversion script.
HY21_BASE_CONFIG: dict[str, Any] = {
    "in_channels": 64,
    "out_channels": 64,
    "num_attention_heads": 28,
    "attention_head_dim": 128,
    "num_layers": 20,
    "num_single_layers": 40,
    "num_refiner_layers": 2,
    "patch_size": (1, 1),
    "qk_norm": "rms_norm",
    "guidance_embeds": False,
    "text_embed_dim": 3584,
    "text_embed_2_dim": 1472,
    "rope_theta": 256.0,
    "rope_axes_dim": (64, 64),
}
#: The distilled checkpoint: guidance embedding and a native MeanFlow ``timestep_r``.
HY21_DISTILLED_CONFIG: dict[str, Any] = {
    **HY21_BASE_CONFIG,
    "guidance_embeds": True,
    "use_meanflow": True,
}
#: A random HunyuanImage 2.1 with one block of each kind and no ByT5 branch (about 0.1M
#: parameters; the ByT5 projection alone is 4.3M, its hidden width 2048 being fixed).
TINY_HY21_CONFIG: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "patch_size": (1, 1),
    "qk_norm": "rms_norm",
    "guidance_embeds": False,
    "text_embed_dim": 24,
    "text_embed_2_dim": None,
    "rope_theta": 256.0,
    "rope_axes_dim": (8, 8),
    "use_meanflow": False,
}
#: The sampling shift when the checkpoint has no scheduler config (Tencent's base model).
DEFAULT_SHIFT = 5.0

_DUAL = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
_DUAL += ("to_add_out",)
_DUAL_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def lora_targets(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Full names of the dual- and single-stream blocks' attention and MLP layers.

    Full names, because peft matches a name as a suffix: ``attn.to_q`` would also hit the
    token refiner and ``proj_out`` the final projection. ``transformer_blocks.0.attn.to_q``
    does not match ``single_transformer_blocks.0.attn.to_q`` (peft needs a ``.`` before it).
    """
    names = []
    for i in range(config["num_layers"]):
        names += [f"transformer_blocks.{i}.attn.{n}" for n in _DUAL]
        names += [f"transformer_blocks.{i}.{n}" for n in _DUAL_FF]
    for i in range(config["num_single_layers"]):
        names += [f"single_transformer_blocks.{i}.{n}" for n in _SINGLE]
    return tuple(names)


def _model_inputs(checked: dict[str, Tensor], guidance: Tensor | None) -> dict[str, Any]:
    """The transformer's keyword inputs from one prompt's checked conditions: a missing mask
    keeps every token; the ByT5 pair only where the model and the prompt have it."""
    out: dict[str, Any] = {"guidance": guidance}
    for i in ("", "_2"):
        pe = checked.get(f"prompt_embeds{i}")
        if pe is not None:
            mask = checked.get(f"prompt_attention_mask{i}")
            if mask is None:
                mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
            out[f"encoder_hidden_states{i}"], out[f"encoder_attention_mask{i}"] = pe, mask
    return out


def _check_masks(call: Call) -> None:
    """Raise unless every floating mask of ``call`` (the prompt's and the negative prompt's)
    holds only 0 and 1: one host sync for all of them."""
    floating = {
        tag + k: m
        for tag, checked in (("", call.inputs), ("negative_", call.negative or {}))
        for k, m in checked.items()
        if "mask" in k and m.is_floating_point()
    }
    binary = {k: (m == 0) | (m == 1) for k, m in floating.items()}
    if not binary or bool(torch.stack([b.all() for b in binary.values()]).all()):
        return
    key = next(k for k, b in binary.items() if not bool(b.all()))  # the error path
    odd = floating[key][~binary[key]][0].item()
    raise ValueError(
        f"{key} must hold only 0 and 1 (a key-padding mask: 1 keeps a token), got {odd!r}: a "
        "fractional mask would be read as 1"
    )


def _call(
    model: HunyuanImageTransformer2DModel, z: Tensor, t: Tensor, inputs: dict[str, Any]
) -> Tensor:
    """One transformer call in model units (times and guidance x 1000); ``z``'s dtype out.
    An ``"r"`` in ``inputs`` goes to a ``use_meanflow`` model's ``timestep_r``."""
    dtype = model.dtype
    kwargs = {k: (v.to(dtype) if k.startswith("encoder_hidden") else v) for k, v in inputs.items()}
    g = kwargs.pop("guidance", None)
    r = kwargs.pop("r", None)
    out = model(
        hidden_states=z.to(dtype),
        timestep=(t * 1000).to(dtype),
        timestep_r=None if r is None else (r * 1000).to(dtype),
        guidance=None if g is None else (g * 1000).to(dtype),
        return_dict=False,
        **kwargs,
    )[0]
    return out.to(z.dtype)


class HunyuanImage2Family(PipelinePrompts, FamilyBase):
    """HunyuanImage 2.1's conventions for the adapter core (see the module docstring).

    diffusers 0.42.1 has no HunyuanImage pipeline LoRA loader, so the LoRA is written in the
    model's own format (:class:`~mfcore.adapters.family.FamilyBase`), which a stock
    transformer's ``load_lora_adapter(folder, weight_name=..., prefix=None)`` reads.
    """

    name = "hunyuanimage2"
    label = "HunyuanImage 2.1"
    class_names = ("HunyuanImageTransformer2DModel",)
    conditions = {
        "prompt_embeds": Shape(("B", "L", "text_embed_dim")),
        "prompt_attention_mask": Shape(("B", "L"), "any", required=False),
        "prompt_embeds_2": Shape(("B", "L2", "text_embed_2_dim"), required=False),
        "prompt_attention_mask_2": Shape(("B", "L2"), "any", required=False),
    }
    cond_keys = frozenset({*conditions, *(f"negative_{k}" for k in conditions), "guidance"})
    supported = {"patch_size": (1, 1)}
    student_config_name = "mfcore_hunyuanimage2_student.json"
    student_format = "mfcore.adapters.hunyuanimage2.HunyuanImage2Student"
    shift_key, default_shift, attention_class = "shift", DEFAULT_SHIFT, Attention
    model_class, vae_class = HunyuanImageTransformer2DModel, AutoencoderKLHunyuanImage
    pipeline_class, time_embedding = HunyuanImagePipeline, "time_guidance_embed"
    summary_keys = tuple(sorted({*TINY_HY21_CONFIG, "mlp_ratio"}))

    def check_model(self, model: object) -> HunyuanImageTransformer2DModel:
        if isinstance(model, HunyuanImageTransformer2DModel) and len(model.config.patch_size) == 3:
            raise ValueError(  # the stage-2 refiner: 3-D patches of video latents
                "this is HunyuanImage 2.1's refiner (patch_size "
                f"{list(model.config.patch_size)}, {model.config.in_channels} input channels), "
                "which mfcore does not support: distil the base text-to-image checkpoint"
            )
        return super().check_model(model)

    def call_inputs(
        self,
        model: nn.Module,
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
        call = self.condition_call(model, z, cond, negative, validate=validate)
        if validate:
            _check_masks(call)
        neg = None if call.negative is None else _model_inputs(call.negative, g)
        return Call(_model_inputs(call.inputs, g), neg)

    def velocity(self, model: nn.Module, z: Tensor, t: Tensor, inputs: dict[str, Any]) -> Tensor:
        return _call(model, z, t, inputs)

    def lora_targets(self, model: nn.Module) -> tuple[str, ...]:
        return lora_targets(model.config)

    def native_student(self, transformer: nn.Module, **kwargs: Any) -> MeanFlowStudent:
        return HunyuanImage2NativeStudent(transformer, self, **kwargs)

    # ----------------------------------------------------------------------- entry point

    data_keys = ("prompt_embeds", "prompt_attention_mask")
    optional_keys = (
        "prompt_embeds_2",
        "prompt_attention_mask_2",
        *(f"negative_{k}" for k in conditions),
    )
    negative_key = "negative_prompt_embeds"
    tiny_dims = {"channels": 4, "text_embed_dim": 24}
    vae_factor = 32

    def synthetic_sample(self, request: Synthetic) -> dict[str, Tensor]:
        n, seq_len, dims, g = request.n, request.seq_len, request.dims, request.generator
        shape = (n, dims["channels"], request.height, request.width)
        data = {"latents": torch.randn(shape, generator=g)}
        for tag in ("", "negative_") if request.negatives else ("",):
            data[f"{tag}prompt_embeds"] = torch.randn(
                n, seq_len, dims["text_embed_dim"], generator=g
            )
            lengths = torch.randint(1, seq_len + 1, (n, 1), generator=g)
            data[f"{tag}prompt_attention_mask"] = (torch.arange(seq_len) < lengths).long()
        return data

    def tiny_model(self, seed: int, dtype: torch.dtype, guidance: bool) -> nn.Module:
        torch.manual_seed(seed)
        config = dict(TINY_HY21_CONFIG, guidance_embeds=guidance)
        return HunyuanImageTransformer2DModel(**config).to(dtype)

    def load_model(self, path: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
        model, scheduler = super().load_model(path, dtype)
        if model.config.use_meanflow:
            raise ValueError(
                f"{path} is a use_meanflow (distilled) HunyuanImage 2.1 checkpoint, a MeanFlow "
                "model already: distil from the base checkpoint (compare with this one "
                "through HunyuanMeanFlow)"
            )
        return model, scheduler

    def encode_prompts(
        self, pipe: HunyuanImagePipeline, prompts: list[str], tag: str
    ) -> dict[str, Tensor]:
        """The pipeline's own prompt encoding (Qwen2.5-VL template and ByT5 glyph text)."""
        pe, mask, pe2, mask2 = pipe.encode_prompt(
            prompts, device=pipe.text_encoder.device, batch_size=len(prompts)
        )
        return {
            f"{tag}prompt_embeds": pe,
            f"{tag}prompt_attention_mask": mask,
            f"{tag}prompt_embeds_2": pe2,
            f"{tag}prompt_attention_mask_2": mask2,
        }

    def prompt_too_long(self, pipe: HunyuanImagePipeline, prompt: str) -> str | None:
        """Why Qwen2.5-VL would truncate ``prompt`` (the pipeline cuts silently), or None."""
        ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids
        n = len(ids) - pipe.prompt_template_encode_start_idx
        if n > pipe.tokenizer_max_length:
            return f"{n} Qwen2.5-VL tokens, the encoder takes {pipe.tokenizer_max_length}"
        return None


FAMILY = HunyuanImage2Family()


class HunyuanImage2Student(MeanFlowStudent):
    """A base HunyuanImage 2.1 transformer as a MeanFlow student ``u(z, r, t, **cond)``.

    The core's :class:`~mfcore.adapters.student.MeanFlowStudent` with this family's
    conventions (module docstring); :meth:`teacher` is the base model (two-pass CFG through
    ``true_cfg_scale``). Build it on a base checkpoint: a ``use_meanflow`` checkpoint is
    already a MeanFlow model (:class:`HunyuanMeanFlow`).

    Args:
        transformer: a diffusers ``HunyuanImageTransformer2DModel`` (modified in place).
        lora: LoRA rank and targets (default targets: :func:`lora_targets`).
        guidance_scale: guidance input of a guidance-embedding checkpoint.
        adapter_name: peft's name for the adapter.
        attention: ``"auto"``, ``"math"`` or ``"mfcore"`` (:mod:`mfcore.adapters.routing`).
    """

    default_family = FAMILY


class HunyuanImage2NativeStudent(NativeMeanFlowStudent):
    """A base HunyuanImage 2.1 transformer as a student in diffusers' ``use_meanflow`` form
    (``r_embedding="native"``, :mod:`mfcore.adapters.native_meanflow`): the stock
    ``HunyuanImagePipeline`` runs what :meth:`save_stock` writes. Arguments as
    :class:`HunyuanImage2Student`'s."""

    default_family = FAMILY


class HunyuanMeanFlow(nn.Module):
    """A ``use_meanflow`` checkpoint (Tencent's distilled 2.1) as ``u(z, r, t, **cond)``.

    Its own ``timestep_r`` input makes it a MeanFlow model: the pipeline's step
    ``z + (sigma_next - sigma) * out`` with ``timestep_r = sigma_next`` is mfcore's
    ``z_r = z_t - (t - r) u``. So :func:`mfcore.adapters.generation.generate_latents` (and
    :func:`mfcore.solvers.sample_meanflow`) run it like an mfcore student, and the two can be
    compared against the same base teacher. Adapters, if any, are off during the call.

    Args:
        transformer: a ``HunyuanImageTransformer2DModel`` with ``use_meanflow=True``.
        guidance_scale: its distilled guidance scale (the pipeline's default is 3.25).
    """

    def __init__(self, transformer: HunyuanImageTransformer2DModel, *, guidance_scale=3.25):
        super().__init__()
        FAMILY.check_model(transformer)
        if not transformer.config.use_meanflow:
            raise ValueError("transformer is not a use_meanflow checkpoint (no timestep_r input)")
        self.transformer = transformer
        self.family = FAMILY
        self.guidance_scale = check_real("guidance_scale", guidance_scale)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Average velocity over ``[r, t]`` ``(B, C, H, W)``; ``r``, ``t`` ``(B,)``."""
        check_cond_keys(FAMILY, cond)
        call = FAMILY.call_inputs(self.transformer, z, cond, self.guidance_scale, False)
        check_time("r", r, z)
        check_time("t", t, z)
        with lora_disabled(self.transformer):
            return _call(self.transformer, z, t, {**call.inputs, "r": r})
