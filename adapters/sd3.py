"""Stable Diffusion 3 and 3.5 on the adapter core (diffusers' ``SD3Transformer2DModel``).

Its conventions, converted here and nowhere else (checked on diffusers 0.42.1 against
``StableDiffusion3Pipeline``):

- time: the transformer takes ``timestep = sigma * 1000`` and embeds it as it is;
- velocity: the scheduler's step is ``z + (sigma_next - sigma) * out``, so the output is
  ``eps - x``, mfcore's ``v`` (no sign flip);
- latents ``(B, 16, H/8, W/8)``, patchified inside the model (2x2: even sizes);
- condition: ``prompt_embeds (B, 77 + 256, 4096)`` (two CLIPs padded, then T5) and
  ``pooled_prompt_embeds (B, 2048)`` (:class:`~mfcore.adapters.conditions.PooledTextConditions`);
  no guidance embedding: the teacher takes two-pass CFG (``true_cfg_scale``, the
  pipeline's ``guidance_scale``, 7 for SD3 medium) with negative prompts;
- ``t`` enters once, through ``time_text_embed`` (``time_proj`` + ``timestep_embedder``,
  plus the pooled text), whose output every block and ``norm_out`` read: the interval
  embedding is added there;
- schedule: a constant shift from the scheduler config (3 for SD3 and 3.5);
- LoRA: the joint attention's projections (diffusers' SD3 DreamBooth script's default),
  saved in the format ``StableDiffusion3Pipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from mfcore.adapters.conditions import PooledTextConditions
from mfcore.adapters.family import FamilyBase
from mfcore.adapters.lora import load_lora, save_lora
from mfcore.adapters.prepare import PipelinePrompts
from mfcore.adapters.student import MeanFlowStudent

__all__ = ["FAMILY", "SD3Family", "SD3Student", "TINY_SD3_CONFIG", "MAX_SEQUENCE_LENGTH"]

#: A random SD3 with one block (about 12K parameters), for tests and ``--tiny`` runs.
TINY_SD3_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 8,
    "pos_embed_max_size": 16,
}
#: T5 tokens the pipeline encodes (its ``max_sequence_length`` default).
MAX_SEQUENCE_LENGTH = 256


class SD3Family(PipelinePrompts, PooledTextConditions, FamilyBase):
    """Stable Diffusion 3's conventions for the adapter core (see the module docstring)."""

    name, label, class_names = "sd3", "Stable Diffusion 3", ("SD3Transformer2DModel",)
    student_config_name = "mfcore_sd3_student.json"
    student_format = "mfcore.adapters.sd3.SD3Student"
    model_class, vae_class = SD3Transformer2DModel, AutoencoderKL
    pipeline_class = StableDiffusion3Pipeline
    tiny_config, summary_keys = TINY_SD3_CONFIG, tuple(sorted(TINY_SD3_CONFIG))
    time_embedding, attention_class = "time_text_embed", Attention
    shift_key, default_shift = "shift", 3.0
    latent_multiple, vae_factor = 2, 8
    tiny_dims = {"channels": 4, "joint_attention_dim": 16, "pooled_projection_dim": 8}

    def velocity(self, model: nn.Module, z: Tensor, t: Tensor, inputs: dict[str, Any]) -> Tensor:
        dtype = model.dtype
        out = model(
            hidden_states=z.to(dtype),
            encoder_hidden_states=inputs["prompt_embeds"].to(dtype),
            pooled_projections=inputs["pooled"].to(dtype),
            timestep=(t * 1000).to(dtype),
            return_dict=False,
        )[0]
        return out.to(z.dtype)

    def lora_targets(self, model: nn.Module) -> tuple[str, ...]:
        names = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
        return tuple(f"attn.{n}" for n in (*names, "to_add_out"))

    def save_lora(self, directory: str, model: nn.Module, adapter_name: str) -> None:
        save_lora(directory, model, loader_cls=StableDiffusion3Pipeline, adapter_name=adapter_name)

    def load_lora(self, directory: str, model: nn.Module, adapter_name: str) -> None:
        load_lora(directory, model, adapter_name=adapter_name, prefix="transformer")

    def encode_prompts(
        self, pipe: StableDiffusion3Pipeline, prompts: list[str], tag: str
    ) -> dict[str, Tensor]:
        """The pipeline's own encoding (two CLIPs and T5; one pass, no negatives)."""
        pe, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device=pipe.text_encoder.device,
            do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # fmt: skip
        return {f"{tag}prompt_embeds": pe, f"{tag}pooled_prompt_embeds": pooled}

    def prompt_too_long(self, pipe: StableDiffusion3Pipeline, prompt: str) -> str | None:
        """Why T5 would truncate ``prompt`` (the pipeline cuts silently), or None."""
        if pipe.tokenizer_3 is None:
            return None
        n = len(pipe.tokenizer_3(prompt).input_ids)
        too_many = n > MAX_SEQUENCE_LENGTH
        return f"{n} T5 tokens, the pipeline keeps {MAX_SEQUENCE_LENGTH}" if too_many else None


FAMILY = SD3Family()


class SD3Student(MeanFlowStudent):
    """An SD3 transformer as a MeanFlow student ``u(z, r, t, **cond)``; arguments as
    :class:`~mfcore.adapters.student.MeanFlowStudent`'s."""

    default_family = FAMILY
