"""``mfcore-distill``'s command line: ``train``, ``prepare``, ``make-data``, ``generate`` and
``export`` (:mod:`mfcore.adapters.distill` trains; the other commands have modules of their
own).

Bad input ends with an argparse usage error that names what is wrong, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from mfcore._checks import cli_int
from mfcore.adapters.alignment import CRITICS
from mfcore.adapters.arcflow_objective import STUDENTS
from mfcore.adapters.data import LatentDataset, make_synthetic_data
from mfcore.adapters.distill import distill
from mfcore.adapters.distill_config import DTYPES, SWITCHES, DistillConfig
from mfcore.adapters.export import add_export_parser, run_export
from mfcore.adapters.family import FAMILIES, get_family
from mfcore.adapters.loading import resolve_model
from mfcore.adapters.monitor import REPORTERS
from mfcore.adapters.parallel import (
    MODES,
    leave,
)
from mfcore.adapters.pipeline import add_generate_parser, run_generate
from mfcore.adapters.prepare import add_prepare_parser, run_prepare
from mfcore.adapters.run_checkpoints import saved_settings
from mfcore.adapters.student import GUIDANCE_RULES, R_EMBEDDINGS, Teacher
from mfcore.jvp import JVP_METHODS
from mfcore.solvers import ODE_METHODS

__all__ = ["HELP", "DESCRIPTION", "build_parser", "main"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- command line

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter

DESCRIPTION = (
    "Distil a FLUX, HunyuanImage or Stable Diffusion 3 checkpoint into a few-step MeanFlow (or "
    "ArcFlow) student, "
    "and make images with it. train: distil; prepare: prompts (or captioned images) to a "
    "data folder; make-data: a random data folder; generate: images from a student; export: "
    "a --r-embedding native student as a stock diffusers transformer."
)

#: The help text of every ``train`` flag (the parser adds each default).
HELP: dict[str, str] = {
    "family": "model family; auto detects it from the checkpoint's config (--tiny: flux)",
    "tiny_guidance": "give the --tiny model a guidance embedding (guidance-distilled)",
    "steps": "optimiser steps in total (a resumed run continues up to it)",
    "batch_size": "samples per step (the global batch, over every rank)",
    "lr": "AdamW learning rate of the student's LoRA and interval embedding",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this (inf: no clipping)",
    "lora_rank": "rank of the student's LoRA updates",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / rank); unset: rank",
    "guidance_scale": "guidance input of a guidance-distilled teacher",
    "true_cfg_scale": "two-pass guidance scale of the teacher (1: off; needs negative "
    "prompts in the data)",
    "teacher_guidance": "how the teacher's two passes combine: cfg (classifier-free) or apg "
    "(adaptive projected guidance without momentum, eta 0: HunyuanImage 2.1's release guides "
    "with it after its first steps)",
    "apg_norm_threshold": "with --teacher-guidance apg: the largest norm of the guidance "
    "direction per sample (0: none; the 2.1 release's: 10)",
    "switch": "when to leave the discrete warm-up target: never (the toys and digits found "
    "no recipe where leaving it pays), gated (once the targets agree, not before "
    "--warmup-steps), or fixed (at --warmup-steps, the paper's schedule)",
    "warmup_steps": "steps of the discrete (teacher-ODE) warm-up target at least",
    "warmup_threshold": "also switch once the warm-up fit error falls below this",
    "warmup_ode_steps": "teacher ODE steps of the warm-up target",
    "warmup_ode_method": "ODE method of the warm-up target",
    "signal_every": "measure the targets' agreement (gate and guard) every N steps",
    "gate_delta": "gate: the targets' relative disagreement must fall below this",
    "gate_rho": "gate: the differential/discrete error ratio must fall below this",
    "gate_patience": "gate: measurements in a row that must pass",
    "guard": "revert to the warm-up target if the differential target diverges",
    "guard_margin": "guard: relative rise of the held-out error that counts as a failure",
    "guard_patience": "guard: failures in a row before reverting",
    "rollback": "on a revert, also restore the weights, optimiser and EMA saved at the switch",
    "jvp": "how du/dt is taken: func (forward AD), autograd (double backward) or fd",
    "single_forward": "take du/dt and the loss's forward in one pass (no checkpointing then)",
    "equal_fraction": "fraction of (r, t) pairs with r = t (flow matching)",
    "grid_fraction": "fraction of (r, t) pairs that are intervals of the 1-, 2- and 4-step "
    "sampling grids (the maps a few-step student is used for)",
    "time_mean": "mean of the logit-normal time sampler",
    "time_std": "standard deviation of the logit-normal time sampler",
    "shift_times": "shift the sampled times as the family's schedule shifts",
    "adaptive_p": "power p of MeanFlow's adaptive loss weight (ArcFlow's too)",
    "student": "meanflow: the average velocity u(z, r, t) (the seed method); arcflow: "
    "ArcFlow's momentum mixture on FLUX (arXiv 2602.09014; one process; --warmup-steps is its "
    "teacher-mixing phase; the target, switch, guard and alignment settings do not apply)",
    "r_embedding": "how the student takes r: interval (mfcore's zero-initialised embedding of "
    "t - r; the student starts equal to the teacher for every r) or native (HunyuanImage 2.1 "
    "only: diffusers' use_meanflow branch, e_r copied from e, so it starts equal only at r = t; "
    "`export` then writes a transformer the stock HunyuanImagePipeline runs)",
    "arc_components": "--student arcflow: momentum components K",
    "arc_steps": "--student arcflow: steps of the rollout it is trained on (its NFE)",
    "align": "trajectory alignment critic: none, fake (velocity) or meanflow",
    "align_weight": "weight lambda of the alignment loss",
    "align_steps": "student steps of the aligned trajectory",
    "align_start": "first step with critic updates",
    "critic_lead": "critic-only steps before the student feels the alignment",
    "critic_updates": "critic updates per student update",
    "critic_lr": "AdamW learning rate of the critic's LoRA",
    "critic_rank": "rank of the critic's LoRA",
    "critic_ode_steps": "Heun steps of the mean-flow critic's transports",
    "checkpoint_every": "write a checkpoint every N steps",
    "keep_checkpoints": "checkpoints to keep (the newest; an older one goes only once its "
    "successor reads back whole)",
    "resume": "continue a run with its saved settings (flags given again override those a "
    "resume may change): 'latest' (alone: --resume) takes the newest checkpoint in --output "
    "that reads back whole, a corrupt newer one skipped with a warning; a run folder, its "
    "newest; a checkpoint folder (RUN/checkpoints/step-N), that one, and RUN is the output",
    "allow_data_change": "with --resume, go on (with a warning) when the data folder's files "
    "differ from the checkpoint's record",
    "seed": "seed of the model init (--tiny), data order, noise and times",
    "device": "auto (cuda if available), cpu, cuda, cuda:1, ...",
    "weights_dtype": "dtype of the frozen base weights (trained weights are fp32)",
    "autocast": "bf16 autocast on CUDA",
    "gradient_checkpointing": "recompute blocks in the backward to save memory",
    "parallel": "multi-process engine under torchrun: ddp (weights replicated), fsdp "
    "(FSDP2, sharded), none (one process) or auto (ddp when the weights take at most a "
    "quarter of one device's memory, else fsdp; none without torchrun)",
    "micro_batch_size": "samples per rank per forward; gradients accumulate over the "
    "batch_size / (world size x micro_batch_size) micro-batches of a step; unset: the "
    "rank's whole share, batch_size / world size",
    "ema": "keep an EMA of the trained weights (used for previews and the exported student)",
    "ema_decay": "EMA decay (warmed up as min(decay, (1 + n) / (10 + n)))",
    "validation_prompts": "a prompt file (one a line) for the previews, encoded by --model's "
    "text encoders; unset: the data's first two conditions",
    "preview_every": "every N steps (0: never) write previews/step-N.png: per preview sample, "
    "the teacher's 28-step sample and the student's 1-, 2- and 4-step ones from its noise",
    "report_to": "where metrics and previews go besides metrics.jsonl and previews/: "
    "tensorboard (<output>/tensorboard, when it is installed), wandb (offline unless "
    "WANDB_MODE says otherwise; needs pip install wandb) or none",
    "progress": "show a progress bar",
}


# The type of the flags whose default is None.
_OPTIONAL = {
    "lora_alpha": float,
    "warmup_threshold": float,
    "micro_batch_size": cli_int,
    "validation_prompts": str,
}
# the settings with a fixed set of values: argparse lists them in --help and refuses others
_CHOICES: dict[str, tuple[str, ...]] = {
    "family": ("auto", *FAMILIES),
    "student": STUDENTS,
    "r_embedding": R_EMBEDDINGS,
    "teacher_guidance": GUIDANCE_RULES,
    "report_to": REPORTERS,
    "switch": SWITCHES,
    "warmup_ode_method": ODE_METHODS,
    "jvp": JVP_METHODS,
    "align": ("none", *CRITICS),
    "weights_dtype": tuple(DTYPES),
    "parallel": MODES,
}
# (a parser whose every train default is this tells which flags the command line gave)
_NOT_GIVEN = object()


def _add_train(sub: Any, given_only: bool = False) -> None:
    tr = sub.add_parser(
        "train", help="distil a checkpoint into a MeanFlow student", formatter_class=_FORMATTER
    )
    unset = {"default": _NOT_GIVEN} if given_only else {}
    src = tr.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        help="local diffusers checkpoint folder (pipeline or transformer); this or --tiny "
        "(with --resume: the run's own)",
        **unset,
    )
    src.add_argument("--tiny", action="store_true", help="a random tiny model (tests, smoke runs)",
                     **unset)  # fmt: skip
    tr.add_argument("--data", help="folder of *.safetensors samples (with --resume: the run's "
                    "own)", **unset)  # fmt: skip
    tr.add_argument("--output", help="run folder (checkpoints, metrics, student); required "
                    "unless --resume names the run", **unset)  # fmt: skip
    tr.add_argument("--resume", nargs="?", const="latest", metavar="latest|PATH",
                    default=_NOT_GIVEN if given_only else None, help=HELP["resume"])  # fmt: skip
    defaults = DistillConfig(data="", output="", tiny=True)
    for field in dataclasses.fields(DistillConfig):
        if field.name in ("data", "output", "model", "tiny", "resume", "resume_from"):
            continue
        flag = "--" + field.name.replace("_", "-")
        value = getattr(defaults, field.name)
        kw: dict[str, Any] = {"default": _NOT_GIVEN if given_only else value}
        kw["help"] = HELP[field.name]
        if field.name in _CHOICES:
            kw["choices"] = _CHOICES[field.name]
        if isinstance(value, bool):
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif field.name in _OPTIONAL:
            tr.add_argument(flag, type=_OPTIONAL[field.name], **kw)
        else:
            kind = cli_int if isinstance(value, int) else type(value)
            tr.add_argument(flag, type=kind, **kw)


def _add_make_data(sub: Any) -> None:
    md = sub.add_parser(
        "make-data", help="write a synthetic data folder", formatter_class=_FORMATTER
    )
    md.add_argument("folder", help="output folder")
    md.add_argument("--family", default="flux", help=f"whose data: one of {tuple(FAMILIES)}")
    md.add_argument(
        "--tiny",
        action="store_true",
        help="data for train --tiny: sizes it would refuse are an error even with other widths "
        "(without it they are an error only with the tiny model's widths, else a warning)",
    )
    sizes = {
        "num_files": (2, "files to write"),
        "per_file": (2, "samples per file"),
        "channels": (None, "latent channels; unset: the tiny model's"),
        "height": (8, "latent height"),
        "width": (8, "latent width"),
        "seq_len": (8, "prompt length in tokens"),
    }
    for name, (value, text) in sizes.items():
        md.add_argument("--" + name.replace("_", "-"), type=cli_int, default=value, help=text)
    for name in ("joint_attention_dim", "pooled_projection_dim", "text_embed_dim", "vocab_size"):
        md.add_argument(
            "--" + name.replace("_", "-"),
            type=cli_int,
            default=None,
            help=f"the condition's {name}; unset: the family's tiny model's",
        )
    md.add_argument("--negatives", action="store_true", help="also write negative prompts")
    md.add_argument("--seed", type=cli_int, default=0, help="seed of the random values")


def build_parser(prog: str = "mfcore-distill", given_only: bool = False) -> argparse.ArgumentParser:
    """The ``train``, ``prepare``, ``make-data``, ``generate`` and ``export`` command line
    (``given_only``: every ``train`` default a marker, to tell which flags a command line
    gives)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub, given_only)
    add_prepare_parser(sub, _FORMATTER)
    _add_make_data(sub)
    add_generate_parser(sub, _FORMATTER)
    add_export_parser(sub, _FORMATTER)
    return parser


