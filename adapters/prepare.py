"""``mfcore-distill prepare``: prompts (a text file, or captioned images) -> a data folder.

Each non-empty line of the prompt file is one prompt; without one, the prompts are the
captions of an image folder in diffusers' ImageFolder convention (``metadata.jsonl`` with
``file_name`` and a caption column, or a ``.txt`` beside each image). The family encodes the
prompts with its own text encoders from the local diffusers checkpoint (FLUX: CLIP and T5;
HunyuanImage 2.1: Qwen2.5-VL and ByT5; HunyuanImage 3.0: the tokenizer's ids), through its
pipeline's own prompt encoding, and refuses a prompt longer than the encoder takes. The
latents come from the images of ``--images`` (captioned, or sorted by file name one per
prompt; each resized to cover ``--height x --width`` pixels with its aspect ratio, then
centre-cropped, never stretched; encoded with the checkpoint's VAE, normalised as the
pipeline normalises them) or, without images, from the teacher itself: ``--teacher-steps``
Euler steps of its (guided) ODE from seeded noise along the family's sampling grid.
Condition tensors are stored in ``--dtype`` (latents in fp32).

The output is the folder :class:`mfcore.adapters.data.LatentDataset` reads:
``samples-XXXXX.safetensors`` files of ``--per-file`` samples each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import PIL.Image
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mfcore._checks import check_choice, check_positive_int, check_real, cli_int
from mfcore.adapters._files import check_file, check_folder
from mfcore.adapters.data import LatentDataset
from mfcore.adapters.family import FAMILIES, TrainingFamily, detect_family, get_family
from mfcore.adapters.generation import seeded_noise, vae_scale_factor
from mfcore.adapters.loading import DTYPES
from mfcore.adapters.student import GUIDANCE_RULES, Teacher
from mfcore.solvers import sample_teacher

__all__ = [
    "PromptEncoder",
    "PipelinePromptEncoder",
    "PipelinePrompts",
    "read_prompts",
    "read_image_folder",
    "fit_image",
    "encode_images",
    "prepare",
    "add_prepare_parser",
    "run_prepare",
]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class PromptEncoder(Protocol):
    """A family's prompt encoding: prompts -> the condition tensors of its data samples.

    ``latent_size`` is the latent ``(H, W)`` the condition is made for (HunyuanImage 3.0's
    token sequence holds one ``<img>`` token per latent pixel); raises ``ValueError`` naming
    a prompt that is longer than the encoder takes.
    """

    def __call__(
        self, prompts: list[str], latent_size: tuple[int, int], negative: str | None
    ) -> dict[str, Tensor]: ...


class PipelinePrompts:
    """A family's :meth:`prompt_encoder` from its ``pipeline_class`` and its own
    ``encode_prompts(pipe, prompts, tag)`` and ``prompt_too_long(pipe, prompt)`` (as
    :class:`PipelinePromptEncoder` takes them); mixed in before
    :class:`~mfcore.adapters.family.FamilyBase`."""

    pipeline_class: type

    def prompt_encoder(self, path: str, dtype: torch.dtype) -> PipelinePromptEncoder:
        encode, too_long = self.encode_prompts, self.prompt_too_long  # type: ignore[attr-defined]
        return PipelinePromptEncoder(path, dtype, self.pipeline_class, encode, too_long)


class PipelinePromptEncoder:
    """A :class:`PromptEncoder` through a diffusers pipeline's own ``encode_prompt``.

    Loads only the pipeline's text encoders and tokenizers from the local checkpoint.

    Args:
        path: the diffusers pipeline folder (with ``model_index.json``).
        dtype: dtype of the text encoders.
        pipeline_cls: the family's pipeline class.
        encode: ``(pipe, prompts, tag) -> {tag + key: tensor}`` in the data's keys.
        too_long: ``(pipe, prompt) -> reason or None``: why a prompt exceeds the encoder.
    """

    def __init__(
        self,
        path: str,
        dtype: torch.dtype,
        pipeline_cls: type,
        encode: Callable[[Any, list[str], str], dict[str, Tensor]],
        too_long: Callable[[Any, str], str | None],
    ) -> None:
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(
                f"{path} is not a diffusers pipeline folder (no model_index.json): prepare "
                "needs its text encoders"
            )
        self.pipe = pipeline_cls.from_pretrained(
            path, transformer=None, vae=None, scheduler=None, torch_dtype=dtype
        )
        self.encode = encode
        self.too_long = too_long

    @torch.no_grad()
    def __call__(
        self, prompts: list[str], latent_size: tuple[int, int], negative: str | None
    ) -> dict[str, Tensor]:
        for i, prompt in enumerate(prompts):
            reason = self.too_long(self.pipe, prompt)
            if reason is not None:
                raise ValueError(f"prompt {i + 1} is too long: {reason}")
        out = self.encode(self.pipe, prompts, "")
        if negative is not None:
            out |= self.encode(self.pipe, [negative] * len(prompts), "negative_")
        return out


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a prompt file (``FileNotFoundError`` if it is missing,
    ``ValueError`` if it is a folder or holds none)."""
    with open(check_file(path, "prompt file"), encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (every line is empty)")
    return prompts


def _image_files(folder: str, count: int) -> list[str]:
    """The images of ``folder`` sorted by name, one for each of ``count`` prompts."""
    names = os.listdir(check_folder(folder, "image folder"))
    files = sorted(f for f in names if f.lower().endswith(_IMAGE_SUFFIXES))
    if len(files) != count:
        raise ValueError(f"image folder {folder} holds {len(files)} images for {count} prompts")
    return [os.path.join(folder, f) for f in files]


def _caption_row(line: str, caption_column: str) -> tuple[str, str] | None:
    """``file_name`` and the caption of a ``metadata.jsonl`` line; None unless the line is a
    JSON object holding both as strings."""
    with contextlib.suppress(json.JSONDecodeError):
        row = json.loads(line)
        if isinstance(row, dict):
            name, caption = row.get("file_name"), row.get(caption_column)
            if isinstance(name, str) and isinstance(caption, str):
                return name, caption
    return None


def _caption_file(folder: str, image: str) -> str:
    """The caption in the ``.txt`` beside ``image`` (``""`` if there is none)."""
    text = os.path.join(folder, os.path.splitext(image)[0] + ".txt")
    if not os.path.isfile(text):
        return ""
    with open(text, encoding="utf-8") as f:
        return f.read().strip()


def read_image_folder(
    folder: str | os.PathLike, caption_column: str = "text"
) -> tuple[list[str], list[str]]:
    """The images of ``folder`` and their captions, in the convention of diffusers'
    ImageFolder datasets: a ``metadata.jsonl`` whose lines hold ``file_name`` and
    ``caption_column``; without one, a ``.txt`` file beside each image (``cat.png`` and
    ``cat.txt``). Sorted by file name.

    Raises:
        FileNotFoundError: the folder, or an image that ``metadata.jsonl`` names, is missing.
        ValueError: a line of ``metadata.jsonl`` without the columns, images without a
            caption or with an empty one (naming them), or no image at all.
    """
    folder = check_folder(folder, "image folder")
    meta = os.path.join(folder, "metadata.jsonl")
    pairs: list[tuple[str, str]] = []
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = _caption_row(line, caption_column)
                if row is None:
                    raise ValueError(
                        f"{meta} line {n} is not a JSON object holding file_name and "
                        f"{caption_column!r} (--caption-column) as strings"
                    )
                path = check_file(os.path.join(folder, row[0]), f"{meta} line {n}: image")
                pairs.append((path, row[1].strip()))
    else:
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(_IMAGE_SUFFIXES):
                pairs.append((os.path.join(folder, name), _caption_file(folder, name)))
    pairs.sort(key=lambda pair: os.path.basename(pair[0]))
    if not pairs:
        raise ValueError(f"image folder {folder} holds no image ({', '.join(_IMAGE_SUFFIXES)})")
    empty = [os.path.basename(p) for p, c in pairs if not c]
    if empty:
        raise ValueError(
            f"images {empty[:3]} in {folder} have no caption or an empty one: give each image "
            "a .txt beside it, or a metadata.jsonl (file_name and a caption column), or --prompts"
        )
    return [p for p, _ in pairs], [c for _, c in pairs]


def fit_image(image: PIL.Image.Image, width: int, height: int) -> tuple[PIL.Image.Image, bool]:
    """``image`` resized (bicubic) until it covers ``width x height`` with its aspect ratio
    kept, then centre-cropped to it: never stretched. Also whether anything was cropped."""
    scale = max(width / image.width, height / image.height)
    w = max(width, round(image.width * scale))
    h = max(height, round(image.height * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), PIL.Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height)), (w, h) != (width, height)


