"""A trained student as a text-to-image pipeline, and ``mfcore-distill generate``.

:class:`MeanFlowPipeline` is shaped like a diffusers pipeline::

    pipe = MeanFlowPipeline.from_pretrained("FLUX.1-dev", student="run/student")
    images = pipe("a red cat", num_inference_steps=2, height=1024, width=1024).images

It encodes prompts with the base checkpoint's own text encoders (those ``prepare`` uses),
takes ``num_inference_steps`` MeanFlow steps ``z_r = z_t - (t - r) u(z_t, r, t)`` from seeded
noise along the family's sampling grid (:func:`~mfcore.adapters.generation.generate_latents`,
MeanFlow, arXiv 2505.13447, eq. 12) and decodes with the checkpoint's VAE. The same call
runs every family.

A base without a VAE (the ``--tiny`` random models; HunyuanImage 3.0, whose release VAE is
remote code) has one latent pixel per image pixel here, and its "images" are grey previews of
the latents (:func:`~mfcore.adapters.monitor.latents_to_images`); :attr:`MeanFlowPipeline.decoded`
says which. A base without text encoders (the tiny models) takes conditions, not prompts
(``cond=``, e.g. a data folder's).

``student`` is a run's exported ``student/`` folder, the run folder itself, or one of its
one-process checkpoints (``checkpoints/step-XXXXXXX``, with its EMA weights where it kept
them). Without ``base`` the run's own ``--model`` (or tiny model) is rebuilt from the
settings its checkpoints recorded.

Shapes: ``height`` and ``width`` are in pixels, multiples of :attr:`vae_scale_factor` times
the family's ``latent_multiple`` (2 for FLUX, which packs 2x2 latent patches; 1 otherwise);
latents are ``(B, C, H, W)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mfcore._checks import check_choice, check_instance, check_positive_int, check_real, cli_int
from mfcore.adapters._durable import read_json
from mfcore.adapters._files import check_folder
from mfcore.adapters._state import load_state, read_tensors
from mfcore.adapters.checkpoint_files import checkpoint_folders
from mfcore.adapters.data import LatentDataset
from mfcore.adapters.distill_config import check_device
from mfcore.adapters.ema import EMA
from mfcore.adapters.family import FAMILIES, TrainingFamily, detect_family, get_family
from mfcore.adapters.generation import decode_latents, generate_latents, vae_scale_factor
from mfcore.adapters.loading import DTYPES
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.monitor import latents_to_images
from mfcore.adapters.student import MeanFlowStudent, SharedWeightsStudent, load_student

__all__ = [
    "MeanFlowPipelineOutput",
    "MeanFlowPipeline",
    "add_generate_parser",
    "run_generate",
    "student_dtype",
    "add_student_arguments",
]

logger = logging.getLogger(__name__)

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# the subfolder a run exports its student to, and where it keeps its checkpoints
_STUDENT, _CHECKPOINTS = "student", "checkpoints"


@dataclass
class MeanFlowPipelineOutput:
    """What :class:`MeanFlowPipeline` returns: ``images`` (a list of PIL images, an array
    ``(B, H, W, 3)`` or a tensor ``(B, 3, H, W)``, by ``output_type``; the latents again for
    ``"latent"``) and the ``latents`` ``(B, C, H, W)`` at ``t = 0``."""

    images: Any
    latents: Tensor


@dataclass(frozen=True)
class _Source:
    """Where a student's weights are: an exported folder, or a one-process checkpoint; and
    the settings of the run that trained it (None when the folder is on its own)."""

    student: str | None
    checkpoint: str | None
    settings: dict[str, Any] | None


def _newest_settings(run: str) -> dict[str, Any] | None:
    for _, path in reversed(checkpoint_folders(os.path.join(run, _CHECKPOINTS))):
        config = os.path.join(path, "config.json")
        if os.path.isfile(config):
            return read_json(config, "checkpoint file")
    return None


def _locate(path: str | os.PathLike) -> _Source:
    """Resolve ``student`` (see the module docstring) to its weights and run settings."""
    path = check_folder(os.path.normpath(os.fspath(path)), "student folder")
    if os.path.isfile(os.path.join(path, "student.safetensors")):  # a checkpoint
        return _Source(None, path, read_json(os.path.join(path, "config.json"), "checkpoint file"))
    if os.path.isdir(os.path.join(path, _STUDENT)):  # a run folder
        return _Source(os.path.join(path, _STUDENT), None, _newest_settings(path))
    folders = checkpoint_folders(os.path.join(path, _CHECKPOINTS))
    if folders:  # a run folder that has not exported yet: its newest checkpoint
        newest = folders[-1][1]
        if not os.path.isfile(os.path.join(newest, "student.safetensors")):
            raise ValueError(
                f"{newest} is a multi-process checkpoint, which generate cannot read: let the "
                "run finish (it exports student/) or give a one-process checkpoint"
            )
        return _locate(newest)
    return _Source(path, None, _newest_settings(os.path.dirname(path)))


def _family_of(source: _Source, base: str | None, family: str) -> str:
    if family != "auto":
        return check_choice("family", family, FAMILIES)
    if base is not None:
        return detect_family(base)
    if source.student is not None:  # the student's own config names its family
        if _is_arcflow(source.student):
            return "flux"
        for name in FAMILIES:
            fam = get_family(name)
            if os.path.isfile(os.path.join(source.student, fam.student_config_name)):
                return name
    assert source.settings is not None  # (checked by the caller)
    return source.settings.get("family", "flux")


def _is_arcflow(folder: str) -> bool:
    from mfcore.adapters.flux_arcflow import ARCFLOW_CONFIG_NAME

    return os.path.isfile(os.path.join(folder, ARCFLOW_CONFIG_NAME))


def _load_folder_student(
    transformer: nn.Module, folder: str, family: TrainingFamily
) -> SharedWeightsStudent:
    """The student saved in ``folder``: a MeanFlow student, or an ArcFlow one."""
    if _is_arcflow(folder):
        from mfcore.adapters.flux_arcflow import FluxArcFlowStudent

        return FluxArcFlowStudent.from_pretrained(transformer, folder)
    return load_student(transformer, folder, family)


def _load_checkpoint_student(
    transformer: nn.Module, family: TrainingFamily, folder: str, settings: dict[str, Any]
) -> SharedWeightsStudent:
    """A student built with a checkpoint's settings and loaded with its weights: the EMA's
    where the run kept one (as its export would be), else the trained ones."""
    lora = LoraSpec(rank=settings["lora_rank"], alpha=settings.get("lora_alpha"))
    guidance = settings.get("guidance_scale", 3.5)
    student: SharedWeightsStudent
    if settings.get("student", "meanflow") == "arcflow":
        from mfcore.adapters.flux_arcflow import FluxArcFlowStudent

        student = FluxArcFlowStudent(
            transformer, num_components=settings["arc_components"], lora=lora,
            guidance_scale=guidance,
        )  # fmt: skip
    elif settings.get("r_embedding") == "native":
        student = family.native_student(transformer, lora=lora, guidance_scale=guidance)
    else:
        student = MeanFlowStudent(transformer, family, lora=lora, guidance_scale=guidance)
    student.load_trainable_state_dict(read_tensors(os.path.join(folder, "student.safetensors")))
    state = load_state(os.path.join(folder, "state"))
    if state.get("ema") is not None:
        ema = EMA(student.trainable_parameters())
        ema.load_state_dict(state["ema"])
        ema.copy_to_params()
    return student


class MeanFlowPipeline:
    """A few-step student with its base's VAE and prompt encoding.

    Args:
        student: the trained student (its transformer on the device it runs on): a
            :class:`~mfcore.adapters.student.MeanFlowStudent`, or an ArcFlow one
            (:class:`~mfcore.adapters.flux_arcflow.FluxArcFlowStudent`, sampled by its
            mixture's closed-form steps).
        vae: the base checkpoint's VAE, or None (latent previews instead of images).
        prompt_encoder: the base's prompt encoding
            (:class:`~mfcore.adapters.prepare.PromptEncoder`), or None (``cond=`` only).
        scheduler: the base's scheduler config (the family's sampling grid reads its shift).
        default_size: ``(height, width)`` in pixels when a call gives none
            (:meth:`from_pretrained`: the size the run trained at, where its data is found).
    """

    def __init__(
        self,
        student: SharedWeightsStudent,
        *,
        vae: nn.Module | None = None,
        prompt_encoder: Any = None,
        scheduler: Mapping[str, Any] | None = None,
        default_size: tuple[int, int] = (1024, 1024),
    ) -> None:
        what = "a MeanFlowStudent (or an ArcFlow student)"
        check_instance("student", student, SharedWeightsStudent, what)
        self.student = student
        self.family: TrainingFamily = student.family  # type: ignore[assignment]
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.scheduler = dict(scheduler or {})
        self.default_size = default_size

    @property
    def decoded(self) -> bool:
        """Whether images are decoded by a VAE (else they are previews of the latents)."""
        return self.vae is not None

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (1 without a VAE)."""
        return vae_scale_factor(self.vae) if self.vae is not None else 1

    @property
    def device(self) -> torch.device:
        return next(self.student.transformer.parameters()).device

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | None = None,
        *,
        student: str | os.PathLike,
        family: str = "auto",
        torch_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> MeanFlowPipeline:
        """Load ``base`` (a local diffusers checkpoint folder; None: the run's own model) with
        the student ``student`` (see the module docstring).

        Raises:
            FileNotFoundError: when ``student`` or ``base`` does not exist, or no base can be
                found (a student folder outside its run, and no ``base``).
            ValueError: when the student was trained on another model or family.
        """
        source = _locate(student)
        if base is None and source.settings is None:
            raise FileNotFoundError(
                f"{student} has no run settings beside it to find its base model: give --model "
                "(base=), the checkpoint folder it was trained on"
            )
        name = _family_of(source, None if base is None else os.fspath(base), family)
        fam: TrainingFamily = get_family(name)  # type: ignore[assignment]
        vae = encoder = None
        scheduler: dict[str, Any] = {}
        if base is None and source.settings and source.settings.get("tiny"):
            s = source.settings
            transformer = fam.tiny_model(s["seed"], torch_dtype, s.get("tiny_guidance", False))
        else:
            path = os.fspath(base) if base is not None else source.settings["model"]
            transformer, scheduler = fam.load_model(path, torch_dtype)
            vae = fam.load_vae(path, torch_dtype)
            encoder = _LazyEncoder(fam, path, torch_dtype, device)
        if source.checkpoint is not None:
            model = _load_checkpoint_student(transformer, fam, source.checkpoint, source.settings)
        else:
            model = _load_folder_student(transformer, source.student, fam)
        model.eval().to(device)
        if vae is not None:
            vae.to(device)
        pipe = cls(model, vae=vae, prompt_encoder=encoder, scheduler=scheduler)
        data = (source.settings or {}).get("data")
        if data and os.path.isdir(data):  # the size the student was trained at
            with contextlib.suppress(ValueError, FileNotFoundError):
                _, h, w = LatentDataset(data, fam).shapes["latents"]
                pipe.default_size = (h * pipe.vae_scale_factor, w * pipe.vae_scale_factor)
        return pipe

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.vae_scale_factor
        step = factor * getattr(self.family, "latent_multiple", 1)
        for name, n in (("height", height), ("width", width)):
            if check_positive_int(name, n) % step:
                raise ValueError(
                    f"{name} must be a multiple of {step} pixels (the VAE's factor {factor} "
                    f"times the latent multiple {step // factor} of {self.family.label}), got {n}"
                )
        return height // factor, width // factor

    def encode_prompt(
        self, prompt: str | Sequence[str], *, height: int | None = None, width: int | None = None
    ) -> dict[str, Tensor]:
        """The condition of ``prompt`` for an image of ``height x width`` pixels (default
        :attr:`default_size`)."""
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        if self.prompt_encoder is None:
            raise ValueError(
                "this pipeline's base has no text encoders (a tiny random model): give --data "
                "(cond=), a data folder's conditions, instead of a prompt"
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a list of them")
        cond = self.prompt_encoder(prompts, self._latent_size(height, width), None)
        return {k: v.to(self.device) for k, v in cond.items()}

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        cond: Mapping[str, Tensor] | None = None,
        num_inference_steps: int = 1,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        guidance_scale: float | None = None,
        output_type: str = "pil",
    ) -> MeanFlowPipelineOutput:
        """Generate ``height x width`` images in ``num_inference_steps`` student steps.

        Args:
            prompt: a prompt or a list of them; or None with ``cond``.
            cond: the family's condition tensors ``(B, ...)`` (as in a data folder), in
                place of ``prompt``.
            num_inference_steps: student steps (1, 2, 4, ...).
            height: image height in pixels (default :attr:`default_size`'s).
            width: image width in pixels (likewise).
            seed: seed of the initial noise (drawn on the CPU: the same latents on any
                device).
            guidance_scale: the guidance input of a guidance-distilled base (FLUX.1-dev);
                default the scale the student was trained at.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        """
        check_choice("output_type", output_type, _OUTPUT_TYPES)
        if (prompt is None) == (cond is None):
            raise ValueError("give exactly one of prompt and cond")
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        h, w = self._latent_size(height, width)
        if cond is None:
            cond = self.encode_prompt(prompt, height=height, width=width)
        cond = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in cond.items()}
        student = self.student
        trained_at = student.guidance_scale
        if guidance_scale is not None:
            student.guidance_scale = check_real("guidance_scale", guidance_scale)
        try:
            latents = generate_latents(
                student, cond, height=h, width=w, steps=num_inference_steps, seed=seed,
                scheduler=self.scheduler,
            )  # fmt: skip
        finally:
            student.guidance_scale = trained_at
        if output_type == "latent":
            images: Any = latents
        elif self.vae is not None:
            images = decode_latents(self.vae, latents, output_type=output_type)
        else:
            images = _previews(latents, output_type)
        return MeanFlowPipelineOutput(images=images, latents=latents)


