"""``python -m mfcore.adapters.flux_distill``: the FLUX entry point, now ``mfcore-distill``.

Kept so that existing commands and imports go on working: the command line is
``mfcore-distill``'s (:mod:`mfcore.adapters.distill`) with ``--family flux`` as its default,
and the names below are the ones FLUX code imported from here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch
from diffusers import FluxTransformer2DModel

from mfcore.adapters.data import LatentDataset, make_synthetic_data
from mfcore.adapters.distill import AlignmentHook, DistillConfig, distill, latest_checkpoint
from mfcore.adapters.distill_cli import build_parser
from mfcore.adapters.distill_cli import main as _main
from mfcore.adapters.flux import FAMILY

__all__ = [
    "REQUIRED_KEYS",
    "OPTIONAL_KEYS",
    "DistillConfig",
    "LatentDataset",
    "AlignmentHook",
    "make_synthetic_data",
    "load_flux_transformer",
    "distill",
    "latest_checkpoint",
    "build_parser",
    "main",
]

REQUIRED_KEYS = ("latents", *FAMILY.data_keys)
OPTIONAL_KEYS = FAMILY.optional_keys


def load_flux_transformer(
    path: str | os.PathLike, *, dtype: torch.dtype
) -> tuple[FluxTransformer2DModel, dict]:
    """The transformer and scheduler config (``{}`` if none) of a local FLUX checkpoint."""
    return FAMILY.load_model(str(path), dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """``mfcore-distill`` with ``--family flux`` unless the command names another family."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("train", "prepare", "make-data") and "--family" not in args:
        args[1:1] = ["--family", "flux"]
    return _main(args, prog="python -m mfcore.adapters.flux_distill")


if __name__ == "__main__":
    sys.exit(main())
