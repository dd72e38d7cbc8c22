"""Tiny forms of the docs' shell blocks that need a real checkpoint
(``<!-- doctest: tiny NAME -->`` before a ```bash block; tests/test_doc_commands.py).

A setup ``setup(cwd) -> {path in the block: tiny stand-in}`` writes, into the page's
working folder, what the block reads (a tiny diffusers checkpoint with its own text encoders
and VAE, a prompt file, captioned images, a data folder); the block then runs with those
paths replaced and its budget shrunk (:data:`SHRINK`: a few steps, tiny images, rank 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image

SHRINK: tuple[tuple[str, str], ...] = (
    (r"--warmup-steps \d+", "--warmup-steps 1"),
    (r"--checkpoint-every \d+", "--checkpoint-every 1"),
    (r"--teacher-steps \d+", "--teacher-steps 2"),
    (r"--height \d+", "--height 16"),
    (r"--width \d+", "--width 16"),
    (r"--lora-rank \d+", "--lora-rank 2"),
    (r"--critic-rank \d+", "--critic-rank 2"),
    (r"checkpoints/step-\d{7}", "checkpoints/step-0000001"),  # a checkpoint a tiny run has
)
"""What a tiny form changes in a command besides the paths: the budget, not the flags."""

ShellSetup = Callable[[Path], dict[str, str]]
SHELL_TINY: dict[str, ShellSetup] = {}

PROMPTS = ["a red cat", 'a shop sign that says "open"', "two birds"]


def shell_tiny(name: str) -> Callable[[ShellSetup], ShellSetup]:
    def register(setup: ShellSetup) -> ShellSetup:
        SHELL_TINY[name] = setup
        return setup

    return register


def tiny_form(code: str, paths: dict[str, str]) -> str:
    """The block with ``paths`` replaced and the budget shrunk: a ``train`` command trains
    2 steps (``--steps``, given or not), a ``prepare`` command makes 16x16 images."""
    for path, stand_in in paths.items():
        code = code.replace(path, stand_in)
    for pattern, repl in SHRINK:
        code = re.sub(pattern, repl, code)
    commands = re.split(r"(?<!\\)\n", code)  # logical lines (a trailing \ continues one)
    return "\n".join(_shrink_command(c) for c in commands)


def _shrink_command(command: str) -> str:
    if "mfcore-distill train" in command:
        command = re.sub(r"--steps \d+", "--steps 2", command)
        if "--steps" not in command:
            command = command.replace("mfcore-distill train", "mfcore-distill train --steps 2", 1)
    if "mfcore-distill prepare" in command and "--height" not in command:
        command = command.replace("mfcore-distill prepare", "mfcore-distill prepare "
                                  "--height 16 --width 16", 1)  # fmt: skip
    return command


def _inputs(cwd: Path, checkpoint: str, family: str) -> None:
    """prompts.txt, captioned photos/ and a data/ folder prepared from the checkpoint."""
    from mfcore.adapters.prepare import prepare

    (cwd / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    photos = cwd / "photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(PROMPTS):
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text(prompt)
    prepare(checkpoint, str(cwd / "prompts.txt"), str(cwd / "data"), family=family, height=16,
            width=16, teacher_steps=2, dtype="fp32")  # fmt: skip


@shell_tiny("flux_checkpoint")
def _flux_checkpoint(cwd: Path) -> dict[str, str]:
    from tests._pipelines import tiny_flux_pipeline

    path = cwd / "tiny-flux"
    tiny_flux_pipeline(levels=4).save_pretrained(path)  # FLUX.1's VAE factor, 8
    _inputs(cwd, str(path), "flux")
    return {"/models/FLUX.1-dev": str(path)}


@shell_tiny("hunyuanimage2_checkpoint")
def _hunyuanimage2_checkpoint(cwd: Path) -> dict[str, str]:
    from tests._pipelines import tiny_hy21_pipeline

    path = cwd / "tiny-hy21"
    tiny_hy21_pipeline().save_pretrained(path)
    _inputs(cwd, str(path), "hunyuanimage2")
    return {"/models/HunyuanImage-2.1-Diffusers": str(path)}
