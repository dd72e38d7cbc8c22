"""ArcFlow against MeanFlow on the toy mixtures: 2-step students on the same update budget.

For each preset and seed this trains, with the same number of student updates and the same
batch size, learning-rate schedule and gradient clipping as :mod:`mfcore.toys.train`:

- ``arcflow``: an :class:`ArcFlowMLP` (momentum-mixture head, ArcFlow, arXiv 2602.09014)
  with :class:`mfcore.arcflow.ArcFlowDistillationLoss` on the 2-step uniform grid;
- ``meanflow``: the toy trainer's MeanFlow student (:func:`mfcore.toys.train.run`,
  ``align="none"``);
- ``meanflow_align``: the same plus trajectory distribution alignment of its 2-step
  samples (the trainer's fake-velocity critic);

and evaluates them at 2 network calls against the teacher's 2 Euler steps, an untrained
ArcFlow student and a second data sample (the metric's floor), all on the same noise and
the same fresh data sample (:func:`mfcore.toys.metrics.evaluate`). Results are reported as
mean and standard deviation over the seeds.

Run ``python -m mfcore.toys.arcflow_experiment`` (``--help`` for the budget); it writes
``docs/results/arcflow_toys.json``, a markdown table next to it and the figures
``docs/figures/arcflow_*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mfcore._checks import check_positive_int, check_tensor, check_time, cli_int
from mfcore.arcflow import (
    ArcFlowDistillationLoss,
    ArcFlowHead,
    ArcParams,
    TeacherMixSchedule,
    sample_arcflow,
)
from mfcore.solvers import sample_teacher

from .gmm import GaussianMixture, preset, presets
from .metrics import evaluate
from .nets import FourierPoints, FourierTime, activation
from .train import ToyConfig, run

__all__ = [
    "METHODS",
    "ArcFlowMLP",
    "ArcFlowToyConfig",
    "train_arcflow",
    "compare",
    "markdown_table",
    "write_figures",
    "main",
]

logger = logging.getLogger(__name__)

#: Rows of the comparison, in table order.
METHODS = (
    "data_floor",
    "teacher_euler",
    "arcflow_untrained",
    "arcflow",
    "meanflow",
    "meanflow_align",
)
_TRAINED = ("arcflow", "meanflow", "meanflow_align")
_REPORTED = ("w2", "mode_precision", "mode_recall", "mmd")


class ArcFlowMLP(nn.Module):
    """ArcFlow student ``f(z, s0) -> ArcParams`` for points ``z`` of shape ``(B, D)``.

    An MLP on ``[P(z), phi(s0)]`` (random Fourier point features ``P``,
    :class:`~mfcore.toys.nets.FourierPoints`, and :class:`~mfcore.toys.nets.FourierTime`
    features ``phi``) gives ``hidden`` features per point; an
    :class:`~mfcore.arcflow.ArcFlowHead` maps them to ``K`` velocity components, weights and
    rates (ArcFlow, arXiv 2602.09014). Sizes, activation and point features default to the
    toy trainer's MeanFlow student (:class:`~mfcore.toys.train.ToyConfig`), so the two
    students differ only in what they output.

    Args:
        dim: data dimension ``D``.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        features: Fourier frequencies of ``s0``.
        num_components: momentum components ``K``.
        max_rate: the head's smooth cap on the rates.
        act: activation of the hidden layers.
        point_features, point_scale: random Fourier features of ``z`` (0: none).
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = ToyConfig.hidden,
        depth: int = ToyConfig.depth,
        features: int = 8,
        num_components: int = 2,
        max_rate: float = 10.0,
        act: str = ToyConfig.act,
        point_features: int = ToyConfig.point_features,
        point_scale: float = ToyConfig.point_scale,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.embed = FourierTime(features)
        self.points = FourierPoints(dim, point_features, point_scale)
        width = self.points.out_features + 2 * features
        layers: list[nn.Module] = []
        for _ in range(check_positive_int("depth", depth)):
            layers += [nn.Linear(width, hidden), activation(act)]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.head = ArcFlowHead(hidden, dim, num_components, max_rate=max_rate)

    def forward(self, z: Tensor, s0: Tensor) -> ArcParams:
        """Points ``(B, D)`` at source times ``(B,)`` -> the step's mixture (``m (B, K, D)``)."""
        check_tensor("z", z)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (B, {self.dim}), got {tuple(z.shape)}")
        check_time("s0", s0, z)
        return self.head(self.trunk(torch.cat([self.points(z), self.embed(s0)], dim=1)), s0)


