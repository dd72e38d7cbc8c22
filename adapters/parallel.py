"""Multi-process runs of ``mfcore-distill`` through ``torch.distributed`` (``torchrun``).

Nothing here launches processes or moves tensors by hand: ``torchrun`` starts one process per
GPU and describes the group in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
:func:`join` opens it (NCCL on CUDA, gloo on CPU), and the model runs under one of torch's two
data-parallel engines:

- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard``, one unit per transformer block
  (:func:`transformer_blocks`) and the transformer as the root unit (:func:`shard`). Every
  parameter (the frozen base, the student's and the critic's LoRA, the interval embedding)
  is sharded over the ranks and gathered for each call of the shared transformer, whoever
  calls it (teacher, student, critic): the base exists once, as shards.
  :func:`mixed_precision` computes in bf16 on a bf16 base and reduces gradients in fp32.
- ``ddp``: ``DistributedDataParallel`` over each loss of a step as a module whose parameters
  are the trained ones (:class:`Objective`): one forward of the wrapper per backward, however
  many times the loss calls the transformer inside. Every rank holds the whole model.

``auto`` picks DDP when the model's weights take at most a quarter of one device's memory
(they are replicated, and the activations, the trained state and the JVP need the rest),
FSDP2 otherwise (:func:`choose_mode`).

Ranks agree by construction: the trained weights start as rank 0's (DDP broadcasts its
module's, :func:`shard` FSDP2's),
each rank computes its rows of the global batch with every random draw the global batch's
(:class:`~mfcore.draws.BatchRows`), and each training decision reads sums over the ranks
(:meth:`World.reduce`, the ``reduce`` of :class:`mfcore.warmup.WarmupTarget`).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from mfcore._checks import check_choice
from mfcore.adapters.launch import launch_env, rendezvous
from mfcore.adapters.student import MeanFlowStudent

__all__ = [
    "MODES",
    "INTERVAL_MODULE",
    "RENDEZVOUS_TIMEOUT",
    "World",
    "Split",
    "join",
    "leave",
    "choose_mode",
    "transformer_blocks",
    "mixed_precision",
    "holds_module",
    "shard",
    "release_gathered",
    "Objective",
    "wrap",
    "gradient_sync",
    "full_trained_weights",
]

#: ``--parallel``: ``auto`` (see :func:`choose_mode`), ``none`` (one process), ``ddp``, ``fsdp``.
MODES = ("auto", "none", "ddp", "fsdp")

#: The name under which the student's interval embedding joins the transformer's modules in a
#: multi-process run (so that FSDP2's root unit holds it, and checkpoints name it once).
INTERVAL_MODULE = "mfcore_interval"

#: Seconds :func:`join` waits for every rank of a torchrun launch to meet.
RENDEZVOUS_TIMEOUT = 300.0


@dataclass(frozen=True)
class World:
    """This process's place in the run.

    Attributes:
        mode: ``"none"`` (one process, no ``torch.distributed``), ``"ddp"`` or ``"fsdp"``.
        rank: this process's rank.
        size: the number of processes.
        device: this process's device.
    """

    mode: str
    rank: int
    size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Whether the run goes through ``torch.distributed`` (even with one process)."""
        return self.mode != "none"

    @property
    def main(self) -> bool:
        """Whether this process logs, writes files and exports the student (rank 0)."""
        return self.rank == 0

    def reduce(self, x: Tensor) -> Tensor:
        """``x`` summed over the ranks, in place (the warm-up's ``reduce``)."""
        if self.distributed:
            dist.all_reduce(x)
        return x

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.distributed:
            dist.barrier()


@dataclass(frozen=True)
class Split:
    """How a step's global batch divides: each rank takes ``total / size`` consecutive rows
    of it (as ``DistributedSampler`` would), in micro-batches of ``micro`` rows whose
    gradients accumulate before the optimiser step.

    Raises:
        ValueError: unless ``total`` is a multiple of ``size * micro``, naming the three.
    """

    total: int
    micro: int
    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.total % (self.size * self.micro):
            raise ValueError(
                f"batch_size {self.total} must be a multiple of the world size {self.size} "
                f"times micro_batch_size {self.micro}: each rank accumulates whole micro-batches"
            )

    def parts(self) -> list[tuple[int, int]]:
        """The ``(start, stop)`` global rows of this rank's micro-batches, in order."""
        share = self.total // self.size
        first = self.rank * share
        return [(a, a + self.micro) for a in range(first, first + share, self.micro)]

    def weight(self, rows: int) -> float:
        """The factor of a micro-batch's mean loss over ``rows`` rows that makes the ranks'
        averaged, accumulated gradient the gradient of the global batch's mean."""
        return rows * self.size / self.total


