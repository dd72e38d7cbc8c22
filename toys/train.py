"""The toy distillation: an exact Gaussian-mixture teacher into a small MeanFlow MLP student.

The seed method of arXiv 2605.17834 on a 2-D mixture where every answer is exact:

1. MeanFlow regression (:class:`mfcore.losses.MeanFlowLoss`) on ``(r, t)`` pairs, with the
   target chosen by ``target``: ``"warmup"`` is the warm-up switch
   (:class:`mfcore.warmup.WarmupTarget`: the discrete teacher-ODE target first, the
   differential (JVP) target after ``warmup_steps``), ``"discrete"`` keeps the teacher-ODE
   target throughout, ``"differential"`` uses the JVP target from scratch. The default is
   ``"discrete"``: on these toys the teacher-ODE target is exact and cheap, and switching to
   the differential target lowered the 1-step mode precision (docs/toys.md);
2. plus ``align_weight *`` trajectory distribution alignment
   (:class:`mfcore.critics.AlignmentLoss`) of the student's ``K``-step samples for each
   ``K`` in ``align_steps``, with a fake-velocity, mean-flow or kernel critic.

Run ``python -m mfcore.toys.train`` (or ``mfcore-toy``) with no argument for the default
config; flags override it (``--help``). It writes ``<out>/<name>/metrics.json`` and PNG
figures, shows a progress bar and prints a summary table. :func:`run` does the same from
Python for any :class:`~mfcore.toys.gmm.GaussianMixture` teacher and returns the metrics.

Besides ``metrics.json`` a run writes the student's weights, ``student.safetensors``, and
its whole training state, ``checkpoint/`` (every ``save_every`` steps and at the end):
``--resume`` (``resume=True``) continues a run from there exactly as if it had not stopped.

``metrics.json`` holds ``teacher`` (a 100-step Heun solve: its NFE and metrics),
``data_floor`` (the metrics of a second data sample), ``student`` keyed by step count
(``"1"``, ``"2"``, ``"4"``), each with ``w2``, ``mmd``, ``nll``, ``mode_precision`` and
``mode_recall`` against the same fresh data sample, plus ``training`` (phase switch, wall
time, collapse) and ``config``.

The pieces, one concept per module: :mod:`~mfcore.toys.config` (:class:`ToyConfig`, checked
once), :mod:`~mfcore.toys.recipe` (the targets, loss, critics and networks a config builds),
:mod:`~mfcore.toys.loop` (the typed run state :class:`~mfcore.toys.loop.ToyRun`, one
``train_step(run, step)`` and the loop), :mod:`~mfcore.toys.checkpoints` and
:mod:`~mfcore.toys.evaluation`; this module runs them and is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from mfcore._checks import check_positive_int, cli_int

from .checkpoints import branch_point, non_finite, read_checkpoint, run_folder
from .config import CRITICS, METRIC_KEYS, TARGETS, ToyConfig, as_config
from .evaluation import evaluate_run, summary_table
from .gmm import GaussianMixture, preset, presets
from .loop import CountingField, ToyRun, safe_probe, train
from .nets import VelocityMLP
from .recipe import student_net, teacher_net_config
from .teacher_net import fit_teacher_net, teacher_net_report

__all__ = [
    "ToyConfig",
    "run",
    "main",
    "read_checkpoint",
    "branch_point",
    "summary_table",
    "teacher_net_config",
    "TARGETS",
    "CRITICS",
    "METRIC_KEYS",
]

logger = logging.getLogger(__name__)


def run(
    config: ToyConfig | dict | None = None,
    teacher: GaussianMixture | None = None,
    *,
    teacher_net: VelocityMLP | None = None,
) -> dict[str, Any]:
    """Distil ``teacher`` (default: the config's preset) into a MeanFlow MLP and evaluate it.

    Args:
        config: a :class:`ToyConfig`, a dict of its fields, or ``None`` for the default.
        teacher: any 2-D or higher :class:`GaussianMixture` (figures only for 2-D).
        teacher_net: with ``config.teacher == "net"``, an already fitted teacher network
            for this mixture (e.g. shared by several runs); default: fit one
            (:func:`~mfcore.toys.teacher_net.fit_teacher_net`).

    Returns:
        the content of ``metrics.json``: ``config``, ``teacher``, ``data_floor``,
        ``student`` (keyed ``"1"``, ``"2"``, ``"4"``: ``nfe``, ``w2``, ``mmd``, ``nll``,
        ``mode_precision``, ``mode_recall``; ``None`` values after a collapse), ``probe``
        (the final relative error against the exact average velocity, pooled and per gap
        bin), ``teacher_net`` (its config and quality, or ``None`` with the exact teacher)
        and ``training``; plus ``run_dir`` (``None`` when nothing is written).
    """
    cfg = as_config(config)
    if teacher is None:
        teacher = preset(cfg.preset)
    elif not isinstance(teacher, GaussianMixture):
        raise TypeError(f"teacher must be a GaussianMixture, got {type(teacher).__name__}")
    net_report = None
    if cfg.teacher == "net":
        if teacher_net is None:
            teacher_net = fit_teacher_net(teacher, teacher_net_config(cfg))
        elif not isinstance(teacher_net, VelocityMLP):
            raise TypeError(f"teacher_net must be a VelocityMLP, got {type(teacher_net).__name__}")
        net_report = {
            "config": dataclasses.asdict(teacher_net_config(cfg)),
            **teacher_net_report(teacher_net, teacher),
        }
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    student = student_net(cfg, teacher, teacher_net)
    field = CountingField(teacher_net if cfg.teacher == "net" else teacher, teacher)
    job = ToyRun.build(cfg, teacher, student, field, gen)
    if cfg.resume:
        job.load_state_dict(read_checkpoint(cfg))
    elif cfg.init_from is not None:
        job.branch(branch_point(cfg))
    training = train(job)
    results = evaluate_run(cfg, teacher, student, torch.Generator().manual_seed(cfg.seed + 10_000))
    samples = results.pop("_samples")
    results["probe"] = safe_probe(job.probe, student)
    results = {
        "config": dataclasses.asdict(cfg),
        **results,
        "teacher_net": net_report,
        "training": training,
    }
    results["run_dir"] = _write(cfg, results, samples, teacher, student)
    return results


def _write(
    cfg: ToyConfig, results: dict, samples: dict, teacher: GaussianMixture, student
) -> str | None:
    run_dir = run_folder(cfg)
    if run_dir is None:
        return None
    from safetensors.torch import save_file

    from mfcore.adapters._durable import write_atomic, write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    bad = non_finite(weights)
    if bad:  # a collapsed run: its metrics say so, and an earlier student file stays
        logger.warning("not writing student.safetensors: non-finite weights in %s", bad[:3])
    else:
        write_atomic(run_dir / "student.safetensors", lambda tmp: save_file(weights, tmp))
    # (allow_nan: a collapsed run's loss history may hold infinities, as before)
    write_json(
        run_dir / "metrics.json", results | {"run_dir": str(run_dir)}, indent=1, allow_nan=True
    )
    if cfg.figures and teacher.dim == 2:
        from . import plots

        plots.write_run_figures(run_dir, teacher, samples, results)
    return str(run_dir)


def _parser() -> argparse.ArgumentParser:
    d = ToyConfig()
    p = argparse.ArgumentParser(
        prog="mfcore-toy",
        description="Distil an exact Gaussian-mixture teacher into a few-step MeanFlow student.",
    )
    p.add_argument("--preset", default=d.preset, choices=sorted(presets))
    p.add_argument("--name", default=None, help="run name (default: the preset)")
    p.add_argument("--out", default=d.out_dir, help="output folder (default: runs)")
    p.add_argument("--seed", type=cli_int, default=d.seed)
    p.add_argument("--steps", type=cli_int, default=d.steps, help="student optimiser steps")
    p.add_argument("--batch", type=cli_int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--target", default=d.target, choices=TARGETS)
    p.add_argument("--warmup-steps", type=cli_int, default=d.warmup_steps)
    p.add_argument("--align", default=d.align, choices=CRITICS)
    p.add_argument("--align-weight", type=float, default=d.align_weight)
    p.add_argument("--align-start", type=cli_int, default=d.align_start)
    p.add_argument("--eval-samples", type=cli_int, default=d.eval_samples)
    p.add_argument(
        "--save-every",
        type=cli_int,
        default=d.save_every,
        help="steps between checkpoints (0: only at the end)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in <out>/<name> from its checkpoint (same settings)",
    )
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=cli_int,
        default=1,
        help="torch intra-op threads (default 1: the toy's tensors are too small to gain "
        "from more, and a busy machine makes each op wait for the slowest thread)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """The ``mfcore-toy`` command: run the toy distillation and print a summary table."""
    parser = _parser()
    args = parser.parse_args(argv)
    cfg = ToyConfig(
        preset=args.preset,
        name=args.name,
        out_dir=args.out,
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        target=args.target,
        warmup_steps=args.warmup_steps,
        align=args.align,
        align_weight=args.align_weight,
        align_start=args.align_start,
        eval_samples=args.eval_samples,
        figures=not args.no_figures,
        progress=not args.quiet,
        save_every=args.save_every,
        resume=args.resume,
    )
    try:
        cfg.validate()
        torch.set_num_threads(check_positive_int("threads", args.threads))
        if cfg.resume:
            read_checkpoint(cfg)
    except (TypeError, ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    results = run(cfg)
    print(summary_table(results))
    if results["run_dir"] is not None:
        print(f"wrote {results['run_dir']}/metrics.json")


if __name__ == "__main__":
    main()