@dataclass
class ArcFlowToyConfig:
    """The comparison's budget; the defaults produced ``docs/results/arcflow_toys.json``.

    Attributes:
        presets: mixtures of :data:`mfcore.toys.gmm.presets`.
        seeds: one training run per seed, method and preset.
        steps: student updates of every trained method.
        batch: batch size (ArcFlow rollouts from ``batch`` noises; MeanFlow pairs).
        sample_steps: network calls of every student (and teacher Euler steps).
        lr, lr_final: Adam learning rate, cosine-decayed (as the toy trainer).
        grad_clip: max gradient norm.
        hidden, depth: both students' MLP.
        num_components, max_rate: the ArcFlow head.
        points_per_step: ArcFlow velocity-matching times per step and rollout.
        mix_start: ArcFlow's initial teacher-mixing probability, decayed linearly to zero
            over the first half of training.
        eval_samples: size of the evaluation clouds.
        trajectories: also keep 2-step trajectories of seed ``seeds[0]`` for the figure.
    """

    presets: tuple[str, ...] = ("ring8", "grid25")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 1200
    batch: int = 256
    sample_steps: int = 2
    lr: float = 2e-3
    lr_final: float = 1e-4
    grad_clip: float = 1.0
    hidden: int = 256
    depth: int = 3
    num_components: int = 2
    max_rate: float = 10.0
    points_per_step: int = 2
    mix_start: float = 0.5
    eval_samples: int = 1000
    trajectories: bool = True

    def validate(self) -> ArcFlowToyConfig:
        """Raise ``ValueError``/``TypeError`` naming a bad field; return ``self``."""
        self.presets, self.seeds = tuple(self.presets), tuple(self.seeds)
        if not self.presets or not self.seeds:
            raise ValueError("presets and seeds must not be empty")
        for name in self.presets:
            if name not in presets:
                raise ValueError(f"presets must be among {sorted(presets)}, got {name!r}")
        for name in ("steps", "batch", "sample_steps", "hidden", "depth", "num_components"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("points_per_step", self.points_per_step)
        check_positive_int("eval_samples", self.eval_samples, minimum=2)
        if not (self.lr > 0 and self.lr_final > 0 and self.grad_clip > 0):
            raise ValueError("lr, lr_final and grad_clip must be > 0")
        if not 0.0 <= self.mix_start <= 1.0:
            raise ValueError(f"mix_start must lie in [0, 1], got {self.mix_start}")
        return self


# --------------------------------------------------------------------------- ArcFlow training


def _lr_at(cfg: ArcFlowToyConfig, step: int) -> float:
    """Cosine decay from ``lr`` to ``lr_final`` (the toy trainer's schedule)."""
    frac = step / max(cfg.steps - 1, 1)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1.0 + math.cos(math.pi * frac))


def _arcflow_student(cfg: ArcFlowToyConfig, dim: int, seed: int) -> ArcFlowMLP:
    torch.manual_seed(seed)
    return ArcFlowMLP(
        dim, cfg.hidden, cfg.depth, num_components=cfg.num_components, max_rate=cfg.max_rate
    )  # act and point features: the trainer's defaults, as the MeanFlow runs use


