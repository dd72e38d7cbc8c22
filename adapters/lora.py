"""LoRA adapters on shared transformers through peft, saved in diffusers' own format.

A student built from a teacher keeps the teacher's base weights frozen and trains low-rank
updates ``W + (alpha / rank) B A`` (LoRA, arXiv 2106.09685) on chosen linear layers. The
teacher is the same module with the updates switched off (:func:`lora_disabled`), so the
two never need a second copy of the base weights.

The weights are written in diffusers' LoRA format (the LoRA config in the safetensors
metadata): with a pipeline's ``save_lora_weights`` (keys ``transformer.<module>.lora_A.weight``,
loaded by ``pipeline.load_lora_weights``) where the family has a pipeline LoRA loader, and
without the prefix (``<module>.lora_A.weight``, loaded by a diffusers model's
``load_lora_adapter(..., prefix=None)``) otherwise. Any ``nn.Module`` takes adapters: diffusers
models through their ``add_adapter``, others through ``peft.inject_adapter_in_model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import Tensor, nn

from mfcore._checks import check_fraction, check_instance, check_positive_int, check_real
from mfcore.adapters._state import read_tensors

__all__ = [
    "LORA_WEIGHT_NAME",
    "LoraSpec",
    "add_lora",
    "lora_disabled",
    "lora_active",
    "adapter_parameters",
    "pinned_checkpointing",
    "lora_state_dict",
    "load_lora_state_dict",
    "merged_state_dict",
    "save_lora",
    "load_lora",
]

#: File name diffusers' LoRA loaders look for first in a folder.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """Which layers get LoRA and how large.

    Attributes:
        rank: rank ``r`` of each update ``B A`` (``A: (r, in)``, ``B: (out, r)``).
        alpha: scale numerator; the update is multiplied by ``alpha / rank``. Defaults to
            ``rank`` (scale 1).
        target_modules: module names matched by peft (a name matches itself and every
            module whose name ends with ``"." + name``); None means the family's default
            targets, filled in when a student is built (:meth:`with_default_targets`).
        dropout: dropout on the LoRA branch input (0 keeps training deterministic).

    Raises:
        TypeError, ValueError: naming the attribute, unless ``rank`` is an int >= 1,
            ``alpha`` None or a finite number > 0, ``target_modules`` None or a non-empty
            sequence of names and ``dropout`` in ``[0, 1)``.
    """

    rank: int = 64
    alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int("rank", self.rank)
        if self.alpha is not None:
            check_real("alpha", self.alpha, minimum=0.0, strict=True)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not self.target_modules:
                raise ValueError("target_modules must be a non-empty sequence of module names")
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_fraction("dropout", self.dropout, below_one=True)

    def with_default_targets(self, targets: tuple[str, ...]) -> LoraSpec:
        """This spec, with ``targets`` if it names none."""
        if self.target_modules is not None:
            return self
        return dataclasses.replace(self, target_modules=tuple(targets))

    def to_peft(self) -> LoraConfig:
        """The ``peft.LoraConfig`` (Gaussian ``A``, zero ``B``: the update starts at 0)."""
        if self.target_modules is None:
            raise ValueError("target_modules is None: resolve it with with_default_targets")
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.rank if self.alpha is None else self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
        )

    def to_dict(self) -> dict:
        """A JSON-serialisable form (inverse of ``LoraSpec(**d)``)."""
        d = asdict(self)
        if self.target_modules is not None:
            d["target_modules"] = list(self.target_modules)
        return d


def add_lora(
    model: nn.Module, spec: LoraSpec, *, adapter_name: str = "mfcore", activate: bool = True
) -> list[nn.Parameter]:
    """Freeze ``model`` and inject LoRA updates (zero at initialisation) into it, in place.

    Every LoRA weight of the model (this adapter's and earlier ones') is left trainable.

    Args:
        model: the transformer (a diffusers model with ``add_adapter``, or any ``nn.Module``).
        spec: ranks and target modules.
        adapter_name: peft's name for the adapter.
        activate: make the new adapter the active one (diffusers' behaviour); False keeps
            the adapters that were active before it (a second adapter on a shared model
            that runs only inside :func:`lora_active`). The first adapter of a model is
            always active.

    Returns:
        the new trainable LoRA parameters.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if no module of ``model`` matches ``spec.target_modules``.
    """
    check_instance("model", model, nn.Module, "an nn.Module")
    before = [layer.active_adapters for layer in _tuner_layers(model)]
    previous = before[0] if before else None
    try:
        with warnings.catch_warnings():  # peft warns on any second adapter; ours are intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            if hasattr(model, "add_adapter"):
                model.add_adapter(spec.to_peft(), adapter_name=adapter_name)
            else:
                inject_adapter_in_model(spec.to_peft(), model, adapter_name)
    except ValueError as err:
        raise ValueError(f"no module of the model matches target_modules: {err}") from err
    if not activate and previous is not None:
        for layer in _tuner_layers(model):
            layer._active_adapter = list(previous)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
    new = list(adapter_parameters(model, adapter_name).values())
    for p in new:  # trained weights stay fp32 on a half-precision base (peft casts inputs)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return new


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The LoRA parameters of one adapter of ``model``, by their names in ``model``."""
    tag = f".{adapter_name}."
    return {n: p for n, p in model.named_parameters() if ".lora_" in n and tag in n}


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base (every LoRA update off) inside the block.

    Only the layers' on/off switch is flipped: unlike peft's ``enable_adapters(False)`` it
    leaves ``requires_grad`` alone, so a student graph built before the block still
    back-propagates into its LoRA weights afterwards.
    """
    layers = _tuner_layers(model)
    saved = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, state in zip(layers, saved, strict=True):
            layer._disable_adapters = state


def _check_adapter(model: nn.Module, adapter_name: str) -> None:
    """Raise ``ValueError`` unless ``model`` holds the LoRA adapter ``adapter_name``."""
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"the model has no LoRA adapter named {adapter_name!r}")


@contextlib.contextmanager
def lora_active(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Run ``model`` with the single adapter ``adapter_name`` on inside the block.

    Several adapters can share one base (a student's and a critic's): each model switches
    to its own adapter for its call. Like :func:`lora_disabled` only the switch is set,
    ``requires_grad`` is left alone. Gradient checkpointing recomputes blocks during the
    backward with the adapter that is active *then*: call the model inside
    :func:`pinned_checkpointing` too (the FLUX adapters do), or run the backward inside
    this block.

    Raises:
        ValueError: if ``model`` has no adapter named ``adapter_name``.
    """
    _check_adapter(model, adapter_name)
    layers = _tuner_layers(model)
    saved = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = [adapter_name]
        yield
    finally:
        for layer, state in zip(layers, saved, strict=True):
            layer._active_adapter = state


def _adapter_state(model: nn.Module) -> list[tuple[BaseTunerLayer, Any, bool]]:
    return [(m, m._active_adapter, m._disable_adapters) for m in _tuner_layers(model)]


@contextlib.contextmanager
def _applied(state: list[tuple[BaseTunerLayer, Any, bool]]) -> Iterator[None]:
    saved = [(m, m._active_adapter, m._disable_adapters) for m, _, _ in state]
    try:
        for m, active, disabled in state:
            m._active_adapter, m._disable_adapters = active, disabled
        yield
    finally:
        for m, active, disabled in saved:
            m._active_adapter, m._disable_adapters = active, disabled


class _PinnedBlock:
    """A block called with the adapter switches it had when its checkpoint was taken."""

    def __init__(self, block: nn.Module, state: list) -> None:
        self.block = block
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _applied(self.state):
            return self.block(*args, **kwargs)


@contextlib.contextmanager
def pinned_checkpointing(model: nn.Module) -> Iterator[None]:
    """Inside the block, gradient checkpointing recomputes with this call's adapter switches.

    A checkpointed block is run again during the backward, with whatever adapter is active
    *then*; when several models share one base (teacher, student, critic) that may be
    another model's. Enter this around a call of ``model`` after its adapter is switched
    (:func:`lora_active`, :func:`lora_disabled`): each block the call checkpoints records
    the switches and its recomputation restores them, whenever the backward runs. A no-op
    when ``model`` has no ``_gradient_checkpointing_func`` (diffusers' checkpointing hook).
    """
    original = getattr(model, "_gradient_checkpointing_func", None)
    if original is None:
        yield
        return
    state = _adapter_state(model)

    def pinned(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return original(_PinnedBlock(block, state), *args, **kwargs)

    model._gradient_checkpointing_func = pinned
    try:
        yield
    finally:
        model._gradient_checkpointing_func = original


def lora_state_dict(model: nn.Module, *, adapter_name: str = "mfcore") -> dict[str, Tensor]:
    """The LoRA weights of ``model`` keyed by module (``<module>.lora_A.weight``), detached."""
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach() for k, v in sd.items()}


def load_lora_state_dict(
    model: nn.Module, state: dict[str, Tensor], *, adapter_name: str = "mfcore"
) -> None:
    """Copy LoRA weights (as from :func:`lora_state_dict`) into ``model``; every key must match.

    Raises:
        ValueError: naming the missing and unexpected LoRA keys and the shape mismatches.
    """
    expected = lora_state_dict(model, adapter_name=adapter_name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} is {tuple(v.shape)}, the model's {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    found = {"missing": missing, "unexpected": unexpected, "other shapes": shapes}
    if missing or unexpected or shapes:
        wrong = "; ".join(f"{what} {keys[:3]}" for what, keys in found.items() if keys)
        raise ValueError(f"LoRA state does not match the model: {wrong}")
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)


