"""A ``mfcore-distill`` run's checkpoints and export: written whole (synced, renamed into
place), read back before older ones are pruned, resumed from the newest that reads back on
every rank (a corrupt newer one set aside by name), with its settings and data checked
against the run's; and the final ``student/`` folder, swapped in whole.

One process writes ``student.safetensors`` plus a ``state`` (safetensors and JSON); several
write through ``torch.distributed.checkpoint`` (:mod:`mfcore.adapters.sharded_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import torch
from safetensors.torch import save_file
from torch import Tensor

from mfcore.adapters import sharded_checkpoint
from mfcore.adapters._durable import read_json, replace_folder, write_json
from mfcore.adapters._state import check_entries, load_state, read_tensors, save_state
from mfcore.adapters.alignment import Alignment
from mfcore.adapters.checkpoint_files import (
    checkpoint_folders,
    checkpoint_name,
    data_difference,
    prune,
)
from mfcore.adapters.data import LatentDataset
from mfcore.adapters.distill_config import ALIGN_ONLY, LEGACY, RESUMABLE, DistillConfig
from mfcore.adapters.sharded_checkpoint import Stateful
from mfcore.adapters.step import Run
from mfcore.adapters.student import MeanFlowStudent

__all__ = [
    "latest_checkpoint",
    "saved_settings",
    "save_checkpoint",
    "resume_point",
    "check_resume",
    "load_checkpoint",
    "export_student",
]

logger = logging.getLogger(__name__)

_DATA_FILE = "data.json"


# --------------------------------------------------------------------------- checkpoints


def _rng_state(run: Run) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": run.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(run: Run, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    run.generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _stateful(run: Run) -> Stateful:
    """The tensors a multi-process checkpoint shares: weights, optimisers, EMA, rollback."""
    optimizers = {"student": run.optimizer}
    if isinstance(run.alignment, Alignment):
        optimizers["critic"] = run.alignment.optimizer
    return Stateful(run.student.transformer, optimizers, run.ema, run.rollback)


def _own_state(run: Run) -> dict:
    """What each rank of a multi-process run keeps for itself in a checkpoint."""
    align = None
    if isinstance(run.alignment, Alignment):
        align = {
            "updates_done": run.alignment.loss.updates_done,
            "generator": run.alignment.generator.get_state(),
        }
    rng = _rng_state(run)
    return {"step": run.step, "loss": run.loss.state_dict(), "rng": rng, "alignment": align}


def _write_state(run: Run, folder: str) -> None:
    """One process's checkpoint: the trained tensors, and everything else as safetensors
    plus JSON."""
    save_file(
        {k: v.contiguous() for k, v in run.student.trainable_state_dict().items()},
        os.path.join(folder, "student.safetensors"),
    )
    state = {
        "step": run.step,
        "optimizer": run.optimizer.state_dict(),
        "loss": run.loss.state_dict(),
        "rng": _rng_state(run),
        "alignment": run.alignment.state_dict() if run.alignment is not None else None,
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "rollback": run.rollback.state_dict() if run.rollback is not None else None,
    }
    save_state(state, os.path.join(folder, "state"))


def save_checkpoint(run: Run) -> str:
    """Write the checkpoint of ``run.step`` (whole, synced, renamed into place), read it back,
    and only then prune the older ones: the newest verified checkpoint stays until its
    successor is verified. One that does not read back is renamed ``<name>.unverified``,
    with a warning, and the run goes on."""
    world = run.world
    root = os.path.join(run.cfg.output, "checkpoints")
    final = os.path.join(root, checkpoint_name(run.step))
    tmp = final + ".tmp"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    world.barrier()
    if world.distributed:
        sharded_checkpoint.save(tmp, _stateful(run), _own_state(run), world)
    else:
        _write_state(run, tmp)
    # (each rank's files are synced by their writers, DCP's and save_state; rank 0 syncs the
    # whole folder again before the rename)
    world.barrier()
    if world.main:
        settings = dataclasses.asdict(run.cfg)  # (--grad-clip inf: read back by Python)
        write_json(os.path.join(tmp, "config.json"), settings, indent=2, allow_nan=True)
        write_json(os.path.join(tmp, _DATA_FILE), {"files": run.data.fingerprint()})
        replace_folder(tmp, final)
        try:
            _verify(final, world.rank)
        except Exception as err:  # any failure to read back: the other ranks wait at the barrier
            logger.warning("%s does not read back (%s): the older ones stay", final, err)
            shutil.rmtree(final + ".unverified", ignore_errors=True)
            os.replace(final, final + ".unverified")
        else:
            prune(root, run.cfg.keep_checkpoints)
    world.barrier()
    return final


def latest_checkpoint(output: str | os.PathLike) -> str | None:
    """The newest checkpoint folder of a run (by step number), or None."""
    folders = checkpoint_folders(os.path.join(output, "checkpoints"))
    return folders[-1][1] if folders else None


def _check_finite(
    tensors: dict[str, Tensor], where: str, error: type[Exception] = ValueError
) -> None:
    """Raise ``error`` naming ``where`` and the first keys of ``tensors`` that hold a NaN or
    an infinity."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise error(f"{where} holds non-finite values in {bad[:3]}")


