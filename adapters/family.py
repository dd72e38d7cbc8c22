"""What a model family gives the adapter core: its conventions, and nothing else.

The core (:mod:`mfcore.adapters.student`, :mod:`~mfcore.adapters.generation`, the entry
point :mod:`~mfcore.adapters.distill`) is the same for every family. A family is one small
object that says how to call its transformer on mfcore's ``(z, t, cond)`` (latent packing,
time scaling, conditioning inputs, guidance), where the interval embedding goes, which
layers get LoRA, which modules hold attention, and its sampling grid; and, for the entry
point, how to load or build its transformer, what a data sample holds, how to encode
prompts (``prepare``) and how to decode latents.

Families register by name in :data:`FAMILIES` and are imported on first use, so the core
imports no model library it does not need.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mfcore._checks import check_choice, check_real, check_tensor
from mfcore.adapters._durable import read_json
from mfcore.adapters._shapes import Shape, check_conditions, config_value, data_problems
from mfcore.adapters.interval import diffusers_interval_embedding
from mfcore.adapters.loading import load_scheduler_config, load_transformer, load_vae

__all__ = [
    "Call",
    "Synthetic",
    "Family",
    "TrainingFamily",
    "FamilyBase",
    "guidance_input",
    "FAMILIES",
    "get_family",
    "detect_family",
]


@dataclass(frozen=True)
class Synthetic:
    """What :meth:`TrainingFamily.synthetic_sample` draws: ``n`` samples of ``H x W``
    latents with ``seq_len``-token prompts, condition widths ``dims``, from ``generator``."""

    n: int
    height: int
    width: int
    seq_len: int
    generator: torch.Generator
    negatives: bool
    dims: Mapping[str, int]


@dataclass(frozen=True)
class Call:
    """The checked inputs of one model call: the prompt's and, for two-pass CFG, the
    negative prompt's (None when the condition holds none or the caller needs none)."""

    inputs: dict[str, Any]
    negative: dict[str, Any] | None = None