def _previews(latents: Tensor, output_type: str) -> Any:
    previews = latents_to_images(latents)
    if output_type == "pil":
        return previews
    import numpy as np

    array = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255 for im in previews])
    return array if output_type == "np" else torch.from_numpy(array).permute(0, 3, 1, 2)


class _LazyEncoder:
    """The base's prompt encoding, loaded on the first prompt (a run from ``cond`` alone
    never loads the text encoders)."""

    def __init__(
        self, family: TrainingFamily, path: str, dtype: torch.dtype, device: Any = None
    ) -> None:
        self.family, self.path, self.dtype, self.device = family, path, dtype, device
        self._encoder: Any = None

    def __call__(self, prompts: list[str], size: tuple[int, int], negative: str | None) -> dict:
        if self._encoder is None:
            self._encoder = self.family.prompt_encoder(self.path, self.dtype)
            pipe = getattr(self._encoder, "pipe", None)  # a diffusers pipeline's encoders
            if pipe is not None and self.device is not None:
                pipe.to(self.device)
        return self._encoder(prompts, size, negative)


# --------------------------------------------------------------------------- command line


def add_student_arguments(parser: Any, dtype_help: str) -> None:
    """``--student``, ``--model`` and ``--dtype``: which trained student, on which base, in
    which dtype (``generate`` and ``export`` take them alike)."""
    parser.add_argument(
        "--student",
        required=True,
        help="a run's student/ folder, the run folder, or one of its checkpoints",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the base checkpoint folder; unset: the run's own (its --model or tiny model)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help=f"{dtype_help}; unset: the run's --weights-dtype, else bf16",
    )


