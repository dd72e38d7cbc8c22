"""Trainable fractions at real configs, counted on the meta device (no memory, no weights).

The student is built exactly as for training (LoRA through peft, the interval embedding)
on a transformer whose parameters live on ``torch.device("meta")``, so the counts are those
of the real model at any size: FLUX.1-dev (11.9B), HunyuanImage 2.1 (17.4B) or
HunyuanImage 3.0 (81.3B) alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mfcore.adapters.family import Family
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.student import MeanFlowStudent

__all__ = ["meta_counts"]


def meta_counts(
    build_model: Callable[[], nn.Module], family: Family, lora: LoraSpec
) -> dict[str, float]:
    """Parameter counts of a student on ``build_model()`` built on the meta device.

    Returns:
        ``base`` (the transformer's own parameters), ``trainable`` (LoRA plus the interval
        embedding), ``total`` and ``fraction = trainable / total``.
    """
    with torch.device("meta"):
        student = MeanFlowStudent(build_model(), family, lora=lora)
    trainable, total = student.parameter_counts()
    return {
        "base": total - trainable,
        "trainable": trainable,
        "total": total,
        "fraction": trainable / total,
    }