def train_arcflow(
    cfg: ArcFlowToyConfig, teacher: GaussianMixture, seed: int
) -> tuple[ArcFlowMLP, dict[str, Any]]:
    """Train an :class:`ArcFlowMLP` by ArcFlow trajectory distillation of ``teacher``.

    Each update rolls ``cfg.batch`` fresh noises down the ``cfg.sample_steps``-step uniform
    grid and regresses the mixture's velocity on the teacher's at the student's own states
    (:class:`~mfcore.arcflow.ArcFlowDistillationLoss`, arXiv 2602.09014).

    Returns:
        the trained student and ``{"wall_s", "ms_per_step", "final_loss", "rate_mean"}``.
    """
    cfg = dataclasses.replace(cfg).validate()
    student = _arcflow_student(cfg, teacher.dim, seed)
    gen = torch.Generator().manual_seed(seed)
    schedule = TeacherMixSchedule(start=cfg.mix_start, decay_steps=max(1, cfg.steps // 2))
    loss_fn = ArcFlowDistillationLoss(
        steps=cfg.sample_steps, points_per_step=cfg.points_per_step, mix_schedule=schedule
    )
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    start, metrics = time.perf_counter(), {}
    for step in range(cfg.steps):
        noise = torch.randn(cfg.batch, teacher.dim, generator=gen)
        loss, metrics = loss_fn(student, teacher, noise, step=step, generator=gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        opt.step()
    wall = time.perf_counter() - start
    info = {
        "wall_s": wall,
        "ms_per_step": 1e3 * wall / cfg.steps,
        "final_loss": float(metrics["loss"]),
        "rate_mean": float(metrics["rate_mean"]),
    }
    return student, info


# --------------------------------------------------------------------------- one seed


def _eval_draws(teacher: GaussianMixture, n: int, seed: int) -> dict[str, Tensor]:
    """The evaluation clouds, drawn in the order :func:`mfcore.toys.train.run` draws them.

    So every method is evaluated on the same noise and against the same data sample as the
    trainer's MeanFlow students (checked: the data floors must agree).
    """
    gen = torch.Generator().manual_seed(seed + 10_000)
    data = teacher.sample(n, generator=gen)
    floor = teacher.sample(n, generator=gen)
    noise = torch.randn(n, teacher.dim, generator=gen)
    return {"data": data, "floor": floor, "noise": noise}


def _meanflow_config(cfg: ArcFlowToyConfig, name: str, seed: int, align: bool) -> dict[str, Any]:
    """The toy trainer's config for the MeanFlow baselines on this budget.

    Shared with ArcFlow: updates, batch, learning-rate schedule, clipping, network size. The
    warm-up switch and the alignment start keep the default run's fractions of training
    (800 / 2500 and 1000 / 2500); the student trains and is evaluated on the 2-step grid.
    """
    return {
        "preset": name,
        "seed": seed,
        "steps": cfg.steps,
        "batch": cfg.batch,
        "lr": cfg.lr,
        "lr_final": cfg.lr_final,
        "grad_clip": cfg.grad_clip,
        "hidden": cfg.hidden,
        "depth": cfg.depth,
        "warmup_steps": round(0.32 * cfg.steps),
        "align": "fake" if align else "none",
        "align_start": round(0.4 * cfg.steps),
        "align_steps": (cfg.sample_steps,),
        "eval_steps": (cfg.sample_steps,),
        "eval_samples": cfg.eval_samples,
        "out_dir": None,
        "figures": False,
        "progress": False,
    }


def _metrics(x: Tensor, teacher: GaussianMixture, data: Tensor) -> dict[str, float | None]:
    if not bool(torch.isfinite(x).all()):
        return dict.fromkeys(_REPORTED)
    m = evaluate(x, teacher, data)
    return {k: m[k] for k in _REPORTED}


def _run_seed(cfg: ArcFlowToyConfig, name: str, seed: int, keep: bool) -> dict[str, Any]:
    """Every method on one preset and seed: metrics, training costs, optional trajectories."""
    torch.set_num_threads(1)
    teacher, k = preset(name), cfg.sample_steps
    draws = _eval_draws(teacher, cfg.eval_samples, seed)
    noise, data = draws["noise"], draws["data"]
    euler, euler_traj = sample_teacher(teacher, noise, k, method="euler", return_trajectory=True)
    untrained = _arcflow_student(cfg, teacher.dim, seed)
    student, info = train_arcflow(cfg, teacher, seed)
    arc, arc_traj = sample_arcflow(student, noise, k, return_trajectory=True, substeps=16)
    out: dict[str, Any] = {
        "metrics": {
            "data_floor": _metrics(draws["floor"], teacher, data),
            "teacher_euler": _metrics(euler, teacher, data),
            "arcflow_untrained": _metrics(sample_arcflow(untrained, noise, k), teacher, data),
            "arcflow": _metrics(arc, teacher, data),
        },
        "ms_per_step": {"arcflow": info["ms_per_step"]},
        "arcflow_rate_mean": info["rate_mean"],
    }
    for method, align in (("meanflow", False), ("meanflow_align", True)):
        res = run(_meanflow_config(cfg, name, seed, align))
        out["metrics"][method] = {m: res["student"][str(k)][m] for m in _REPORTED}
        out["ms_per_step"][method] = res["training"]["ms_per_step"]
        out["paired"] = res["data_floor"]["w2"] == out["metrics"]["data_floor"]["w2"]
        out["meanflow_config"] = res["config"]
    if keep:
        fine = sample_teacher(teacher, noise, 64, method="heun", return_trajectory=True)[1]
        out["samples"] = {"data": data, "teacher_euler": euler, "arcflow": arc}
        out["trajectories"] = {
            "teacher_ode": fine,
            "teacher_euler": euler_traj,
            "arcflow": arc_traj,
        }
    return out


# --------------------------------------------------------------------------- the comparison


def _summary(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation over seeds (``n`` counts the finite values)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite)}


def _collect(cfg: ArcFlowToyConfig, name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    per_seed = {
        method: [dict(r["metrics"][method], seed=s) for s, r in zip(cfg.seeds, runs, strict=True)]
        for method in METHODS
    }
    summary = {
        method: {m: _summary([row[m] for row in rows]) for m in _REPORTED}
        for method, rows in per_seed.items()
    }
    ms = {method: statistics.fmean(r["ms_per_step"][method] for r in runs) for method in _TRAINED}
    return {
        "summary": summary,
        "per_seed": per_seed,
        "ms_per_step": ms,
        "arcflow_rate_mean": statistics.fmean(r["arcflow_rate_mean"] for r in runs),
        "paired_evaluation": all(r["paired"] for r in runs),
    }


def compare(
    config: ArcFlowToyConfig | None = None, *, workers: int = 1
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the comparison (see the module docstring).

    Args:
        config: the budget; :class:`ArcFlowToyConfig` defaults when None.
        workers: processes over the ``(preset, seed)`` runs (each single-threaded).

    Returns:
        ``(results, extras)``: ``results`` is JSON-serialisable (``config``,
        ``meanflow_config``, ``wall_s`` and per preset ``summary[method][metric]`` with
        ``mean``, ``std``, ``n``, ``per_seed``, ``ms_per_step``, ``paired_evaluation``);
        ``extras[preset]`` holds the first seed's samples and trajectories (tensors) when
        ``config.trajectories``.
    """
    cfg = dataclasses.replace(config or ArcFlowToyConfig()).validate()
    check_positive_int("workers", workers)
    jobs = [(name, seed) for name in cfg.presets for seed in cfg.seeds]
    keep = [cfg.trajectories and seed == cfg.seeds[0] for _, seed in jobs]
    start = time.perf_counter()
    if workers == 1:
        outs = [_run_seed(cfg, n, s, kp) for (n, s), kp in zip(jobs, keep, strict=True)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [
                pool.submit(_run_seed, cfg, n, s, kp) for (n, s), kp in zip(jobs, keep, strict=True)
            ]
            outs = [f.result() for f in futures]
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "presets": {}}
    extras: dict[str, Any] = {}
    for name in cfg.presets:
        runs = [o for (n, _), o in zip(jobs, outs, strict=True) if n == name]
        results["presets"][name] = _collect(cfg, name, runs)
        if "trajectories" in runs[0]:
            extras[name] = {"samples": runs[0]["samples"], "trajectories": runs[0]["trajectories"]}
    results["meanflow_config"] = outs[0]["meanflow_config"]
    results["wall_s"] = time.perf_counter() - start
    if not all(p["paired_evaluation"] for p in results["presets"].values()):
        logger.warning("the MeanFlow baselines were evaluated on other draws than ArcFlow")
    return results, extras


# --------------------------------------------------------------------------- reporting

_LABELS = {
    "data_floor": "data vs data (floor)",
    "teacher_euler": "teacher, Euler",
    "arcflow_untrained": "ArcFlow, untrained",
    "arcflow": "ArcFlow",
    "meanflow": "MeanFlow",
    "meanflow_align": "MeanFlow + alignment",
}


def _cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    missing = "" if stat["n"] == stat.get("of", stat["n"]) else f" ({stat['n']} runs)"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}{missing}"


def markdown_table(results: dict[str, Any]) -> str:
    """One markdown table per preset: every method's metrics as mean ± std over the seeds."""
    cfg = results["config"]
    k, n_seeds = cfg["sample_steps"], len(cfg["seeds"])
    lines = []
    for name, res in results["presets"].items():
        lines += [
            f"**{name}** ({n_seeds} seeds, {cfg['steps']} student updates each, "
            f"{cfg['eval_samples']} samples; mean ± std over seeds)",
            "",
            "| method | NFE | W2 ↓ | mode precision ↑ | mode recall ↑ | MMD ↓ | ms/update |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            stats = res["summary"][method]
            nfe = "-" if method == "data_floor" else str(k)
            ms = res["ms_per_step"].get(method)
            ms_cell = "-" if ms is None else f"{ms:.0f}"
            cells = " | ".join(_cell(stats[m]) for m in _REPORTED)
            lines.append(f"| {_LABELS[method]} | {nfe} | {cells} | {ms_cell} |")
        lines.append("")
    return "\n".join(lines)


def write_figures(extras: dict[str, Any], directory: str | Path) -> list[Path]:
    """``arcflow_trajectories.png`` and ``arcflow_samples.png`` from :func:`compare`'s extras."""
    from .plots import density_background, plt  # matplotlib with the Agg backend

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(extras)
    paths = [directory / "arcflow_trajectories.png", directory / "arcflow_samples.png"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        _plot_trajectories(ax, preset(name), extras[name]["trajectories"], name)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(len(names), 3, figsize=(9.0, 3.0 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        for ax, key in zip(row, ("data", "teacher_euler", "arcflow"), strict=True):
            density_background(ax, preset(name), limit=3.0)
            pts = extras[name]["samples"][key][:1000].float().numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:red", alpha=0.6, linewidths=0)
            ax.set_title(f"{name}: {_SAMPLE_TITLES[key]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


_SAMPLE_TITLES = {
    "data": "data",
    "teacher_euler": "teacher, 2 Euler",
    "arcflow": "ArcFlow, 2 calls",
}


def _plot_trajectories(ax: Any, gmm: GaussianMixture, trajs: dict[str, Tensor], name: str) -> None:
    """Teacher ODE paths (grey), teacher Euler (dashed) and ArcFlow's arcs (blue) per noise."""
    from .plots import density_background

    density_background(ax, gmm, limit=3.0)
    styles = {
        "teacher_ode": {"c": "0.35", "lw": 1.0, "label": "teacher ODE (64 Heun)"},
        "teacher_euler": {"c": "tab:orange", "lw": 0.9, "ls": "--", "label": "teacher, 2 Euler"},
        "arcflow": {"c": "tab:blue", "lw": 1.2, "label": "ArcFlow, 2 calls (closed form)"},
    }
    for key, style in styles.items():
        tr = trajs[key][:, :40].float().numpy()
        for b in range(tr.shape[1]):
            ax.plot(
                tr[:, b, 0],
                tr[:, b, 1],
                alpha=0.8,
                **(style if b == 0 else {**style, "label": None}),
            )
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, c=style["c"], zorder=3)
    ax.scatter(tr[0, :, 0], tr[0, :, 1], s=6, c="k", zorder=3)
    ax.set_title(f"{name}: trajectories from the same noise", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    d = ArcFlowToyConfig()
    p = argparse.ArgumentParser(
        prog="python -m mfcore.toys.arcflow_experiment",
        description="ArcFlow vs MeanFlow (with and without alignment) at 2 steps on the toys.",
    )
    p.add_argument("--presets", nargs="+", default=list(d.presets), choices=sorted(presets))
    p.add_argument("--seeds", type=cli_int, default=len(d.seeds), help="seeds 0..N-1")
    p.add_argument("--steps", type=cli_int, default=d.steps, help="student updates per method")
    p.add_argument("--eval-samples", type=cli_int, default=d.eval_samples)
    p.add_argument("--workers", type=cli_int, default=2, help="processes (one thread each)")
    p.add_argument("--json", default="docs/results/arcflow_toys.json", help="results file")
    p.add_argument("--figures", default="docs/figures", help="folder of the PNG figures")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """Run the comparison; write the JSON, the markdown table beside it and the figures."""
    args = _parser().parse_args(argv)
    cfg = ArcFlowToyConfig(
        presets=tuple(args.presets),
        seeds=tuple(range(check_positive_int("seeds", args.seeds))),
        steps=args.steps,
        eval_samples=args.eval_samples,
    )
    results, extras = compare(cfg, workers=args.workers)
    results["command"] = "python -m mfcore.toys.arcflow_experiment " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    table = markdown_table(results)
    path.with_suffix(".md").write_text(table + "\n")
    write_figures(extras, args.figures)
    print(table)
    print(f"wrote {path}, {path.with_suffix('.md')} and figures in {args.figures}")


if __name__ == "__main__":
    main()
