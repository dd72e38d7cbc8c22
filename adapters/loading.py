"""Loading a family's transformer, scheduler config and VAE from a local diffusers checkpoint.

A checkpoint is a pipeline folder (``transformer/``, ``scheduler/``, ``vae/``, ...) or a bare
transformer folder. Nothing is downloaded: the entry point reads local folders only, and a
Hugging Face model id (``ORG/NAME``) is found in the local Hugging Face cache
(:func:`resolve_model`).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from mfcore.adapters._durable import read_json
from mfcore.adapters._files import check_folder

__all__ = [
    "DTYPES",
    "resolve_model",
    "transformer_folder",
    "load_transformer",
    "load_scheduler_config",
    "load_vae",
]


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
"""The weight dtypes the command line names (``--weights-dtype``, ``--dtype``)."""

_MODEL_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_model(model: str, cache_dir: str | None = None) -> str:
    """The local folder of ``model``: the folder itself, or, for a Hugging Face model id
    ``ORG/NAME`` that is no folder here, its snapshot in the local Hugging Face cache
    (``cache_dir``: default the hub's, ``$HF_HUB_CACHE``); nothing is downloaded.

    Raises:
        FileNotFoundError: naming the folder, or saying how to get the model into the cache.
    """
    if _MODEL_ID.fullmatch(model) and not os.path.exists(model):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(model, local_files_only=True, cache_dir=cache_dir)
        except LocalEntryNotFoundError:
            raise FileNotFoundError(
                f"{model} is no folder here and not in the local Hugging Face cache; nothing "
                f"is downloaded: run `hf download {model}` (gated models need `hf auth login` "
                "first), or pass the checkpoint's folder"
            ) from None
    return check_folder(model, "model folder")


def transformer_folder(path: str | os.PathLike) -> str:
    """The folder holding the transformer's ``config.json`` (``FileNotFoundError`` if none)."""
    sub = os.path.join(path, "transformer")
    folder = sub if os.path.isdir(sub) else str(path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"{path} is not a diffusers checkpoint: no {os.path.join(folder, 'config.json')}"
        )
    return folder


def load_transformer(
    path: str | os.PathLike, model_cls: type, label: str, dtype: torch.dtype
) -> nn.Module:
    """``model_cls.from_pretrained`` on the checkpoint's transformer, after checking that its
    config names ``model_cls`` (``ValueError`` naming the class it holds otherwise)."""
    folder = transformer_folder(path)
    config = read_json(os.path.join(folder, "config.json"), "model config")
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls != model_cls.__name__:
        raise ValueError(f"{path} holds a {cls} checkpoint, not {label} ({model_cls.__name__})")
    return model_cls.from_pretrained(folder, torch_dtype=dtype)


def load_scheduler_config(path: str | os.PathLike) -> dict[str, Any]:
    """The pipeline's ``scheduler/scheduler_config.json``, or ``{}`` if it has none."""
    sched = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched):
        return {}
    return read_json(sched, "scheduler config")


def load_vae(path: str | os.PathLike, vae_cls: type, dtype: torch.dtype) -> nn.Module | None:
    """The pipeline's ``vae/`` as ``vae_cls``, or None if the checkpoint has none."""
    folder = os.path.join(path, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    return vae_cls.from_pretrained(folder, torch_dtype=dtype)