@runtime_checkable
class Family(Protocol):
    """A model family's conventions (see the module docstring and ``docs/adapters.md``).

    Attributes:
        name: registry name (``--family``).
        label: human name used in messages (``"FLUX"``).
        class_names: the ``_class_name`` / ``architectures`` entries of a checkpoint's
            config that identify the family.
        cond_keys: every keyword a call accepts (others raise ``TypeError``).
        student_config_name: file name of a saved student's JSON config.
        student_format: the ``format`` tag in that file.

    Example:
        One call of a tiny random SD3 transformer, as the teacher and student make it:

        >>> import torch
        >>> from mfcore.adapters.family import Synthetic, get_family
        >>> family = get_family("sd3")
        >>> model = family.tiny_model(0, torch.float32, False)
        >>> request = Synthetic(1, 4, 4, 3, torch.Generator().manual_seed(0), False,
        ...                     family.tiny_dims)
        >>> cond = family.synthetic_sample(request)
        >>> z = cond.pop("latents")
        >>> call = family.call_inputs(model, z, cond, 3.5, False)
        >>> sorted(call.inputs)
        ['pooled', 'prompt_embeds']
        >>> family.velocity(model, z, torch.full((1,), 0.5), call.inputs).shape
        torch.Size([1, 4, 4, 4])
    """

    name: str
    label: str
    class_names: tuple[str, ...]
    cond_keys: frozenset[str]
    student_config_name: str
    student_format: str

    def check_model(self, model: object) -> nn.Module:
        """Return ``model`` if it is this family's transformer; ``TypeError`` otherwise."""
        ...

    def call_inputs(
        self,
        model: nn.Module,
        z: Tensor,
        cond: Mapping[str, Any],
        guidance: float,
        negative: bool,
        *,
        validate: bool = True,
    ) -> Call:
        """The inputs of one call from its latents and condition; with ``negative`` the
        negative prompt's too. ``validate`` checks them first (not the times): a negative
        prompt that ``negative`` needs and ``cond`` lacks is a ``ValueError`` naming it;
        ``validate=False`` trusts arguments checked already (a training loop's data)."""
        ...

    def velocity(self, model: nn.Module, z: Tensor, t: Tensor, inputs: dict[str, Any]) -> Tensor:
        """One call of the transformer: mfcore's ``v = eps - x`` at ``(z, t)``, in ``z``'s
        dtype (``z (B, C, H, W)``, ``t (B,)`` in [0, 1])."""
        ...

    def lora_targets(self, model: nn.Module) -> tuple[str, ...]:
        """The default LoRA target module names (chosen on purpose, see the family docs)."""
        ...

    def interval_embedding(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        """A fresh zero-initialised :class:`~mfcore.adapters.interval.IntervalEmbedding`
        and the modules whose outputs it is added to."""
        ...

    def native_student(self, transformer: nn.Module, **kwargs: Any) -> Any:
        """A :class:`~mfcore.adapters.student.MeanFlowStudent` (``kwargs`` its own) that
        takes ``r`` through the model's own input, which stock diffusers pipelines feed
        (``r_embedding="native"``); ``ValueError`` for a family whose model has none."""
        ...

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules whose forward calls ``F.scaled_dot_product_attention``."""
        ...

    def config_summary(self, model: nn.Module) -> dict[str, Any]:
        """The config entries a saved student must match (JSON-serialisable)."""
        ...

    def save_lora(self, directory: str, model: nn.Module, adapter_name: str) -> None:
        """Write the LoRA in the format this family's diffusers loader reads."""
        ...

    def load_lora(self, directory: str, model: nn.Module, adapter_name: str) -> None:
        """Read what :meth:`save_lora` wrote into an adapter of the same spec."""
        ...

    def latent_channels(self, model: nn.Module) -> int:
        """The ``C`` of the latents ``(B, C, H, W)`` the transformer takes."""
        ...

    def sampling_shift(
        self, height: int, width: int, scheduler: Mapping[str, Any] | None
    ) -> dict[str, float]:
        """How the family's schedule shifts times for an ``H x W`` latent: ``{"mu": m}``
        (:func:`mfcore.time.exponential_shift`) or ``{"shift": s}`` (a constant shift), read
        from the checkpoint's ``scheduler`` config where it says."""
        ...


@runtime_checkable
class TrainingFamily(Family, Protocol):
    """What the entry point needs from a family on top of its model conventions.

    Attributes:
        data_keys: condition tensors every data sample holds (besides ``latents``).
        optional_keys: condition tensors a sample may hold (the negative prompt).
        negative_key: the key whose presence makes two-pass CFG possible.
        tiny_dims: latent ``channels`` and condition widths of the tiny random model.
        vae_factor: pixels per latent along each side of the family's real VAE.
    """

    data_keys: tuple[str, ...]
    optional_keys: tuple[str, ...]
    negative_key: str
    tiny_dims: dict[str, int]
    vae_factor: int

    def check_data(self, shapes: Mapping[str, tuple[int, ...]], model: nn.Module) -> None:
        """Raise ``ValueError`` unless per-sample ``shapes`` fit ``model``."""
        ...

    def synthetic_sample(self, request: Synthetic) -> dict[str, Tensor]:
        """Random samples ``{"latents": (n, C, H, W), <data_keys>...}``."""
        ...

    def tiny_model(self, seed: int, dtype: torch.dtype, guidance: bool) -> nn.Module:
        """A random tiny transformer (guidance-distilled when ``guidance``)."""
        ...

    def load_model(self, path: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
        """The transformer of a local checkpoint and its scheduler config (``{}`` if none);
        ``ValueError`` if the checkpoint is another family's."""
        ...

    def load_vae(self, path: str, dtype: torch.dtype) -> nn.Module | None:
        """The checkpoint's VAE (for previews), or None if it has none."""
        ...

    def prompt_encoder(self, path: str, dtype: torch.dtype) -> Any:
        """The checkpoint's prompt encoding for ``prepare``
        (a :class:`mfcore.adapters.prepare.PromptEncoder`)."""
        ...


def guidance_input(
    embeds: bool, guidance: object, default: float, z: Tensor, label: str
) -> Tensor | None:
    """The guidance input ``(B,)`` float32 of a call (``default`` when ``guidance`` is None),
    or None for a checkpoint without a guidance embedding (``embeds`` False), where a given
    ``guidance`` is a ``ValueError``: such a teacher takes two-pass CFG instead. A
    ``guidance`` that is neither a tensor nor a real number is a ``TypeError``."""
    if not embeds:
        if guidance is not None:
            raise ValueError(
                f"guidance was given but this {label} checkpoint has no guidance embedding "
                "(guidance_embeds=False); use true_cfg_scale with negative prompts instead"
            )
        return None
    g = default if guidance is None else guidance
    if isinstance(g, Tensor):
        if g.shape != (z.shape[0],):
            raise ValueError(
                f"guidance must be a float or have shape ({z.shape[0]},), got {tuple(g.shape)}"
            )
        return g.to(device=z.device, dtype=torch.float32)
    return torch.full(
        (z.shape[0],), check_real("guidance", g), device=z.device, dtype=torch.float32
    )


class FamilyBase:
    """Defaults that families share, so a family declares what its model is and overrides
    only what differs.

    From declared attributes:

    - ``model_class``: :meth:`check_model` (an instance of it), :meth:`load_model` (the
      checkpoint's transformer of that class and its scheduler config) and, with
      ``tiny_config``, :meth:`tiny_model`;
    - ``vae_class``: :meth:`load_vae`;
    - ``time_embedding``: the name of the module that embeds ``t`` with a ``time_proj`` and
      a ``timestep_embedder`` (diffusers' ``Timesteps`` + ``TimestepEmbedding``), whose
      output every block reads: :meth:`interval_embedding` hooks it;
    - ``attention_class``: :meth:`attention_modules`;
    - ``summary_keys``: :meth:`config_summary`;
    - ``shift_key`` / ``default_shift``: a constant sampling shift read from the scheduler
      config (:meth:`sampling_shift`), the sampling grid and the shifted training times;
    - ``supported``: config entries the adapters need (``{"patch_size": 1}``), which
      :meth:`check_model` checks;
    - ``conditions``: the condition tensors of one prompt
      (:class:`~mfcore.adapters._shapes.Shape`), which :meth:`condition_call` checks in a
      call (``missing_condition``: the error of a call without a required one) and
      :meth:`check_data` in a data folder, with ``latent_multiple`` (the latents' height
      and width must be multiples of it).

    And without: latents of ``config.in_channels`` channels (:meth:`latent_channels`), LoRA
    files without a key prefix (a diffusers model's ``save_lora_adapter`` format).
    """

    label: str = "model"
    model_class: type | None = None
    tiny_config: Mapping[str, Any] = {}
    vae_class: type | None = None
    time_embedding: str | None = None
    summary_keys: tuple[str, ...] = ()
    shift_key: str = "shift"
    default_shift: float = 1.0
    attention_class: type = nn.Module
    supported: Mapping[str, Any] = {}
    conditions: Mapping[str, Shape] = {}
    missing_condition: type[Exception] = TypeError
    latent_multiple: int = 1

    def check_model(self, model: object) -> nn.Module:
        cls = self.model_class
        assert cls is not None, f"{type(self).__name__} declares no model_class"
        if not isinstance(model, cls):
            library = cls.__module__.split(".")[0]
            raise TypeError(
                f"transformer must be a {library} {cls.__name__}, got {type(model).__name__}"
            )
        found = self.config_summary(model, self.supported)
        if found != {k: _plain(v) for k, v in self.supported.items()}:
            raise ValueError(
                f"mfcore supports {self.label} transformers with {dict(self.supported)} only, "
                f"got {found}"
            )
        return model

    def latent_channels(self, model: nn.Module) -> int:
        return model.config.in_channels

    def interval_embedding(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        assert self.time_embedding is not None, f"{type(self).__name__} declares no time_embedding"
        embed = getattr(model, self.time_embedding)
        return diffusers_interval_embedding(embed.time_proj, embed.timestep_embedder), [embed]

    def tiny_model(self, seed: int, dtype: torch.dtype, guidance: bool) -> nn.Module:
        if guidance:
            raise ValueError(f"the tiny {self.label} has no guidance embedding")
        assert self.model_class is not None, f"{type(self).__name__} declares no model_class"
        torch.manual_seed(seed)
        return self.model_class(**self.tiny_config).to(dtype)

    def load_model(self, path: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
        model = load_transformer(path, self.model_class, self.label, dtype)
        return model, load_scheduler_config(path)

    def load_vae(self, path: str, dtype: torch.dtype) -> nn.Module | None:
        return None if self.vae_class is None else load_vae(path, self.vae_class, dtype)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, self.attention_class)]

    def native_student(self, transformer: nn.Module, **kwargs: Any) -> Any:
        raise ValueError(
            f"{self.label} models have no input for r of their own: r_embedding 'native' "
            "runs on HunyuanImage 2.1 only; use 'interval'"
        )

    def check_latents(self, model: nn.Module, z: object) -> Tensor:
        """``z`` if it is a floating ``(B, C, H, W)`` tensor with the model's ``C``, its
        ``H`` and ``W`` multiples of :attr:`latent_multiple`."""
        check_tensor("z", z)
        assert isinstance(z, Tensor)
        c, m = self.latent_channels(model), self.latent_multiple
        if z.ndim != 4 or z.shape[1] != c or z.shape[2] % m or z.shape[3] % m:
            raise ValueError(
                f"z must be latents (B, {c}, H, W) with {c} channels and a height and width "
                f"divisible by {m}, got shape {tuple(z.shape)}"
            )
        return z

    def condition_call(
        self,
        model: nn.Module,
        z: Tensor,
        cond: Mapping[str, Any],
        negative: bool,
        *,
        validate: bool = True,
    ) -> Call:
        """The :attr:`conditions` of one call, keyed by their declared names (and the
        negative prompt's when ``negative``), checked unless ``validate`` is False."""

        def prompt(tag: str) -> dict[str, Tensor]:
            return check_conditions(self.conditions, cond, z, model.config, tag=tag,
                                    label=self.label, missing=self.missing_condition,
                                    validate=validate)  # fmt: skip

        return Call(prompt(""), prompt("negative_") if negative else None)

    def check_data(self, shapes: Mapping[str, tuple[int, ...]], model: nn.Module) -> None:
        """Raise one ``ValueError`` listing what in a data folder's per-sample ``shapes``
        does not fit ``model``: the latents ``(C, H, W)`` and :attr:`conditions`."""
        c, m = self.latent_channels(model), self.latent_multiple
        channels, h, w = shapes["latents"]
        problems = [] if channels == c else [f"latents have {channels} channels, not {c}"]
        if h % m or w % m:
            problems.append(f"latents need a height and width divisible by {m}, got {h}x{w}")
        problems += data_problems(self.conditions, shapes, model.config)
        if problems:
            raise ValueError(f"this {self.label} takes no such data: " + "; ".join(problems))

    def config_summary(self, model: nn.Module, keys: Iterable[str] | None = None) -> dict[str, Any]:
        """The config entries ``keys`` (default ``summary_keys``), tuples as lists."""
        keys = self.summary_keys if keys is None else keys
        values = {k: config_value(model.config, k) for k in keys}
        return {k: _plain(v) for k, v in values.items()}

    def save_lora(self, directory: str, model: nn.Module, adapter_name: str) -> None:
        from mfcore.adapters.lora import save_lora

        save_lora(directory, model, adapter_name=adapter_name)

    def load_lora(self, directory: str, model: nn.Module, adapter_name: str) -> None:
        from mfcore.adapters.lora import load_lora

        load_lora(directory, model, adapter_name=adapter_name, prefix=None)

    def sampling_shift(
        self, height: int, width: int, scheduler: Mapping[str, Any] | None
    ) -> dict[str, float]:
        return {"shift": float((scheduler or {}).get(self.shift_key, self.default_shift))}

    def sampling_grid(
        self,
        steps: int,
        height: int,
        width: int,
        *,
        scheduler: Mapping[str, Any] | None = None,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Times ``(steps + 1,)`` from 1 to 0, shifted as :meth:`sampling_shift` says."""
        from mfcore.time import shifted_grid

        shift = self.sampling_shift(height, width, scheduler)
        return shifted_grid(steps, **shift, device=device, dtype=dtype)

    def shift_times(self, base: Any, height: int, width: int, scheduler: Mapping[str, Any]) -> Any:
        """The training time sampler: ``base`` shifted as :meth:`sampling_shift` says."""
        from mfcore.time import ResolutionShiftedTime, ShiftedTime

        shift = self.sampling_shift(height, width, scheduler)
        if "mu" in shift:
            return ResolutionShiftedTime(base, shift["mu"])
        return ShiftedTime(base, shift["shift"])


def _plain(value: Any) -> Any:
    """A config value as JSON holds it (tuples as lists)."""
    return list(value) if isinstance(value, tuple | list) else value


# name -> module that defines FAMILY
FAMILIES: dict[str, str] = {
    "flux": "mfcore.adapters.flux",
    "hunyuanimage2": "mfcore.adapters.hunyuanimage2",
    "hunyuanimage3": "mfcore.adapters.hunyuanimage3",
    "sd3": "mfcore.adapters.sd3",
}


def get_family(name: str) -> Family:
    """The family registered as ``name`` (``ValueError`` listing the names otherwise)."""
    check_choice("family", name, FAMILIES)
    return importlib.import_module(FAMILIES[name]).FAMILY


def _class_names(path: str) -> list[str]:
    names = []
    for sub in ("transformer", ""):
        config = os.path.join(path, sub, "config.json")
        if os.path.isfile(config):
            data = read_json(config, "model config")
            if not isinstance(data, dict):
                raise ValueError(f"model config {config} is not a JSON object")
            names.append(str(data.get("_class_name")))
            names.extend(str(a) for a in data.get("architectures") or [])
            names.append(str(data.get("model_type")))
    return names


def detect_family(path: str | os.PathLike) -> str:
    """The family of a local checkpoint, from its (transformer's) ``config.json``.

    Raises:
        FileNotFoundError: if the folder has no config.
        ValueError: if the config names no known family.
    """
    names = _class_names(str(path))
    if not names:
        raise FileNotFoundError(
            f"{path} is not a checkpoint folder: no config.json there or in transformer/"
        )
    for name in FAMILIES:
        if set(names) & set(get_family(name).class_names):
            return name
    found = [n for n in names if n != "None"]
    raise ValueError(
        f"{path} holds a {found[0] if found else 'unknown'} checkpoint, which is none of "
        f"the families {tuple(FAMILIES)} (FLUX, HunyuanImage 2.1 and 3.0, Stable Diffusion 3)"
    )