def add_generate_parser(sub: Any, formatter: type) -> None:
    """Add the ``generate`` subcommand to ``mfcore-distill``'s parser."""
    ge = sub.add_parser(
        "generate",
        help="images from a trained student, from prompts or a data folder's conditions",
        formatter_class=formatter,
    )
    add_student_arguments(ge, "dtype of the base weights")
    ge.add_argument("--family", default="auto", choices=("auto", *FAMILIES), help="model family")
    source = ge.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    source.add_argument("--prompts", default=None, help="text file, one prompt a line")
    source.add_argument(
        "--data", default=None, help="a data folder: generate for its first --count conditions"
    )
    ge.add_argument("--count", type=cli_int, default=4, help="--data: conditions to use")
    ge.add_argument(
        "--steps", type=cli_int, nargs="+", default=[1, 2, 4], help="student steps per image"
    )
    ge.add_argument("--seed", type=cli_int, default=0, help="seed of the initial noise")
    ge.add_argument(
        "--height", type=cli_int, default=None, help="image height in pixels; unset: the "
        "size the run trained at (its data's, or --data's), else 1024",
    )  # fmt: skip
    ge.add_argument("--width", type=cli_int, default=None, help="image width (as --height)")
    ge.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="guidance input of a guidance-distilled base; unset: the student's own",
    )
    ge.add_argument("--output", required=True, help="folder for the PNGs and settings.json")
    ge.add_argument(
        "--device", default="auto", help="torch device; auto: CUDA when there is one, else CPU"
    )