@torch.no_grad()
def encode_images(
    vae: nn.Module, paths: list[str], height: int, width: int, generator: torch.Generator
) -> tuple[Tensor, int]:
    """VAE latents of images fitted to ``height x width`` pixels (:func:`fit_image`: resized,
    then centre-cropped), normalised as the pipelines do: ``(sample - shift_factor) *
    scaling_factor`` ``(N, C, H / f, W / f)``; and how many images were cropped."""
    pixels, cropped = [], 0
    for path in paths:
        image, crop = fit_image(PIL.Image.open(path).convert("RGB"), width, height)
        cropped += crop
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0))
    x = torch.stack(pixels).permute(0, 3, 1, 2)
    param = next(vae.parameters())
    out = []
    for xi in x.split(1):
        dist = vae.encode(xi.to(device=param.device, dtype=param.dtype)).latent_dist
        mean, std = dist.mean, dist.std
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        out.append((mean + std * noise).float().cpu())
    cfg = vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (torch.cat(out) - shift) * cfg.scaling_factor, cropped


def _teacher_latents(
    teacher: Teacher, cond: Mapping[str, Tensor], size: tuple[int, int], steps: int, seed: int
) -> Tensor:
    family, model = teacher.family, teacher.transformer
    n = next(iter(cond.values())).shape[0]
    noise = seeded_noise((n, family.latent_channels(model), *size), seed, "cpu", torch.float32)
    grid = family.sampling_grid(steps, *size)
    return sample_teacher(teacher, noise, steps, grid=grid, cond=dict(cond))