def _verify(path: str, rank: int) -> dict:
    """Read a checkpoint whole without applying it: the saved step, settings and data
    fingerprint, and its student and state (one process) or ``rank``'s file and the DCP
    metadata (several). Raises ``ValueError`` or ``FileNotFoundError`` naming the file (and
    key) at fault: a missing or corrupt file, a missing entry, non-finite weights."""
    config = os.path.join(path, "config.json")
    found = {"config": read_json(config, "checkpoint file"), "data": None}
    check_entries(found["config"], ("steps",), config)
    data = os.path.join(path, _DATA_FILE)
    if os.path.exists(data):  # (checkpoints before the record have none)
        record = read_json(data, "checkpoint file")
        check_entries(record, ("files",), data)
        found["data"] = record["files"]
    if sharded_checkpoint.is_sharded(path):
        own = load_state(sharded_checkpoint.rank_stem(path, rank))
        check_entries(own, ("world_size", "rank", "shared", "own"), path)
        check_entries(own["own"], ("step", "loss", "rng", "alignment"), path)
        sharded_checkpoint.read_metadata(path)
        found["step"] = int(own["own"]["step"])
        return found
    student = os.path.join(path, "student.safetensors")
    found["student"] = read_tensors(student)
    _check_finite(found["student"], student)
    state = load_state(os.path.join(path, "state"))
    check_entries(state, ("step", "optimizer", "loss", "rng", "alignment"), path)
    if state.get("ema") is not None:
        check_entries(state["ema"], ("shadow",), path)
        _check_finite(dict(enumerate(state["ema"]["shadow"])), f"{path}/state (EMA)")
    found["state"], found["step"] = state, int(state["step"])
    return found