def merged_state_dict(model: nn.Module, *, adapter_name: str = "mfcore") -> dict[str, Tensor]:
    """``model``'s weights under its own (pre-LoRA) names, with one adapter merged in.

    Each layer of adapter ``adapter_name`` gets ``W + s B A`` (peft's ``get_delta_weight``,
    ``s = alpha / rank``), summed in fp32 at least (fp64 stays fp64) and stored in ``W``'s
    dtype; every other adapter is
    left out. ``model`` itself is not changed, so a teacher that shares its base weights is
    untouched (peft's ``merge_and_unload`` rewrites them in place).

    Returns:
        detached tensors keyed as the model's ``state_dict`` was before :func:`add_lora`;
        the unchanged ones share storage with the model.
    """
    _check_adapter(model, adapter_name)
    state = {
        k.replace(".base_layer.", "."): v.detach()
        for k, v in model.state_dict().items()
        if ".lora_" not in k
    }
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer) and adapter_name in layer.lora_A:
                w = layer.get_base_layer().weight
                work = torch.promote_types(w.dtype, torch.float32)  # fp64 stays fp64
                delta = layer.get_delta_weight(adapter_name).to(work)
                state[f"{name}.weight"] = (w.to(work) + delta).to(w.dtype)
    return state


# The safetensors metadata key under which diffusers stores a LoRA's peft config.
_METADATA_KEY = "lora_adapter_metadata"


