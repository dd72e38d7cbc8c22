"""Figures of a toy run (matplotlib, Agg backend; small PNGs).

- :func:`plot_samples`: student samples at each step count over the exact data density;
- :func:`plot_trajectories`: student trajectories beside the teacher's ODE paths;
- :func:`plot_losses`: loss curves with the warm-up switch and the alignment start marked;
- :func:`write_run_figures`: all three for a run folder;
- :func:`plot_experiments`: the summary figure of :mod:`mfcore.toys.experiments`;
- :func:`plot_converged`: its ``claim1_converged`` curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .gmm import GaussianMixture  # noqa: E402

__all__ = [
    "density_background",
    "plot_samples",
    "plot_trajectories",
    "plot_losses",
    "plot_experiments",
    "plot_converged",
    "write_run_figures",
]

_DPI = 90
_LIMIT = 2.2


def density_background(ax, gmm: GaussianMixture, limit: float = _LIMIT) -> None:
    """The exact data density as a light filled contour."""
    grid = torch.linspace(-limit, limit, 160, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    logp = gmm.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(xx.shape)
    ax.contourf(xx.numpy(), yy.numpy(), logp.exp().numpy(), levels=12, cmap="Greys")
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_samples(
    gmm: GaussianMixture, panels: dict[str, torch.Tensor], path: Path, *, points: int = 1000
) -> None:
    """One panel per entry of ``panels`` (title -> samples ``(N, 2)``) over the density."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (title, x) in zip(axes, panels.items(), strict=True):
        density_background(ax, gmm)
        pts = x[:points].detach().float().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:red", alpha=0.6, linewidths=0)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def plot_trajectories(
    gmm: GaussianMixture, panels: dict[str, torch.Tensor], path: Path, *, lines: int = 60
) -> None:
    """One panel per trajectory ``(N + 1, B, 2)``: paths from noise (dots) to samples."""
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (title, traj) in zip(axes, panels.items(), strict=True):
        density_background(ax, gmm, limit=3.0)
        tr = traj[:, :lines].detach().float().numpy()
        for b in range(tr.shape[1]):
            ax.plot(tr[:, b, 0], tr[:, b, 1], lw=0.6, c="tab:blue", alpha=0.6)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=4, c="k")
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=4, c="tab:red")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def plot_losses(history: list[dict[str, float]], training: dict[str, Any], path: Path) -> None:
    """Loss curves (log scale) with the warm-up switch and the alignment start marked."""
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    steps = [row["step"] for row in history]
    keys = sorted({k for row in history for k in row} - {"step", "phase"})
    for key in keys:
        pts = [(s, row[key]) for s, row in zip(steps, history, strict=True) if key in row]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, [abs(y) + 1e-8 for y in ys], lw=0.8, label=key)
    if training.get("switch_step") is not None:
        ax.axvline(training["switch_step"], c="k", ls="--", lw=1, label="warm-up switch")
    if training.get("align_start") is not None:
        ax.axvline(training["align_start"], c="tab:gray", ls=":", lw=1, label="alignment on")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def write_run_figures(
    run_dir: Path, gmm: GaussianMixture, samples: dict[str, Any], results: dict[str, Any]
) -> None:
    """``samples.png``, ``trajectories.png`` and ``losses.png`` in ``run_dir``."""
    run_dir = Path(run_dir)
    panels = {"teacher (100 Heun)": samples["teacher"]}
    trajs = {"teacher ODE": samples["teacher_traj"]}
    for k in results["student"]:
        if k in samples:
            panels[f"student {k}-step"] = samples[k]
            trajs[f"student {k}-step"] = samples[f"traj_{k}"]
    plot_samples(gmm, panels, run_dir / "samples.png")
    plot_trajectories(gmm, trajs, run_dir / "trajectories.png")
    plot_losses(results["training"]["history"], results["training"], run_dir / "losses.png")


