"""``mfcore-distill export``: a trained student as a stock diffusers transformer folder.

Only a student trained with ``--r-embedding native`` (HunyuanImage 2.1) has a stock form:
its model's own ``use_meanflow`` input carries ``r``, so the LoRA merged into the base
weights gives a ``HunyuanImageTransformer2DModel`` that the stock ``HunyuanImagePipeline``
runs at few steps (:meth:`~mfcore.adapters.native_meanflow.NativeMeanFlowStudent.save_stock`).
An interval student (every family's default) has no such form: diffusers' transformers
have no input for the interval ``t - r`` (``docs/flux.md``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mfcore.adapters.distill_config import DTYPES
from mfcore.adapters.native_meanflow import NativeMeanFlowStudent
from mfcore.adapters.pipeline import MeanFlowPipeline, add_student_arguments, student_dtype

__all__ = ["add_export_parser", "run_export"]


def add_export_parser(sub: Any, formatter: type) -> None:
    """Add the ``export`` subcommand to ``mfcore-distill``'s parser."""
    ex = sub.add_parser(
        "export",
        help="write a --r-embedding native student as a stock diffusers transformer folder",
        formatter_class=formatter,
    )
    add_student_arguments(ex, "dtype of the written weights")
    ex.add_argument("--output", required=True, help="folder for the transformer")


def run_export(args: dict[str, Any]) -> str:
    """Run ``export`` from parsed arguments; returns the line to print."""
    dtype = args["dtype"] or student_dtype(args["student"])
    pipe = MeanFlowPipeline.from_pretrained(
        args["model"], student=args["student"], torch_dtype=DTYPES[dtype], device="cpu"
    )
    student = pipe.student
    if not isinstance(student, NativeMeanFlowStudent):
        raise ValueError(
            f"{args['student']} is a {pipe.family.label} student with an interval embedding, "
            "which no stock diffusers transformer can hold: only a HunyuanImage 2.1 student "
            "trained with --r-embedding native exports (run it with generate or "
            "MeanFlowPipeline)"
        )
    with torch.no_grad():
        student.save_stock(args["output"])
    out = args["output"]
    return (
        f"wrote a stock {type(student.transformer).__name__} to {out}; run it with "
        f"HunyuanImagePipeline.from_pretrained(BASE, transformer="
        f"HunyuanImageTransformer2DModel.from_pretrained({out!r}), guider=None, "
        f"ocr_guider=None) ({os.path.join(out, 'README.md')})\n"
    )