def student_dtype(student: str | os.PathLike) -> str:
    """The ``--weights-dtype`` of the run that trained ``student`` (bf16 when unknown)."""
    settings = _locate(student).settings or {}
    return settings.get("weights_dtype", "bf16")


def _conditions(args: dict[str, Any], pipe: MeanFlowPipeline) -> tuple[list[str], dict | None]:
    """The prompts (or data rows) to generate for, and the data's conditions if any."""
    if args["data"] is None:
        if args["prompts"] is not None:
            from mfcore.adapters.prepare import read_prompts

            return read_prompts(args["prompts"]), None
        return list(args["prompt"]), None
    data = LatentDataset(args["data"], pipe.family)
    count = min(check_positive_int("count", args["count"]), len(data))
    x, cond = data.take(list(range(count)), "cpu")
    if args["height"] is None and args["width"] is None:
        args["height"] = x.shape[-2] * pipe.vae_scale_factor
        args["width"] = x.shape[-1] * pipe.vae_scale_factor
    return [f"data sample {i}" for i in range(count)], cond


def run_generate(args: dict[str, Any]) -> str:
    """Run ``generate`` from parsed arguments: ``<output>/<index>-<steps>step.png`` per
    prompt and step count, ``latents.safetensors`` and ``settings.json``; returns the line
    to print."""
    steps = list(dict.fromkeys(check_positive_int("steps", s) for s in args["steps"]))
    check_device(args["device"])
    if args["device"] == "auto":
        args["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if args["dtype"] is None:
        args["dtype"] = student_dtype(args["student"])
    pipe = MeanFlowPipeline.from_pretrained(
        args["model"], student=args["student"], family=args["family"],
        torch_dtype=DTYPES[args["dtype"]], device=args["device"],
    )  # fmt: skip
    labels, cond = _conditions(args, pipe)
    height = args["height"] if args["height"] is not None else pipe.default_size[0]
    width = args["width"] if args["width"] is not None else pipe.default_size[1]
    out = args["output"]
    os.makedirs(out, exist_ok=True)
    if not pipe.decoded:
        logger.warning("%s has no VAE: the PNGs are grey previews of the latents",
                       args["model"] or "the run's model")  # fmt: skip
    latents = {}
    for k in steps:
        kwargs = dict(num_inference_steps=k, height=height, width=width, seed=args["seed"],
                      guidance_scale=args["guidance_scale"])  # fmt: skip
        if cond is not None:
            result = pipe(cond=cond, **kwargs)
        else:
            result = pipe(labels, **kwargs)
        latents[f"{k}step"] = result.latents.float().cpu().contiguous()
        for i, image in enumerate(result.images):
            image.save(os.path.join(out, f"{i:03d}-{k}step.png"))
    save_file(latents, os.path.join(out, "latents.safetensors"))
    settings = dict(args) | {"height": height, "width": width, "family": pipe.family.name}
    settings |= {"decoded": pipe.decoded, "images": labels}
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
    return f"wrote {len(labels) * len(steps)} images ({len(labels)} x steps {steps}) to {out}\n"