def _check_trainable(args: dict[str, Any], tiny: bool) -> None:
    """Refuse ``make-data`` sizes that ``train --tiny`` would refuse: one sample of them goes
    through the data checks and one call of the family's tiny teacher first.

    Sizes for the tiny model (its channels and condition widths, or ``--tiny``) that fail
    are a ``ValueError``; other widths are for another model, so the failure only warns.
    """
    family = get_family(args.get("family", "flux"))
    dry = {**args, "num_files": 1, "per_file": 1, "negatives": False}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            make_synthetic_data(tmp, **dry)
            data = LatentDataset(tmp, family)
            model = family.tiny_model(0, torch.float32, False)
            data.check_transformer(model)
            x, cond = data.batch(0, 1, 0, "cpu")
            with torch.no_grad():
                Teacher(model, family)(x, torch.full((1,), 0.5), **cond)
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        widths = set(args) & {"channels", *family.tiny_dims}
        if tiny or not widths:
            raise ValueError(
                f"make-data: train --tiny would refuse {family.label} data of these sizes: {reason}"
            ) from None
        logger.warning("train --tiny would refuse this data (%s); fine for a model of these "
                       "widths (%s)", reason, ", ".join(sorted(widths)))  # fmt: skip


def _make_data(args: dict[str, Any]) -> str:
    tiny = args.pop("tiny")
    folder = args.pop("folder")
    args = {k: v for k, v in args.items() if v is not None}
    _check_trainable(args, tiny)
    paths = make_synthetic_data(folder, **args)
    return f"wrote {len(paths)} files to {folder}\n"