def prepare(
    model_path: str,
    prompts_file: str | None,
    output: str,
    *,
    family: str = "auto",
    images: str | None = None,
    caption_column: str = "text",
    height: int = 1024,
    width: int = 1024,
    negative_prompt: str | None = None,
    teacher_steps: int = 28,
    guidance_scale: float = 3.5,
    true_cfg_scale: float = 1.0,
    teacher_guidance: str = "cfg",
    apg_norm_threshold: float = 10.0,
    per_file: int = 16,
    dtype: str = "bf16",
    seed: int = 0,
) -> list[str]:
    """Write the data folder of ``prompts_file``, or of the captioned ``images`` (see the
    module docstring). Condition tensors are stored in ``dtype``, latents in fp32.

    Returns:
        the paths written.
    """
    name = detect_family(model_path) if family == "auto" else family
    fam: TrainingFamily = get_family(name)  # type: ignore[assignment]
    if prompts_file is None and images is None:
        raise ValueError("give --prompts, or --images with captions (or both)")
    files: list[str] | None = None
    if prompts_file is not None and caption_column != "text":
        logger.warning("--caption-column is unused: the prompts come from --prompts")
    if prompts_file is None:
        files, prompts = read_image_folder(images, caption_column)
    else:
        prompts = read_prompts(prompts_file)
        if images is not None:
            files = _image_files(images, len(prompts))
    per_file = check_positive_int("per_file", per_file)
    teacher_steps = check_positive_int("teacher_steps", teacher_steps)
    check_real("guidance_scale", guidance_scale)
    check_real("true_cfg_scale", true_cfg_scale, minimum=1.0)
    check_choice("teacher_guidance", teacher_guidance, GUIDANCE_RULES)
    check_real("apg_norm_threshold", apg_norm_threshold, minimum=0.0)
    torch_dtype = DTYPES[dtype]
    vae = fam.load_vae(model_path, torch_dtype)
    factor = vae_scale_factor(vae) if vae is not None else fam.vae_factor
    for label, n in (("height", height), ("width", width)):
        if check_positive_int(label, n) % factor:
            raise ValueError(f"{label} must be a multiple of the VAE's factor {factor}, got {n}")
    size = (height // factor, width // factor)
    encoder: PromptEncoder = fam.prompt_encoder(model_path, torch_dtype)
    negative = negative_prompt
    if negative is None and true_cfg_scale > 1:
        negative = ""  # two-pass CFG needs a negative prompt: the empty one, as the pipelines
    cond = encoder(prompts, size, negative)
    generator = torch.Generator().manual_seed(seed)
    if files is not None:  # --images
        if vae is None:
            raise FileNotFoundError(f"{model_path} has no vae/ to encode --images with")
        latents, cropped = encode_images(vae, files, height, width, generator)
        if cropped:
            logger.info("%d of %d images were centre-cropped to %d x %d after resizing",
                        cropped, len(files), width, height)  # fmt: skip
    else:
        model, _ = fam.load_model(model_path, torch_dtype)
        teacher = Teacher(
            model, fam, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
            rule=teacher_guidance, apg_norm_threshold=apg_norm_threshold,
        )  # fmt: skip
        latents = _teacher_latents(teacher, cond, size, teacher_steps, seed)
    os.makedirs(output, exist_ok=True)
    stale = sorted(f for f in os.listdir(output) if f.startswith("samples-"))
    if stale:  # an earlier prepare's files would mix with these
        logger.info("replacing the %d sample files already in %s", len(stale), output)
        for name in stale:
            os.remove(os.path.join(output, name))
    paths = []
    for i, start in enumerate(range(0, len(prompts), per_file)):
        part = {"latents": latents[start : start + per_file].float().contiguous()}
        for k, v in cond.items():
            v = v[start : start + per_file]
            part[k] = (v.to(torch_dtype) if v.is_floating_point() else v).cpu().contiguous()
        path = os.path.join(output, f"samples-{i:05d}.safetensors")
        save_file(part, path)
        paths.append(path)
    return paths


def add_prepare_parser(sub: Any, formatter: type) -> None:
    """Add the ``prepare`` subcommand to ``mfcore-distill``'s parser."""
    pr = sub.add_parser(
        "prepare",
        help="turn a prompt file (and images) into a data folder",
        formatter_class=formatter,
    )
    pr.add_argument("--model", required=True, help="local diffusers checkpoint folder")
    pr.add_argument(
        "--prompts",
        default=None,
        help="text file, one prompt a line; unset: the captions of --images",
    )
    pr.add_argument("--output", required=True, help="data folder to write")
    pr.add_argument(
        "--family", default="auto", help=f"auto (from the config) or one of {tuple(FAMILIES)}"
    )
    pr.add_argument(
        "--images",
        default=None,
        help="folder of images: with --prompts one per prompt, sorted by name; without, "
        "captioned as diffusers' ImageFolder (metadata.jsonl or a .txt per image). Each is "
        "resized to cover --height x --width, then centre-cropped. Unset: teacher samples",
    )
    pr.add_argument("--caption-column", default="text", help="metadata.jsonl's caption column")
    pr.add_argument("--height", type=cli_int, default=1024, help="image height in pixels")
    pr.add_argument("--width", type=cli_int, default=1024, help="image width in pixels")
    pr.add_argument(
        "--negative-prompt",
        default=None,
        help="negative prompt (written for two-pass CFG teachers)",
    )
    pr.add_argument(
        "--teacher-steps",
        type=cli_int,
        default=28,
        help="teacher ODE steps when there are no images",
    )
    pr.add_argument(
        "--guidance-scale",
        type=float,
        default=3.5,
        help="teacher's guidance input (guidance-distilled checkpoints)",
    )
    pr.add_argument(
        "--true-cfg-scale", type=float, default=1.0, help="teacher's two-pass CFG scale"
    )
    pr.add_argument(
        "--teacher-guidance",
        choices=GUIDANCE_RULES,
        default="cfg",
        help="how the teacher's two passes combine (as train's --teacher-guidance)",
    )
    pr.add_argument(
        "--apg-norm-threshold",
        type=float,
        default=10.0,
        help="with --teacher-guidance apg: the largest norm of the guidance direction",
    )
    pr.add_argument("--per-file", type=cli_int, default=16, help="samples per file")
    pr.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="bf16",
        help="dtype of the encoders, VAE and teacher",
    )
    pr.add_argument(
        "--seed", type=cli_int, default=0, help="seed of the VAE sampling and the teacher's noise"
    )


def run_prepare(args: dict[str, Any]) -> str:
    """Run ``prepare`` from parsed arguments; returns the line to print."""
    output, model = args.pop("output"), args.pop("model")
    if args["family"] == "auto":
        args["family"] = detect_family(model)
    paths = prepare(model, args.pop("prompts"), output, **args)
    data = LatentDataset(output, get_family(args["family"]))
    assert data.shapes is not None
    shape = " x ".join(map(str, data.shapes["latents"]))
    return (
        f"wrote {len(data)} samples ({data.family.label}, latents {shape}, conditions in "
        f"{args['dtype']}) in {len(paths)} files to {output}\n"
    )
