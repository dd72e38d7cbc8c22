"""scikit-learn's digits as FLUX latents: 16x16, one channel, in [-1, 1], with class conditions.

``load_digits`` ships 1,797 8x8 images (values 0..16, 10 classes) inside the scikit-learn
wheel, so nothing is downloaded. Each image is upsampled bilinearly to 16x16 (FLUX packs
2x2 latent patches into tokens, so 16x16 gives 8x8 = 64 tokens of 4 channels) and scaled to
[-1, 1]; that one-channel image is the "latent" (the VAE is the identity). :func:`to_digits`
undoes it (2x2 average pooling back to 8x8, values 0..16) for the metrics.

The class is a FLUX condition: a fixed random embedding per class, one text token in
``prompt_embeds`` ``(B, 1, D)`` and a vector in ``pooled_prompt_embeds`` ``(B, P)``; row
:data:`NULL_CLASS` is the unconditional embedding (label dropout while the teacher trains;
the negative prompt of two-pass CFG).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

__all__ = [
    "NUM_CLASSES",
    "NULL_CLASS",
    "SIZE",
    "Digits",
    "load_digits",
    "split",
    "to_digits",
    "class_embeddings",
    "conditions",
    "write_data",
]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
"""Index of the unconditional embedding in :func:`class_embeddings`."""
SIZE = 16
"""Latent side: 8x8 digits upsampled twice, 64 FLUX tokens."""


@dataclass(frozen=True)
class Digits:
    """Images ``x (N, 1, SIZE, SIZE)`` float32 in [-1, 1] and labels ``y (N,)`` int64."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)


def load_digits(size: int = SIZE) -> Digits:
    """All 1,797 digits, upsampled bilinearly from 8x8 to ``size`` x ``size`` in [-1, 1]."""
    from sklearn.datasets import load_digits as sk_load

    bunch = sk_load()
    x = torch.from_numpy(bunch.images.astype(np.float32))[:, None] / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return Digits(x.clamp(-1.0, 1.0), torch.from_numpy(bunch.target.astype(np.int64)))


def split(data: Digits, held_out: float = 0.5, seed: int = 0) -> tuple[Digits, Digits]:
    """A stratified split ``(train, held_out)``: each class loses ``held_out`` of its samples
    (rounded down) to the held-out part, chosen by ``seed``."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must lie in (0, 1), got {held_out!r}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(data.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(len(idx) * held_out)
        test.append(idx[:k])
        train.append(idx[k:])
    a, b = torch.cat(train).sort().values, torch.cat(test).sort().values
    return Digits(data.x[a], data.y[a]), Digits(data.x[b], data.y[b])


def to_digits(x: Tensor) -> np.ndarray:
    """Latents ``(N, 1, H, W)`` back to scikit-learn's digit features ``(N, 64)`` in [0, 16]:
    clipped to [-1, 1], average-pooled to 8x8."""
    x = x.detach().float().clamp(-1.0, 1.0)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return ((x + 1.0) * 8.0).reshape(len(x), -1).cpu().numpy().astype(np.float64)


def class_embeddings(text_dim: int, pooled_dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Fixed random class conditions: ``(NUM_CLASSES + 1, 1, text_dim)`` text tokens and
    ``(NUM_CLASSES + 1, pooled_dim)`` pooled vectors, unit-variance Gaussian; the last row
    (:data:`NULL_CLASS`) is the unconditional one."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(NUM_CLASSES + 1, 1, text_dim, generator=g)
    pooled = torch.randn(NUM_CLASSES + 1, pooled_dim, generator=g)
    return text, pooled


def conditions(labels: Tensor, table: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """The FLUX condition of ``labels (B,)``: ``prompt_embeds``, ``pooled_prompt_embeds`` and
    the unconditional ``negative_`` ones (for two-pass CFG)."""
    text, pooled = table
    null = torch.full_like(labels, NULL_CLASS)
    return {
        "prompt_embeds": text[labels],
        "pooled_prompt_embeds": pooled[labels],
        "negative_prompt_embeds": text[null],
        "negative_pooled_prompt_embeds": pooled[null],
    }


def write_data(
    folder: str | os.PathLike, data: Digits, table: tuple[Tensor, Tensor], per_file: int = 512
) -> list[str]:
    """Write ``data`` as an ``mfcore-distill`` data folder: files of ``latents`` and the class
    conditions (:func:`conditions`), plus ``labels``; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, a in enumerate(range(0, len(data), per_file)):
        y = data.y[a : a + per_file]
        tensors = {"latents": data.x[a : a + per_file], "labels": y, **conditions(y, table)}
        path = os.path.join(folder, f"digits-{i:05d}.safetensors")
        # written aside, then renamed: a run reading the folder never sees half a file
        save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp")
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths
