"""The teacher: a small class-conditional ``FluxTransformer2DModel`` trained from scratch by
flow matching on the digits, saved as a checkpoint folder ``mfcore-distill train --model``
reads.

Training is rectified flow (Liu et al., arXiv 2209.03003; Lipman et al., arXiv 2210.02747)
in mfcore's convention: ``z_t = (1 - t) x + t eps``, the transformer regresses
``v = eps - x`` at ``t ~ U(0, 1)`` (FLUX's own time input, :mod:`mfcore.adapters.flux`).
The class is replaced by the unconditional embedding with probability ``label_dropout``, so
the same network is the unconditional model two-pass CFG needs (Ho & Salimans, arXiv
2207.12598).

The folder is a FLUX pipeline folder without text encoders or VAE: ``transformer/``
(``save_pretrained``), ``scheduler/scheduler_config.json`` (FLUX.1's shift settings), and
``digits.json`` / ``conditions.safetensors`` (the training settings and the class
embedding table). It is cached: :func:`teacher_folder` trains only when the folder lacks a
finished teacher of the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .data import NULL_CLASS, Digits, class_embeddings, conditions

__all__ = ["TeacherConfig", "flux_config", "train_teacher", "teacher_folder", "load_conditions"]

logger = logging.getLogger(__name__)

_SETTINGS = "digits.json"
_CONDITIONS = "conditions.safetensors"


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher's size and training recipe (0.46 M parameters by default)."""

    num_layers: int = 2
    num_single_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 4
    text_dim: int = 32
    pooled_dim: int = 32
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    label_dropout: float = 0.1
    seed: int = 0


def flux_config(cfg: TeacherConfig) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` config: 4 packed channels (one latent channel, 2x2
    patches), no guidance embedding (CFG is two-pass), RoPE axes summing to the head width."""
    d = cfg.attention_head_dim
    side = 2 * (3 * d // 16)  # even widths (RoPE rotates pairs), (4, 6, 6) for d = 16
    return {
        "patch_size": 1,
        "in_channels": 4,
        "num_layers": cfg.num_layers,
        "num_single_layers": cfg.num_single_layers,
        "attention_head_dim": d,
        "num_attention_heads": cfg.num_attention_heads,
        "joint_attention_dim": cfg.text_dim,
        "pooled_projection_dim": cfg.pooled_dim,
        "guidance_embeds": False,
        "axes_dims_rope": (d - 2 * side, side, side),
    }


def _lr(step: int, cfg: TeacherConfig) -> float:
    """Linear warm-up over 50 steps, then cosine decay to a tenth."""
    warm = min(1.0, (step + 1) / 50)
    cos = 0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps))
    return cfg.lr * warm * cos


def train_teacher(
    data: Digits, cfg: TeacherConfig, *, log_every: int = 100
) -> tuple[torch.nn.Module, tuple[Tensor, Tensor], dict[str, Any]]:
    """Train the teacher on ``data`` (CPU, fp32); returns the transformer, the class
    embedding table and a record (losses, seconds per step)."""
    from diffusers import FluxTransformer2DModel

    from mfcore.adapters.flux import FAMILY

    torch.manual_seed(cfg.seed)
    model = FluxTransformer2DModel(**flux_config(cfg))
    table = class_embeddings(cfg.text_dim, cfg.pooled_dim, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses, start = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        x, y = data.x[idx], data.y[idx]
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
        cond = conditions(torch.where(drop, NULL_CLASS, y), table)
        eps = torch.randn(x.shape, generator=g)
        t = torch.rand(cfg.batch_size, generator=g)
        z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps
        inputs = {"prompt_embeds": cond["prompt_embeds"], "pooled": cond["pooled_prompt_embeds"]}
        v = FAMILY.velocity(model, z, t, {**inputs, "guidance": None})
        loss = (v - (eps - x)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            logger.info("teacher step %d/%d loss %.4f", step + 1, cfg.steps, recent)
    seconds = time.perf_counter() - start
    record = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "seconds_per_step": seconds / cfg.steps,
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "load_average": os.getloadavg()[0],
    }
    return model.eval(), table, record


def _save(folder: str, model: torch.nn.Module, table: tuple[Tensor, Tensor], meta: dict) -> None:
    model.save_pretrained(os.path.join(folder, "transformer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    scheduler = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "use_dynamic_shifting": True,
    }
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2)
    save_file({"text": table[0], "pooled": table[1]}, os.path.join(folder, _CONDITIONS))
    with open(os.path.join(folder, _SETTINGS), "w") as f:  # written last: marks it finished
        json.dump(meta, f, indent=2)


def load_conditions(folder: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """The class embedding table a teacher folder was trained with."""
    t = load_file(os.path.join(folder, _CONDITIONS))
    return t["text"], t["pooled"]


def teacher_folder(folder: str | os.PathLike, data: Digits, cfg: TeacherConfig) -> dict:
    """Make sure ``folder`` holds the teacher of ``cfg`` trained on ``data``: train and save
    it unless a finished one of the same settings is there. Returns its record
    (``"cached": True`` when it was not trained now)."""
    folder = str(folder)
    settings = os.path.join(folder, _SETTINGS)
    want = dataclasses.asdict(cfg) | {"train_samples": len(data)}
    if os.path.isfile(settings):
        with open(settings) as f:
            meta = json.load(f)
        if meta["config"] == want:
            return meta["record"] | {"cached": True}
        logger.info("%s holds a teacher of other settings: training a new one", folder)
    model, table, record = train_teacher(data, cfg)
    os.makedirs(folder, exist_ok=True)
    _save(folder, model, table, {"config": want, "record": record})
    return record | {"cached": False}
