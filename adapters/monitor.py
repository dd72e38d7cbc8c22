"""What a distillation run shows while it runs: JSONL metrics, TensorBoard, preview images.

Every step's metrics go to ``metrics.jsonl`` (one JSON object a line); when TensorBoard is
installed (``pip install tensorboard``, read through ``torch.utils.tensorboard``) the same
scalars go to ``<output>/tensorboard``. Preview images (1- and 2-step samples of the EMA
student) are written as PNG files under ``<output>/previews`` and, with TensorBoard, as
images.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

__all__ = ["RunLog", "latents_to_images", "truncate_log"]

logger = logging.getLogger(__name__)


def truncate_log(path: str, step: int) -> None:
    """Drop the lines of a JSONL log past ``step`` (written after the checkpoint a run
    resumes from), so each step is logged once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def latents_to_images(latents: Tensor) -> list[PIL.Image.Image]:
    """Grey images of latents ``(B, C, H, W)`` (the channel mean, min-max scaled): a
    preview for runs without a VAE."""
    x = latents.detach().float().mean(1)
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8).cpu().numpy()
    return [PIL.Image.fromarray(a) for a in x]


def _grid(images: list[PIL.Image.Image]) -> PIL.Image.Image:
    """The images side by side (RGB)."""
    images = [im.convert("RGB") for im in images]
    w, h = sum(im.width for im in images), max(im.height for im in images)
    out = PIL.Image.new("RGB", (w, h))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


class RunLog:
    """The run's metrics log and preview writer.

    Args:
        output: the run folder.
        step: the step the run starts (or resumes) at; later lines of an existing log go.
        tensorboard: also write TensorBoard events when ``torch.utils.tensorboard`` imports.
    """

    def __init__(self, output: str, step: int, *, tensorboard: bool = True) -> None:
        self.output = output
        self.path = os.path.join(output, "metrics.jsonl")
        truncate_log(self.path, step)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed by close()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("TensorBoard is not installed: metrics go to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(os.path.join(output, "tensorboard"), purge_step=step)

    def metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one step's metrics (numbers to TensorBoard, everything to the JSONL file)."""
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self.writer.add_scalar(k, v, step)

    def images(self, step: int, tag: str, images: list[PIL.Image.Image]) -> str:
        """Write ``images`` side by side as ``previews/step-XXXXXXX-<tag>.png`` (and to
        TensorBoard); returns the file's path."""
        folder = os.path.join(self.output, "previews")
        os.makedirs(folder, exist_ok=True)
        grid = _grid(images)
        path = os.path.join(folder, f"step-{step:07d}-{tag}.png")
        grid.save(path)
        if self.writer is not None:
            self.writer.add_image(f"preview/{tag}", np.asarray(grid), step, dataformats="HWC")
        return path

    def close(self) -> None:
        """Flush and close the files."""
        self._file.close()
        if self.writer is not None:
            self.writer.close()
