"""Few-step generation with any family's student, over :func:`mfcore.solvers.sample_meanflow`.

``z_r = z_t - (t - r) u(z_t, r, t)`` along the family's sampling grid from 1 to 0 (MeanFlow,
arXiv 2505.13447, eq. 12), starting from seeded Gaussian noise drawn on the CPU (so a seed
gives the same latents on any device), then decoded with the family's own VAE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from mfcore._checks import check_positive_int, check_tensor
from mfcore.adapters.family import Family
from mfcore.solvers import sample_meanflow

__all__ = ["FamilyField", "seeded_noise", "batch_size_of", "generate_latents", "decode_latents"]


class FamilyField(Protocol):
    """An average-velocity field ``u(z, r, t, **cond)`` on a family's transformer (a
    student, or a checkpoint that is itself a MeanFlow model)."""

    family: Family
    transformer: nn.Module

    def __call__(self, z: Tensor, r: Tensor, t: Tensor, **cond: Any) -> Tensor: ...


def seeded_noise(shape: tuple[int, ...], seed: int, device: Any, dtype: torch.dtype) -> Tensor:
    """Gaussian noise from a CPU generator, so a seed gives the same latents on any device."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def batch_size_of(cond: Mapping[str, Any]) -> tuple[int, torch.device]:
    """The batch size and device of a condition (its first tensor's)."""
    for value in cond.values():
        if isinstance(value, Tensor) and value.ndim >= 1:
            return value.shape[0], value.device
    raise ValueError("cond holds no batched tensor: cannot tell the batch size")


def generate_latents(
    field: FamilyField,
    cond: Mapping[str, Any],
    *,
    height: int,
    width: int,
    steps: int = 1,
    seed: int = 0,
    grid: Tensor | None = None,
    scheduler: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Few-step MeanFlow generation from seeded noise ``(B, C, height, width)``.

    Args:
        field: the student (or a native MeanFlow checkpoint's field).
        cond: its conditioning (the batch size is read from it).
        height: latent height ``H``.
        width: latent width ``W``.
        steps: number of steps (1, 2, 4, ...).
        seed: seed of the initial noise (drawn on the CPU).
        grid: times ``(steps + 1,)`` from 1 to 0; default the family's sampling grid.
        scheduler: the checkpoint's scheduler config (the family's grid reads its shift).
        dtype: dtype of the latents.

    Returns:
        latents ``(B, C, H, W)`` at ``t = 0``, normalised as the VAE's training latents.
    """
    steps = check_positive_int("steps", steps)
    for name, n in (("height", height), ("width", width)):
        check_positive_int(name, n)
    batch, device = batch_size_of(cond)
    channels = field.family.latent_channels(field.transformer)
    noise = seeded_noise((batch, channels, height, width), seed, device, dtype)
    if grid is None:
        grid = field.family.sampling_grid(
            steps, height, width, scheduler=scheduler, device=noise.device, dtype=dtype
        )
    else:
        check_tensor("grid", grid, ndim_min=1)
    # a field that is sampled another way says so (an ArcFlow student: its mixture's
    # closed-form steps, mfcore.arcflow.sample_arcflow)
    sample = getattr(field, "sampler", sample_meanflow)
    return sample(field, noise, steps, grid=grid, cond=dict(cond))


def decode_latents(vae: nn.Module, latents: Tensor, *, output_type: str = "pil") -> Any:
    """Decode normalised latents ``(B, C, H, W)`` with a diffusers VAE into images.

    Undoes the normalisation ``(latent - shift_factor) * scaling_factor`` (no shift where
    the VAE has none) and post-processes with diffusers' ``VaeImageProcessor``, as the
    families' pipelines do.

    Args:
        vae: the pipeline's VAE (``config.latent_channels``, ``config.scaling_factor``).
        latents: ``(B, C, H, W)`` with ``C`` the VAE's latent channels.
        output_type: ``"pil"``, ``"np"`` or ``"pt"``.

    Returns:
        the images (a list of PIL images for ``"pil"``).
    """
    from diffusers.image_processor import VaeImageProcessor

    check_tensor("latents", latents)
    cfg = vae.config
    if latents.ndim != 4 or latents.shape[1] != cfg.latent_channels:
        raise ValueError(
            f"latents must be (B, {cfg.latent_channels}, H, W) for this VAE, "
            f"got {tuple(latents.shape)} (channels)"
        )
    shift = getattr(cfg, "shift_factor", None) or 0.0
    z = latents / cfg.scaling_factor + shift
    param = next(vae.parameters())
    with torch.no_grad():
        image = vae.decode(z.to(device=param.device, dtype=param.dtype), return_dict=False)[0]
    factor = vae_scale_factor(vae)
    return VaeImageProcessor(vae_scale_factor=factor).postprocess(image, output_type=output_type)


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent along each side (``spatial_compression_ratio`` where the VAE says,
    else ``2 ** (levels - 1)``)."""
    ratio = getattr(vae.config, "spatial_compression_ratio", None)
    return int(ratio) if ratio else 2 ** (len(vae.config.block_out_channels) - 1)
