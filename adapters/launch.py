"""The launch environment of a multi-process run: what torchrun describes, checked before
anyone waits for a peer.

``torchrun`` describes the group in the environment: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` (what torch's ``env://`` rendezvous needs) and
``LOCAL_RANK`` (and ``LOCAL_WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``, ...). The four
``env://`` variables alone are what a shell leaves over, so a launcher must also say which
process of its node this is: ``LOCAL_RANK`` (torchrun, accelerate, deepspeed), or, where a
script exports the four itself, ``SLURM_LOCALID`` (``srun``) or
``OMPI_COMM_WORLD_LOCAL_RANK`` (Open MPI's ``mpirun``). Left over in a shell without
torchrun, these variables used to make the run wait for peers that never come.
:func:`launch_env` reads them: no ``WORLD_SIZE`` (or ``WORLD_SIZE=1`` with no more of the
group described) is one process; several processes need the whole set, consistent, else a
:class:`LaunchError` names the variables; and :func:`rendezvous` gives up after ``timeout``
seconds when the peers do not come, naming the environment that promised them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["REQUIRED", "LaunchError", "Launch", "launch_env", "rendezvous"]

#: The variables a multi-process launch must set (torchrun sets them all); the local rank may
#: come from another launcher's variable instead (:data:`LOCAL_RANKS`).
REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Where a launcher puts the process's rank on its node, in the order they are read.
LOCAL_RANKS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


class LaunchError(ValueError):
    """The environment describes a multi-process launch that cannot run, or whose peers never
    joined; the message names the variables."""


@dataclass(frozen=True)
class Launch:
    """One process of a multi-process launch: its ``rank`` and ``local_rank`` of ``size``."""

    rank: int
    size: int
    local_rank: int


def _described(env: dict[str, str]) -> str:
    return " ".join(f"{k}={env[k]}" for k in REQUIRED if k in env)


def _int(env: dict[str, str], name: str, problems: list[str]) -> int | None:
    """``env[name]`` as an int; None if it is unset, or not an integer (added to
    ``problems``)."""
    if name not in env:
        return None
    try:
        return int(env[name])
    except ValueError:
        problems.append(f"{name} must be an integer, got {env[name]!r}")
        return None


def launch_env(environ: dict[str, str] | None = None) -> Launch | None:
    """This process's place in a multi-process launch, or ``None`` for one process.

    Raises:
        LaunchError: when ``WORLD_SIZE`` asks for several processes but a variable of
            :data:`REQUIRED` is missing, ``RANK`` is set without ``WORLD_SIZE``, or a value
            is not an integer or out of range (``RANK`` not in ``[0, WORLD_SIZE)``,
            ``LOCAL_RANK`` negative or past ``LOCAL_WORLD_SIZE``): one error naming every
            variable that is wrong.
    """
    env = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    size = _int(env, "WORLD_SIZE", problems)
    rank = _int(env, "RANK", problems)
    local = next((_int(env, k, problems) for k in LOCAL_RANKS if k in env), None)
    local_size = _int(env, "LOCAL_WORLD_SIZE", problems)
    if size is not None and size < 1:
        problems.append(f"WORLD_SIZE must be >= 1, got {size}")
    if size is not None and rank is not None and not 0 <= rank < size:
        problems.append(f"RANK={rank} must lie in [0, WORLD_SIZE={size})")
    if local is not None and (local < 0 or (local_size is not None and local >= local_size)):
        problems.append(
            f"LOCAL_RANK={local} must lie in [0, LOCAL_WORLD_SIZE={local_size or 'any'})"
        )
    missing = [k for k in REQUIRED if k not in env and (k != "LOCAL_RANK" or local is None)]
    if rank and "WORLD_SIZE" not in env:
        problems.append(
            f"RANK={rank} is set without WORLD_SIZE: launch with torchrun, or unset RANK"
        )
    if size is not None and size > 1 and missing:
        problems.append(
            f"the environment describes {size} processes ({_described(env)}) but lacks "
            f"{', '.join(missing)}: launch with torchrun, or unset "
            f"{', '.join(k for k in REQUIRED if k in env)} to run one process"
        )
    if problems:
        raise LaunchError("; ".join(problems))
    if size is None or missing:
        return None  # one process (WORLD_SIZE=1 alone included)
    assert rank is not None and local is not None
    return Launch(rank, size, local)


def rendezvous(launch: Launch, timeout: float) -> dist.Store:
    """The store of torchrun's ``env://`` rendezvous, once all ``launch.size`` processes
    joined (or the agent's store under torchrun's elastic agent).

    Raises:
        LaunchError: when the peers did not join within ``timeout`` seconds, naming the
            environment that promised them.
    """
    wait = datetime.timedelta(seconds=timeout)
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=wait))
    except (RuntimeError, ValueError) as err:
        env = _described(dict(os.environ))
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise LaunchError(
            f"the environment describes {launch.size} processes ({env}), but rank "
            f"{launch.rank} could not meet the others within {timeout:g} s ({reason}): launch "
            f"with torchrun, or unset {', '.join(REQUIRED)} to run one process"
        ) from None
    store.set_timeout(dist.default_pg_timeout)
    return store