def resume_target(value: str, output: str | None) -> tuple[str, str | None]:
    """``--resume``'s run folder and checkpoint (``None``: its newest) from ``value``
    (``latest``, a run folder or one of its checkpoint folders) and ``--output``."""
    if value == "latest":
        if output is None:
            raise ValueError("--resume latest needs --output (the run folder)")
        return output, None
    if os.path.isdir(os.path.join(value, "checkpoints")):
        run, point = value, None
    elif os.path.isfile(os.path.join(value, "config.json")) and (
        os.path.basename(os.path.dirname(os.path.abspath(value))) == "checkpoints"
    ):
        run, point = os.path.dirname(os.path.dirname(os.path.abspath(value))), value
    else:
        raise FileNotFoundError(
            f"--resume {value}: neither a run folder (with checkpoints/) nor one of its "
            "checkpoints (RUN/checkpoints/step-N with its config.json)"
        )
    if output is not None and os.path.realpath(output) != os.path.realpath(run):
        raise ValueError(f"--resume {value} is a checkpoint of {run}, not of --output {output}")
    return run, point


def _train_settings(args: dict[str, Any], argv: Sequence[str] | None, prog: str) -> dict:
    """The settings of ``train``: the command line's; with ``--resume``, the run's saved
    settings with the flags the command line gave on top (a changed setting that a resume
    may not change is then refused by name, as any)."""
    if args["resume"] is None:
        needs = {
            "--data": args["data"] is None,
            "--model or --tiny": args["model"] is None and not args["tiny"],
            "--output (the run folder)": args["output"] is None,
        }
        missing = [flag for flag, absent in needs.items() if absent]
        if missing:
            raise ValueError(f"train needs {'; '.join(missing)}")
        return {**args, "resume": False}
    output, point = resume_target(args["resume"], args["output"])
    given_parser = build_parser(prog, given_only=True)
    given = vars(given_parser.parse_args(sys.argv[1:] if argv is None else argv))
    given = {k: v for k, v in given.items() if v is not _NOT_GIVEN and k != "command"}
    if given.get("model") is not None:  # as main resolved the parsed one
        given["model"] = resolve_model(given["model"])
    path, saved = saved_settings(output, point)
    if "model" in given or "tiny" in given:  # one source of the model: the given one
        saved.pop("model"), saved.pop("tiny")
    merged = {**saved, **given, "output": output, "resume": True, "resume_from": point}
    merged.setdefault("model", None)
    merged.setdefault("tiny", False)
    logger.info(
        "resuming with the settings of %s%s", path,
        f"; given: {', '.join(sorted(set(given) - {'resume', 'output'}))}" if given else "",
    )  # fmt: skip
    return merged


def main(argv: Sequence[str] | None = None, *, prog: str = "mfcore-distill") -> int:
    """Entry point; bad input ends with an argparse error naming what is wrong."""
    parser = build_parser(prog)
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    done = False
    try:
        if args.get("model") is not None:
            args["model"] = resolve_model(args["model"])
        if command == "make-data":
            sys.stdout.write(_make_data(args))
        elif command == "prepare":
            sys.stdout.write(run_prepare(args))
        elif command == "generate":
            sys.stdout.write(run_generate(args))
        elif command == "export":
            sys.stdout.write(run_export(args))
        else:
            cfg = DistillConfig(**_train_settings(args, argv, prog))
            distill(cfg)
            student = os.path.join(cfg.output, "student")
            sys.stdout.write(
                f"wrote the student to {student}; images from it: {prog} generate --student "
                f"{cfg.output} " + ("--data DATA" if cfg.tiny else '--prompt "..."')
                + " --steps 1 2 4 --output IMAGES\n"
            )  # fmt: skip
        done = True
    except (TypeError, ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))
    finally:
        leave(wait=done)  # after a failure, other ranks may never reach a barrier
    return 0
