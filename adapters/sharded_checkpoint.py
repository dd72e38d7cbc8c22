"""Checkpoints of a multi-process run, through ``torch.distributed.checkpoint`` (DCP).

A checkpoint folder of a ``torchrun`` run holds

- ``dcp/``: the tensors the ranks share, as they hold them (FSDP2 shards, one copy of DDP's
  replicas): the trained weights only (``get_model_state_dict(...,
  StateDictOptions(ignore_frozen_params=True))``: the student's LoRA and interval embedding,
  the critic's LoRA), each optimiser's state, the EMA of the trained weights and the warm-up
  rollback's copy, all keyed by the parameters' names in the transformer;
- ``rank-XXXXX.{json,safetensors}``: what each rank holds for itself (its RNG states, the
  warm-up state with its held-out batch, generators, counters), written by
  :func:`mfcore.adapters._state.save_state` (no pickle).

The trained tensors are keyed by name, so DCP could reshard them to another world size; the
per-rank state cannot be (the guard's held-out batch is each rank's own rows), so
:func:`load` refuses another world size by name. Non-tensor values (optimiser
hyperparameters, counters) go to the rank files, never into DCP.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mfcore.adapters._state import load_state, save_state
from mfcore.adapters.ema import EMA
from mfcore.adapters.parallel import World
from mfcore.warmup import SwitchRollback

__all__ = ["DCP_FOLDER", "Stateful", "is_sharded", "rank_stem", "read_metadata", "save", "load"]

#: The DCP sub-folder of a sharded checkpoint.
DCP_FOLDER = "dcp"
_TRAINED = StateDictOptions(ignore_frozen_params=True)
_LOAD_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)  # the base stays


@dataclass
class Stateful:
    """The shared, tensor-holding state of a run.

    Attributes:
        model: the module whose trained parameters are saved (the student's transformer,
            holding every adapter and the interval embedding).
        optimizers: the optimisers by name (the student's, the critic's), each over
            parameters of ``model``.
        ema: the EMA of the student's optimiser's parameters, or None.
        rollback: the warm-up rollback (its ``also`` is ``(ema,)`` or empty), or None.
    """

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    ema: EMA | None = None
    rollback: SwitchRollback | None = None

    def names(self) -> dict[int, str]:
        """Parameter id -> name in ``model``."""
        return {id(p): n for n, p in self.model.named_parameters()}


def is_sharded(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint folder was written by :func:`save`."""
    return os.path.isdir(os.path.join(folder, DCP_FOLDER))


def rank_stem(folder: str | os.PathLike, rank: int) -> str:
    """The stem of ``rank``'s own files in a checkpoint folder (``rank-XXXXX``)."""
    return os.path.join(folder, f"rank-{rank:05d}")


def read_metadata(folder: str | os.PathLike) -> Any:
    """The DCP metadata of a checkpoint folder; ``ValueError`` naming the folder if it is
    missing or unreadable."""
    path = os.path.join(folder, DCP_FOLDER)
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError) as err:
        raise ValueError(f"checkpoint {path} has no readable DCP metadata ({err})") from None


def _optimizer_tensors(state: dict, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}/{fqn}/{k}": v for fqn, st in state.items() for k, v in st.items()}


def _nest(flat: dict[str, Tensor], prefix: str) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in flat.items():
        if key.startswith(prefix + "/"):
            fqn, _, k = key[len(prefix) + 1 :].rpartition("/")
            out.setdefault(fqn, {})[k] = value
    return out


def _rollback_params(rollback: SwitchRollback) -> list[nn.Parameter]:
    """The parameters a rollback restores, in its copy's order (its optimiser's)."""
    return [p for group in rollback.optimizer.param_groups for p in group["params"]]


def _rollback_tensors(state: Stateful, saved: dict) -> dict[str, Tensor]:
    """The rollback's copy (weights, optimiser state, EMA) keyed by parameter name."""
    assert state.rollback is not None
    names = state.names()
    params = [names[id(p)] for p in _rollback_params(state.rollback)]
    out = {f"rollback/params/{n}": t for n, t in zip(params, saved["params"], strict=True)}
    by_name = {params[i]: st for i, st in saved["optimizer"]["state"].items()}
    out |= _optimizer_tensors(by_name, "rollback/optim")
    for also in saved["also"]:
        out |= {f"rollback/ema/{n}": s for n, s in zip(params, also["shadow"], strict=True)}
    return out


