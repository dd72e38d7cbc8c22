"""A toy run's checkpoint: written whole (a kill leaves the old one or the new), read back
with every entry present and the student's weights finite, resumed only with the settings it
was written with, and branched from (:attr:`~mfcore.toys.config.ToyConfig.init_from`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import ToyConfig

__all__ = ["run_folder", "read_checkpoint", "branch_point", "save_checkpoint", "non_finite"]

logger = logging.getLogger(__name__)


#: Settings a run may change when it resumes (they do not touch the training).
_RESUMABLE = ("progress", "figures", "save_every", "resume")
#: What a checkpoint written before a setting existed ran with.
_LEGACY = {"times": "uniform", "time_mean": -0.4, "time_std": 1.0, "handover": "blend"}
_LEGACY |= {"curriculum": "none", "curriculum_end": 0.05, "curriculum_stages": 5}
_LEGACY |= {"init_from": None, "stop_plateau": None, "plateau_window": 1000}
#: What a branch shares with the run it starts from (:attr:`ToyConfig.init_from`).
_BRANCH_SAME = ("preset", "seed", "teacher", "init", "hidden", "depth", "act", "time_max_freq")
_BRANCH_SAME += ("point_features", "point_scale", "teacher_fit_steps", "batch")


def run_folder(cfg: ToyConfig) -> Path | None:
    """``<out_dir>/<name>``, or None when the run writes nothing."""
    return None if cfg.out_dir is None else Path(cfg.out_dir) / (cfg.name or cfg.preset)


def read_checkpoint(cfg: ToyConfig) -> dict[str, Any]:
    """The checkpoint a ``resume`` run continues from.

    A save interrupted by a kill leaves ``checkpoint/`` or ``checkpoint.old/`` whole
    (:func:`mfcore.adapters._durable.replace_folder`): the newer that reads back is taken, a
    corrupt one skipped with a warning naming it.

    Raises:
        FileNotFoundError: when the run folder has no checkpoint.
        ValueError: when none reads back whole (a corrupt file, a missing entry, non-finite
            weights, each named) or it was written with other settings.
    """
    from mfcore.adapters._durable import whole_folders  # safetensors: a toys dependency

    run_dir = run_folder(cfg)
    folders = [] if run_dir is None else whole_folders(run_dir / "checkpoint")
    if not folders:
        raise FileNotFoundError(f"resume: no checkpoint in {run_dir}/checkpoint")
    reasons = []
    for folder in folders:
        try:
            state = _read_state(Path(folder))
        except (ValueError, FileNotFoundError) as err:
            reasons.append(str(err))
            logger.warning("resume: skipping %s (%s)", folder, err)
            continue
        now, saved = dataclasses.asdict(cfg), {**_LEGACY, **state["config"]}
        changed = [k for k in now if k not in _RESUMABLE and saved.get(k) != now[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(f"resume: {folder} has other settings ({diffs})")
        return state
    raise ValueError(f"resume: no checkpoint of {run_dir} reads back whole: {'; '.join(reasons)}")


_ENTRIES = ("config", "step", "wall_s", "student", "optimizer", "loss", "alignments")
_ENTRIES += ("rollback", "rng", "teacher_points", "history", "probes", "at_switch")


def branch_point(cfg: ToyConfig) -> dict[str, Any]:
    """The checkpoint of ``cfg.init_from`` a branch starts from, checked against ``cfg``.

    Raises:
        FileNotFoundError: when the folder has no checkpoint.
        ValueError: when it reads back corrupt, was another mixture, seed or network, or
            stopped beyond ``cfg.steps``.
    """
    from mfcore.adapters._durable import whole_folders

    folders = whole_folders(Path(str(cfg.init_from)) / "checkpoint")
    if not folders:
        raise FileNotFoundError(f"init_from: no checkpoint in {cfg.init_from}/checkpoint")
    state = _read_state(Path(folders[0]))
    saved, now = {**_LEGACY, **state["config"]}, dataclasses.asdict(cfg)
    other = [k for k in _BRANCH_SAME if saved.get(k) != now[k]]
    if other:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in other)
        raise ValueError(f"init_from: {cfg.init_from} is another run ({diffs})")
    if state["step"] > cfg.steps:
        raise ValueError(f"init_from: {cfg.init_from} stopped at step {state['step']} > steps")
    return state


def _read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's state, every entry present and the student's weights finite."""
    from mfcore.adapters._state import check_entries, load_state

    state = load_state(folder / "state")
    check_entries(state, _ENTRIES, folder)
    bad = non_finite(state["student"])
    if bad:
        raise ValueError(f"{folder}: the student's weights are non-finite in {bad[:3]}")
    return state


def non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors of ``weights`` holding a NaN or an infinity."""
    return [k for k, v in weights.items() if v.is_floating_point() and not v.isfinite().all()]


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write ``<run_dir>/checkpoint/``: whole, synced, then swapped in (a kill leaves the old
    one or the new); a student with non-finite weights is not saved over it."""
    from mfcore.adapters._durable import replace_folder
    from mfcore.adapters._state import save_state

    bad = non_finite(state["student"])
    if bad:
        logger.warning("not checkpointing step %d: non-finite weights in %s", state["step"], bad)
        return
    final, tmp = run_dir / "checkpoint", run_dir / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_state(state, tmp / "state")
    replace_folder(tmp, final)