def plot_experiments(results: dict[str, Any], path: Path) -> None:
    """The seed method in the faithful setting: the probe error against the exact average
    velocity over training (median over seeds), one panel per mixture, one line per variant;
    the dotted line is the switch step."""
    runs = results.get("seed_method", {})
    mixtures = list(dict.fromkeys(name.split(" / ")[0] for name in runs))
    if not mixtures:
        return
    fig, axes = plt.subplots(1, len(mixtures), figsize=(4.2 * len(mixtures), 3.4), squeeze=False)
    for ax, mixture in zip(axes[0], mixtures, strict=True):
        for name, v in runs.items():
            if not name.startswith(mixture + " / "):
                continue
            curves = [r["probes"] for r in v["runs"]]
            steps = [p[0] for p in curves[0]]
            med = [sorted(c[i][1] for c in curves)[len(curves) // 2] for i in range(len(steps))]
            ax.plot(steps, med, lw=1.0, label=name.split(" / ", 1)[1])
        ax.axvline(v["config"]["warmup_steps"], ls=":", c="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{mixture}: probe error (median of seeds)", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


_CURVES = (
    ("discrete only", "k", "-"),
    ("fixed switch", "tab:red", "-"),
    ("fixed switch, guarded", "tab:red", ":"),
    ("gap curriculum", "tab:orange", "-"),
    ("gap curriculum, guarded", "tab:orange", ":"),
    ("FM -> MF anneal (alpha-Flow)", "tab:blue", "-"),
    ("FM -> MF anneal (alpha-Flow), guarded", "tab:blue", ":"),
    ("discrete MeanFlow curriculum", "tab:green", "-"),
    ("FM -> MF anneal (alpha-Flow), no switch", "tab:blue", "--"),
    ("discrete MeanFlow curriculum, no switch", "tab:green", "--"),
)


_FROM_START = ("FM -> MF", "discrete MeanFlow")


def plot_converged(results: dict[str, Any], path: Path, seed: int = 0) -> None:
    """``claim1_converged`` for one seed: per mixture, the probe error against the steps
    (top: the warm-up to its plateau, then the branches after it) and against the teacher
    evaluations per sample spent (bottom: the curricula from step 0 beside the warm-up)."""
    mixtures = list(dict.fromkeys(name.split(" / ")[0] for name in results))
    if not mixtures:
        return
    fig, axes = plt.subplots(2, len(mixtures), figsize=(4.4 * len(mixtures), 6.4), squeeze=False)
    for col, mixture in enumerate(mixtures):

        def run_of(variant: str, mixture=mixture) -> dict[str, Any] | None:
            runs = results.get(f"{mixture} / {variant}", {}).get("runs", [])
            return next((r for r in runs if r["seed"] == seed), None)

        warm = run_of("converged warm-up")
        top, bottom = axes[0][col], axes[1][col]
        if warm is not None:
            steps = [p[0] for p in warm["probes"]]
            top.plot(steps, [p[1] for p in warm["probes"]], c="0.5", lw=1.0, label="warm-up")
            top.axvline(warm["steps_done"], ls=":", c="k", lw=0.8)
            bottom.plot([p[2] for p in warm["probes"]], [p[1] for p in warm["probes"]], c="0.5",
                        lw=1.0, label="discrete (the warm-up)")  # fmt: skip
        for variant, colour, style in _CURVES:
            run = run_of(variant)
            if run is None:
                continue
            own = [p for p in run["probes"] if warm is None or p[0] >= warm["steps_done"]]
            if variant.startswith(_FROM_START):  # no warm-up: its whole curve
                own = run["probes"]
                bottom.plot([p[2] for p in own], [p[1] for p in own], c=colour, ls=style, lw=1.0,
                            label=variant)  # fmt: skip
            else:
                top.plot([p[0] for p in own], [p[1] for p in own], c=colour, ls=style, lw=1.0,
                         label=variant)  # fmt: skip
        top.set_yscale("log")
        bottom.set_yscale("log")
        bottom.set_xscale("log")
        top.set_title(f"{mixture}: probe error, seed {seed}", fontsize=8)
        top.set_xlabel("step (dotted: the plateau)", fontsize=7)
        bottom.set_xlabel("teacher evaluations per sample", fontsize=7)
    axes[0][0].legend(fontsize=5)
    axes[1][0].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