def _tensors(state: Stateful, rollback: dict | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The DCP dict of ``state`` and the JSON-able rest, with ``rollback`` the copy to save."""
    flat = {f"model/{k}": v for k, v in get_model_state_dict(state.model, options=_TRAINED).items()}
    meta: dict[str, Any] = {"groups": {}}
    for name, opt in state.optimizers.items():
        if not opt.state:  # never stepped: nothing to save (DCP would initialise it)
            meta["groups"][name] = None
            continue
        osd = get_optimizer_state_dict(state.model, opt)
        flat |= _optimizer_tensors(osd["state"], f"optim/{name}")
        meta["groups"][name] = osd["param_groups"]
    names = state.names()
    if state.ema is not None:
        pairs = zip(state.ema.params, state.ema.shadow, strict=True)
        flat |= {f"ema/{names[id(p)]}": s for p, s in pairs}
        meta["ema"] = {"updates": state.ema.updates, "decay": state.ema.decay}
    if rollback is not None:
        flat |= _rollback_tensors(state, rollback)
        meta["rollback"] = {
            "param_groups": rollback["optimizer"]["param_groups"],
            "also": [{k: v for k, v in a.items() if k != "shadow"} for a in rollback["also"]],
        }
    return flat, meta


def save(folder: str | os.PathLike, state: Stateful, rank_state: dict, world: World) -> None:
    """Write ``state`` (collectively, to ``folder/dcp``) and this rank's ``rank_state``.

    Every rank must call it; ``folder`` must exist.
    """
    saved = state.rollback.saved if state.rollback is not None else None
    flat, meta = _tensors(state, saved)
    dcp.save(flat, checkpoint_id=os.path.join(folder, DCP_FOLDER))
    own = {"world_size": world.size, "rank": world.rank, "shared": meta, "own": rank_state}
    save_state(own, rank_stem(folder, world.rank))


def _template(state: Stateful, meta: dict) -> dict[str, Tensor]:
    """Tensors shaped and sharded as the checkpoint's, to load into (DCP loads in place)."""
    for name, opt in state.optimizers.items():
        if meta["groups"].get(name) is not None:
            get_optimizer_state_dict(state.model, opt)  # gives a fresh optimiser its state
    flat, _ = _tensors(state, None)
    if state.rollback is not None and meta.get("rollback") is not None:
        opt = state.rollback.optimizer
        copy = {
            "params": [p.detach().clone() for p in _rollback_params(state.rollback)],
            "optimizer": {
                "state": {
                    i: {k: v.clone() for k, v in opt.state[p].items()}
                    for i, p in enumerate(_rollback_params(state.rollback))
                    if opt.state.get(p)
                }
            },
            "also": [{"shadow": [s.clone() for s in a.shadow]} for a in state.rollback.also],
        }
        flat |= _rollback_tensors(state, copy)
    return flat


def load(folder: str | os.PathLike, state: Stateful, world: World) -> dict:
    """Load what :func:`save` wrote into ``state``; returns this rank's ``rank_state``.

    Raises:
        ValueError: if the checkpoint was written by another number of processes (naming
            both), or lacks a rank file.
        FileNotFoundError: if this rank's file is missing.
    """
    own = load_state(rank_stem(folder, world.rank))
    if own["world_size"] != world.size:
        raise ValueError(
            f"{folder} was written by {own['world_size']} processes, this run has "
            f"{world.size}: resume with the same world size (each rank's RNG and warm-up "
            "held-out rows are its own)"
        )
    meta = own["shared"]
    template = _template(state, meta)
    stored = read_metadata(folder)
    flat = {k: v for k, v in template.items() if k in stored.state_dict_metadata}
    missing = sorted(k for k in template if k.startswith(("model/", "ema/")) and k not in flat)
    if missing:
        raise ValueError(f"{folder} lacks trained tensors of this run: {missing[:3]}")
    dcp.load(flat, checkpoint_id=os.path.join(folder, DCP_FOLDER))
    set_model_state_dict(state.model, _prefixed(flat, "model"), options=_LOAD_TRAINED)
    for name, opt in state.optimizers.items():
        groups = meta["groups"].get(name)
        if groups is not None:
            osd = {"state": _nest(flat, f"optim/{name}"), "param_groups": groups}
            set_optimizer_state_dict(state.model, opt, osd)
    if state.ema is not None and "ema" in meta:
        names = state.names()
        shadow = [flat[f"ema/{names[id(p)]}"] for p in state.ema.params]
        state.ema.load_state_dict({"shadow": shadow, **meta["ema"]})
    elif state.ema is not None:  # a run saved without an EMA: start it from the weights
        state.ema.reset()
    if state.rollback is not None:  # (without a copy it waits for the next switch)
        state.rollback.load_state_dict({"saved": _rollback_copy(state, flat, meta)})
    return own["own"]


def _prefixed(flat: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    head = prefix + "/"
    return {k[len(head) :]: v for k, v in flat.items() if k.startswith(head)}


def _rollback_copy(state: Stateful, flat: dict[str, Tensor], meta: dict) -> dict | None:
    """The rollback's ``saved`` rebuilt from loaded tensors (None if none was saved)."""
    if meta.get("rollback") is None or state.rollback is None:
        return None
    names = state.names()
    params = [names[id(p)] for p in _rollback_params(state.rollback)]
    by_name = _nest(flat, "rollback/optim")
    ema = _prefixed(flat, "rollback/ema")
    return {
        "params": [flat[f"rollback/params/{n}"] for n in params],
        "optimizer": {
            "state": {i: by_name[n] for i, n in enumerate(params) if n in by_name},
            "param_groups": meta["rollback"]["param_groups"],
        },
        "also": [{"shadow": [ema[n] for n in params], **a} for a in meta["rollback"]["also"]],
    }