def _peft_config(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    config = model.peft_config[adapter_name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    json.dumps(config)  # fail here, not inside diffusers, if something is not serialisable
    return config


def save_lora(
    directory: str | os.PathLike,
    model: nn.Module,
    *,
    loader_cls: type | None = None,
    adapter_name: str = "mfcore",
) -> str:
    """Write the LoRA weights of ``model`` in diffusers' LoRA format.

    Args:
        directory: output folder (created).
        model: the transformer holding the adapter.
        loader_cls: the diffusers pipeline class whose ``save_lora_weights`` to use (e.g.
            ``FluxPipeline``; keys prefixed ``transformer.``, read by its
            ``load_lora_weights``). None writes the keys without a prefix, as a diffusers
            model's ``save_lora_adapter`` does (read by ``load_lora_adapter(..., prefix=None)``).
        adapter_name: peft's name for the adapter.

    Returns:
        the path of the safetensors file.
    """
    config = _peft_config(model, adapter_name)
    state = lora_state_dict(model, adapter_name=adapter_name)
    path = os.path.join(directory, LORA_WEIGHT_NAME)
    if loader_cls is not None:
        loader_cls.save_lora_weights(
            directory,
            transformer_lora_layers=state,
            weight_name=LORA_WEIGHT_NAME,
            transformer_lora_adapter_metadata=config,
        )
        return path
    os.makedirs(directory, exist_ok=True)
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    return path


def load_lora(
    directory: str | os.PathLike,
    model: nn.Module,
    *,
    adapter_name: str = "mfcore",
    prefix: str | None = "transformer",
) -> None:
    """Load weights written by :func:`save_lora` into a model that already holds the adapter.

    Args:
        directory: the folder :func:`save_lora` wrote.
        model: the transformer holding the adapter.
        adapter_name: peft's name for the adapter.
        prefix: the key prefix (``"transformer"`` for a pipeline's format, None for none).

    Raises:
        FileNotFoundError: if the folder has no LoRA file.
        ValueError: if the file is corrupt or its keys do not match the model's adapter.
    """
    path = os.path.join(directory, LORA_WEIGHT_NAME)
    raw = read_tensors(path, what="LoRA weights")
    head = "" if prefix is None else prefix + "."
    state = {k[len(head) :]: v for k, v in raw.items() if k.startswith(head)}
    if len(state) != len(raw):
        other = sorted(k for k in raw if not k.startswith(head))[:3]
        raise ValueError(f"{path} holds keys outside the {prefix!r} prefix: {other}")
    load_lora_state_dict(model, state, adapter_name=adapter_name)