def _device_for(device: str, local_rank: int) -> torch.device:
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    dev = torch.device("cpu" if device == "auto" else device)
    if dev.type == "cuda" and dev.index is not None and dev.index != local_rank:
        raise ValueError(
            f"device {device!r} names one GPU, but under torchrun each rank takes "
            f"cuda:LOCAL_RANK: pass --device cuda (or auto)"
        )
    return dev


def join(device: str, *, timeout: float = RENDEZVOUS_TIMEOUT) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` of this process, opening torchrun's process group.

    An already initialised group is used as it is; torchrun's environment
    (:func:`~mfcore.adapters.launch.launch_env`) opens one (NCCL for CUDA, gloo otherwise,
    each rank on ``cuda:LOCAL_RANK``) once every rank met within ``timeout`` seconds; without
    either (or with ``WORLD_SIZE=1`` alone) the run is one process. ``device`` is the
    ``--device`` setting.

    Raises:
        LaunchError: an incomplete or inconsistent launch environment, or peers that did not
            come within ``timeout`` seconds (a ``ValueError``, naming the variables).
    """
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return dist.get_rank(), dist.get_world_size(), _device_for(device, local)
    launch = launch_env()
    if launch is None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, torch.device(device)
    dev = _device_for(device, launch.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # (prefixed as torch's own env:// path does, so a shared store's other users never
    # collide with the group's keys)
    store = dist.PrefixStore("default_pg", rendezvous(launch, timeout))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.size)
    return dist.get_rank(), dist.get_world_size(), dev


def leave(*, wait: bool = True) -> None:
    """Close the process group, if one is open; with ``wait``, once every rank got here (no
    collective of one rank is still in flight when another tears the group down).

    The run's DDP and FSDP2 objects are collected first: a gloo work they still hold, freed
    during the interpreter's shutdown instead, can abort the process."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _device_memory(device: torch.device, size: int) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // size


def choose_mode(requested: str, size: int, model: nn.Module, device: torch.device) -> str:
    """The data-parallel mode of a run.

    ``auto``: ``none`` for one process outside ``torch.distributed``, else ``ddp`` when the
    model's parameter bytes are at most a quarter of one device's memory (a GPU's, or this
    machine's RAM over the ranks on a CPU), ``fsdp`` otherwise.

    Raises:
        ValueError: for an unknown mode, ``none`` with several processes, or ``ddp``/``fsdp``
            without a process group.
    """
    check_choice("parallel", requested, MODES)
    grouped = dist.is_available() and dist.is_initialized()
    if requested == "none" and size > 1:
        raise ValueError(f"parallel 'none' cannot run {size} processes: pass ddp or fsdp")
    if requested in ("ddp", "fsdp") and not grouped:
        raise ValueError(
            f"parallel {requested!r} needs a process group: launch with torchrun "
            "(torchrun --nproc-per-node N -m mfcore.adapters.distill train ...)"
        )
    if requested != "auto":
        return requested
    if not grouped:
        return "none"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return "ddp" if 4 * weights <= _device_memory(device, size) else "fsdp"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer's blocks: the items of each outermost ``nn.ModuleList`` or
    ``nn.ModuleDict`` whose items share one class and hold parameters (FLUX's and
    HunyuanImage 2.1's double- and single-stream blocks and token refiner, HunyuanImage
    3.0's decoder layers with their experts)."""
    blocks: list[nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, BaseTunerLayer):  # a LoRA layer's own dicts are not blocks
            inside.append(f"{name}.")
            continue
        items = []
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            items = list(module.values() if isinstance(module, nn.ModuleDict) else module)
        holds = bool(items) and next(items[0].parameters(), None) is not None
        if holds and len({type(m) for m in items}) == 1:
            blocks.extend(items)
            inside.append(f"{name}.")
    return blocks


def mixed_precision(weights_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """FSDP2's precision: on a bf16 base every unit computes in bf16 (the fp32 trained weights
    are cast in the all-gather) and gradients are reduced in fp32 into the fp32 shards; an
    fp32 or fp64 base computes and reduces in its own dtype."""
    if weights_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def holds_module(model: nn.Module, module: nn.Module) -> bool:
    """Whether ``module`` is ``model`` or one of its submodules (the student's ``r``
    embedding must be, for DDP and FSDP2 to see its parameters)."""
    return any(m is module for m in model.modules())


def shard(student: MeanFlowStudent, policy: MixedPrecisionPolicy) -> None:
    """FSDP2 over the student's transformer: one unit per block, the transformer the root.

    Call it after every adapter is added (the critic's too) and gradient checkpointing is
    on, and before any optimiser or EMA is built: ``fully_shard`` replaces the parameters
    with sharded ones. The student's ``r`` embedding must already be a module of the
    transformer (:data:`INTERVAL_MODULE`, or the model's own for a native student). Every
    rank ends with rank 0's trained weights (broadcast as
    ``set_model_state_dict(..., broadcast_from_rank0=True)`` does), so a random LoRA init
    cannot differ between ranks; the base must already agree (same checkpoint or seed).
    """
    tr = student.transformer
    if not holds_module(tr, student.interval):
        raise ValueError(f"the interval embedding must be the transformer's {INTERVAL_MODULE}")
    trained = {}
    if dist.get_rank() == 0:
        trained = {n: p.detach().clone() for n, p in tr.named_parameters() if p.requires_grad}
    for block in transformer_blocks(tr):
        fully_shard(block, mp_policy=policy)
    fully_shard(tr, mp_policy=policy)
    options = StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, ignore_frozen_params=True, strict=False
    )
    set_model_state_dict(tr, trained, options=options)


def release_gathered(model: nn.Module) -> None:
    """Drop FSDP2's gathered copy of the root unit's parameters (a no-op without FSDP2).

    The root unit stays gathered from a forward until its backward; a forward without a
    backward (the teacher's, the samplers', a step the guard rolls back) leaves it gathered,
    and a change to the sharded parameters made meanwhile (the rollback, the EMA swapped in
    for previews and out again) would not reach the next call. Each step and each preview
    ends with this, so the next call gathers what the shards hold.
    """
    if isinstance(model, FSDPModule):
        model.reshard()


class Objective(nn.Module):
    """A loss of the trained parameters as a module, for ``DistributedDataParallel``.

    DDP all-reduces the gradients of a module's parameters after a backward through one call
    of its forward. A step's loss calls the shared transformer many times (teacher, JVP,
    student, critic); as the forward of this module it is one call, and the module's
    parameters are exactly the weights the loss trains.

    Args:
        fn: the loss, ``fn(*args) -> (loss, ...)``.
        params: the parameters it trains (registered here, not copied).
    """

    def __init__(self, fn: Callable[..., Any], params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.fn = fn
        self.trained = nn.ParameterList(params)

    def forward(self, *args: Any) -> Any:
        """``fn(*args)``."""
        return self.fn(*args)


def wrap(fn: Callable[..., Any], params: Sequence[nn.Parameter], world: World) -> Callable:
    """``fn`` as DDP runs it (an :class:`Objective` in ``DistributedDataParallel``), or ``fn``
    itself for FSDP2 (whose hooks sit on the transformer's units) and one process."""
    if world.mode != "ddp":
        return fn
    return DistributedDataParallel(Objective(fn, params), broadcast_buffers=False)


@contextlib.contextmanager
def gradient_sync(
    world: World, objective: Callable, model: nn.Module, sync: bool
) -> Iterator[None]:
    """Inside the block, backward passes reduce gradients over the ranks only if ``sync``
    (the last micro-batch of a step); earlier ones accumulate locally (DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``)."""
    if sync or not world.distributed:
        yield
    elif isinstance(objective, DistributedDataParallel):
        with objective.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def full_trained_weights(model: nn.Module, world: World) -> Iterator[None]:
    """Inside the block, rank 0's ``model`` holds its trained parameters whole, as plain CPU
    tensors (FSDP2 shards are gathered to rank 0; every rank must enter), so the student's
    ``save_pretrained`` writes the LoRA files diffusers loads. The base stays sharded."""
    if world.mode != "fsdp":
        yield
        return
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    whole = get_model_state_dict(model, options=options)
    swapped = []
    for fqn, value in whole.items():
        owner, _, name = fqn.rpartition(".")
        module = model.get_submodule(owner)
        swapped.append((module, name, module._parameters[name]))
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    try:
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
