"""What a distillation run shows while it runs: JSONL metrics, TensorBoard or wandb, previews.

Every step's metrics go to ``metrics.jsonl`` (one strict JSON object a line: a non-finite
number is written as ``null``, the JSON of a missing value); with ``report_to`` the same
scalars go to TensorBoard (``<output>/tensorboard``, when ``pip install tensorboard`` made
``torch.utils.tensorboard`` importable) or to an offline wandb run (``<output>/wandb``).
Preview images (the teacher beside the EMA student at 1, 2 and 4 steps) are written as PNG
files under ``<output>/previews`` and, with a reporter, as images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from mfcore._checks import check_choice
from mfcore.adapters._durable import write_atomic

__all__ = ["REPORTERS", "check_reporter", "RunLog", "latents_to_images", "truncate_log"]

logger = logging.getLogger(__name__)


def _parse(path: str, lines: list[str]) -> list[dict]:
    """The JSON objects of a log's lines; a torn last line (a kill while it was written) is
    dropped with a warning, any other unreadable line raises ``ValueError`` naming it."""
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                logger.warning("%s: dropping its torn last line %d (%s)", path, i + 1, err)
                return rows
            raise ValueError(f"{path}: line {i + 1} is not JSON ({err})") from None
    return rows


def truncate_log(path: str, step: int) -> None:
    """Drop the lines of a JSONL log past ``step`` (written after the checkpoint a run
    resumes from), so each step is logged once, and a torn last line."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.readlines() if line.strip()]
    rows = _parse(path, lines)
    kept = [line for line, row in zip(lines, rows, strict=False) if row.get("step", 0) <= step]
    # (strict=False: a torn last line has no row)
    if len(kept) != len(lines):

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)

        write_atomic(path, write)


def _json_value(v: Any) -> Any:
    """``v``, with every non-finite float in it as ``None`` (strict JSON has no
    ``Infinity``)."""
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def latents_to_images(latents: Tensor) -> list[PIL.Image.Image]:
    """Grey images of latents ``(B, C, H, W)`` (the channel mean, min-max scaled): a
    preview for runs without a VAE."""
    x = latents.detach().float().mean(1)
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8).cpu().numpy()
    return [PIL.Image.fromarray(a) for a in x]


def _table(rows: list[list[PIL.Image.Image]]) -> PIL.Image.Image:
    """Rows of images, side by side within a row, rows one below the other (RGB)."""
    rows = [[im.convert("RGB") for im in row] for row in rows]
    w = max(sum(im.width for im in row) for row in rows)
    heights = [max(im.height for im in row) for row in rows]
    out = PIL.Image.new("RGB", (w, sum(heights)))
    y = 0
    for row, h in zip(rows, heights, strict=True):
        x = 0
        for im in row:
            out.paste(im, (x, y))
            x += im.width
        y += h
    return out


REPORTERS = ("tensorboard", "wandb", "none")
"""Where :class:`RunLog` reports besides ``metrics.jsonl`` and ``previews/``."""


def check_reporter(report_to: object) -> str:
    """Raise ``ValueError`` unless ``report_to`` is one of :data:`REPORTERS` and, for
    ``"wandb"``, wandb is installed."""
    name = check_choice("report_to", report_to, REPORTERS)
    if name == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ValueError("report_to='wandb' needs wandb: pip install wandb")
    return name


class RunLog:
    """The run's metrics log and preview writer.

    Args:
        output: the run folder.
        step: the step the run starts (or resumes) at; later lines of an existing log go.
        report_to: ``"tensorboard"`` (events in ``<output>/tensorboard`` when
            ``torch.utils.tensorboard`` imports, else a note), ``"wandb"`` (a run in
            ``<output>/wandb``, offline unless ``WANDB_MODE`` says otherwise; ``wandb`` must
            be installed) or ``"none"``.
        settings: the run's settings, recorded as the wandb run's config.
    """

    def __init__(
        self,
        output: str,
        step: int,
        *,
        report_to: str = "tensorboard",
        settings: dict[str, Any] | None = None,
    ) -> None:
        check_reporter(report_to)
        self.output = output
        self.path = os.path.join(output, "metrics.jsonl")
        truncate_log(self.path, step)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed by close()
        self.writer = self.wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("TensorBoard is not installed: metrics go to metrics.jsonl only")
            else:
                # events past the checkpoint's step go; its own step's stay (logged once)
                folder = os.path.join(output, "tensorboard")
                self.writer = SummaryWriter(folder, purge_step=step + 1)
        elif report_to == "wandb":
            self.wandb = _wandb_run(output, settings or {})

    def metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one step's metrics (numbers to TensorBoard or wandb, everything to the JSONL
        file, a non-finite number as ``null``)."""
        row = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        numbers = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def table(self, step: int, rows: list[list[PIL.Image.Image]]) -> str:
        """Write ``rows`` of images as one ``previews/step-XXXXXXX.png`` (and to
        TensorBoard or wandb); returns the file's path."""
        folder = os.path.join(self.output, "previews")
        os.makedirs(folder, exist_ok=True)
        grid = _table(rows)
        path = os.path.join(folder, f"step-{step:07d}.png")
        grid.save(path)
        if self.writer is not None:
            self.writer.add_image("preview", np.asarray(grid), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"preview": wandb.Image(grid)}, step=step)
        return path

    def sync(self) -> None:
        """Flush the metrics written so far to the disk (with each checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the files (and finish the wandb run)."""
        self.sync()
        self._file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(output: str, settings: dict[str, Any]):
    """A wandb run logging into ``<output>/wandb``: offline unless ``WANDB_MODE`` is set
    (``wandb sync`` uploads it later); the same run id on every resume of the folder."""
    import wandb  # installed: check_reporter looked

    folder = os.path.join(output, "wandb")
    os.makedirs(folder, exist_ok=True)
    run_id = "mfcore-" + hashlib.sha1(os.path.abspath(output).encode()).hexdigest()[:12]
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "mfcore"),
        dir=folder,
        id=run_id,
        resume="allow",
        mode=os.environ.get("WANDB_MODE", "offline"),
        config=settings,
    )