def _agreed(run: Run, ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (ranks must resume from the same checkpoint)."""
    if not run.world.distributed:
        return ok
    flag = torch.tensor([float(ok)], device=run.device)
    return int(run.world.reduce(flag).item()) == run.world.size


def resume_point(run: Run) -> tuple[str, dict]:
    """The newest checkpoint of the run that reads back whole on every rank, and what
    :func:`_verify` read; a corrupt newer one is skipped with a warning naming it, and set
    aside as ``<name>.corrupt`` (so pruning, which keeps the newest, never keeps it in place
    of the intact ones)."""
    root = os.path.join(run.cfg.output, "checkpoints")
    if run.cfg.resume_from is not None:
        return _resume_from(run, run.cfg.resume_from)
    folders = checkpoint_folders(root)
    if not folders:
        raise FileNotFoundError(f"--resume given but {run.cfg.output} has no checkpoint")
    skipped, rejected = [], []
    for _, path in reversed(folders):
        try:
            found, ok = _verify(path, run.world.rank), True
        except Exception as err:  # any failure on one rank: every rank must hear of it
            found, ok = {}, False
            skipped.append(f"{path}: {err}")
        if _agreed(run, ok):
            for reason in skipped:
                logger.warning("skipping a corrupt checkpoint, %s", reason)
            if run.world.main:
                for bad in rejected:
                    shutil.rmtree(bad + ".corrupt", ignore_errors=True)
                    os.replace(bad, bad + ".corrupt")
            run.world.barrier()
            return path, found
        rejected.append(path)
    raise ValueError(f"no checkpoint in {root} reads back whole: " + "; ".join(skipped))


def _resume_from(run: Run, path: str) -> tuple[str, dict]:
    """Checkpoint ``path`` (``--resume PATH``), read back whole on every rank, or an error
    naming it: a checkpoint asked for by name is never swapped for another."""
    try:
        found, ok, reason = _verify(path, run.world.rank), True, ""
    except Exception as err:  # any failure on one rank: every rank must hear of it
        found, ok, reason = {}, False, str(err)
    if not _agreed(run, ok):
        raise ValueError(f"--resume {path}: the checkpoint does not read back whole ({reason})")
    run.world.barrier()
    return path, found


def check_resume(cfg: DistillConfig, path: str, found: dict, data: LatentDataset) -> None:
    """Raise one ``ValueError`` naming everything that keeps ``cfg`` from continuing
    checkpoint ``path``: changed settings, no steps left to train (the same count is a
    warning), changed data files (a warning with ``--allow-data-change``)."""
    problems = _changed_settings(cfg, found["config"])
    step = found["step"]
    if cfg.steps < step:
        problems.append(
            f"--steps {cfg.steps} is below the step {step} of checkpoint {path}: "
            f"pass --steps above {step} to train on, or use its exported student/"
        )
    if cfg.steps == step:
        logger.warning("%s is at --steps %d already: nothing to train, exporting it", path, step)
    if found["data"] is None:
        logger.info("%s records no data fingerprint (older checkpoint): not compared", path)
        diff = ""
    else:
        diff = data_difference(found["data"], data.fingerprint())
    if diff and not cfg.allow_data_change:
        problems.append(
            f"the data folder {data.folder} changed since checkpoint {path} ({diff}): "
            "restore it, or pass --allow-data-change to resume anyway"
        )
    elif diff:
        logger.warning("the data folder %s changed since %s: %s", data.folder, path, diff)
    if problems:
        raise ValueError(f"cannot resume {path}: " + "; ".join(problems))


def _filled(saved: dict) -> dict:
    """A checkpoint's settings, every field present: a setting added after the checkpoint was
    written had its default then, or the value that reproduces what the code did before it
    existed (``LEGACY``); keys no longer settings are dropped."""
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)} | LEGACY
    return {k: saved.get(k, v) for k, v in defaults.items()}


def saved_settings(output: str | os.PathLike, path: str | None = None) -> tuple[str, dict]:
    """The newest checkpoint of the run in ``output`` whose ``config.json`` reads (or
    checkpoint ``path``), and its settings (every field of :class:`DistillConfig`).

    Raises:
        FileNotFoundError: when ``output`` holds no checkpoint with readable settings.
        ValueError: when ``path``'s settings do not read.
    """
    if path is not None:
        return path, _filled(read_json(os.path.join(path, "config.json")))
    reasons = []
    for _, path in reversed(checkpoint_folders(os.path.join(output, "checkpoints"))):
        try:
            return path, _filled(read_json(os.path.join(path, "config.json")))
        except (ValueError, FileNotFoundError) as err:
            reasons.append(str(err))
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise FileNotFoundError(f"--resume given but {output} has no checkpoint{why}")


def _changed_settings(cfg: DistillConfig, saved: dict) -> list[str]:
    """The settings ``cfg`` changes from a checkpoint's (``saved``, its ``config.json``) that
    a resume may not change, as one problem naming each (none: an empty list)."""
    now = dataclasses.asdict(cfg)
    saved = _filled(saved)
    ignored = set(RESUMABLE) | (ALIGN_ONLY if now["align"] == "none" else set())
    changed = sorted(k for k in now if k not in ignored and saved[k] != now[k])
    diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
    return [f"different settings ({diffs})"] if changed else []


def load_checkpoint(run: Run, path: str, found: dict) -> None:
    """Apply checkpoint ``path`` (read by :func:`_verify` into ``found``) to ``run``."""
    if sharded_checkpoint.is_sharded(path) != run.world.distributed:
        kind = "several processes" if run.world.distributed else "one process"
        raise ValueError(f"{path} was not written by a run of {kind}: resume it as it ran")
    if run.world.distributed:
        own = sharded_checkpoint.load(path, _stateful(run), run.world)
        run.loss.load_state_dict(own["loss"])
        _restore_rng(run, own["rng"])
        if isinstance(run.alignment, Alignment):
            run.alignment.loss.updates_done = int(own["alignment"]["updates_done"])
            run.alignment.generator.set_state(own["alignment"]["generator"])
        run.step = int(own["step"])
        return
    device = str(run.device)
    run.student.load_trainable_state_dict({k: v.to(device) for k, v in found["student"].items()})
    state = found["state"]
    run.optimizer.load_state_dict(state["optimizer"])
    run.loss.load_state_dict(state["loss"])
    _restore_rng(run, state["rng"])
    if run.alignment is not None:
        if state["alignment"] is None:
            raise ValueError(f"{path} was saved without an alignment term")
        run.alignment.load_state_dict(state["alignment"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    elif run.ema is not None:  # a checkpoint without an EMA: start it from the weights
        logger.info("%s holds no EMA: the average starts from the resumed weights", path)
        run.ema.reset()
    if run.rollback is not None and state.get("rollback") is not None:
        run.rollback.load_state_dict(state["rollback"])
    run.step = int(state["step"])


def export_student(student: MeanFlowStudent, folder: str) -> None:
    """Write the student to ``folder`` whole (synced, swapped in).

    Raises:
        FloatingPointError: when the weights are not finite; ``folder`` is left as it was
            (a previous run's student is not overwritten), and the run fails rather than
            ending as if it had exported.
    """
    where = f"the trained student (not exported, {folder} is left as it was)"
    _check_finite(student.trainable_state_dict(), where, FloatingPointError)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    replace_folder(tmp, folder)
