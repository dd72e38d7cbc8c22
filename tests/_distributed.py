"""Helpers of the multi-process tests: gloo process groups spawned from pytest, tiny runs.

Worker functions live here (importable by reference from the spawned processes); each gets
``(rank, folder, *args)`` inside an open gloo group of ``WORLD`` ranks and writes what the
test checks into ``folder`` (safetensors and JSON, from rank 0).
"""

from __future__ import annotations

import copy
import dataclasses
import faulthandler
import json
import math
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

import mfcore.adapters.distill as distill_module
import mfcore.adapters.run_checkpoints as run_checkpoints
from mfcore.adapters.data import make_synthetic_data
from mfcore.adapters.distill import DistillConfig, resolve_family
from mfcore.adapters.lora import lora_disabled
from mfcore.adapters.parallel import INTERVAL_MODULE, leave
from mfcore.targets import DifferentialTarget

_honest_target = DifferentialTarget._target

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, folder: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    faulthandler.enable()  # an abort in a rank prints that rank's Python stack into the log
    dist.init_process_group("gloo", rank=rank, world_size=world)
    done = False
    try:
        fn(rank, folder, *args)
        done = True
    except BaseException:
        traceback.print_exc()  # mp.spawn reports only the first rank to fail: log every one
        raise
    finally:
        leave(wait=done)
    # The work is done and written. Skip the interpreter's shutdown: gloo's threads can still
    # free a work there and abort the process (pytorch/pytorch#179291), a torch teardown
    # fault that would fail a finished test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, folder, *args, world: int = WORLD) -> None:
    """Run ``fn(rank, folder, *args)`` in ``world`` processes of one gloo group."""
    mp.spawn(_worker, args=(world, _free_port(), fn, str(folder), args), nprocs=world)


def make_data(folder, family: str, **kw) -> str:
    path = os.path.join(folder, f"data-{family}")
    make_synthetic_data(
        path, family=family, num_files=2, per_file=2, height=4, width=4, seq_len=4, **kw
    )
    return path


def config(folder, family: str, name: str, **kw) -> DistillConfig:
    """A tiny run of the full seed method: the differential target (``func`` JVP) from step
    0 behind the guard, and the fake critic's alignment from step 0."""
    base = dict(
        data=os.path.join(folder, f"data-{family}"),
        output=os.path.join(folder, name),
        tiny=True,
        family=family,
        steps=1,
        batch_size=4,
        switch="fixed",
        warmup_steps=0,
        signal_every=1,
        warmup_ode_steps=2,
        lora_rank=2,
        critic_rank=2,
        align="fake",
        critic_lead=0,
        device="cpu",
        weights_dtype="fp32",
        lr=1e-3,
        grad_clip=math.inf,
        checkpoint_every=1,
        preview_every=0,
        progress=False,
        report_to="none",
    )
    return DistillConfig(**(base | kw))


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor (gathering a DTensor: every rank must call)."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def canonical(name: str) -> str:
    """A trained parameter's name in one process (the interval joins the transformer under
    torch.distributed)."""
    return name.replace(f"transformer.{INTERVAL_MODULE}.", "interval.")


def trained(module: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every trained tensor (or its gradient) of ``module``, whole, by one-process name."""
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad and not (grads and ".mfcore_fake." in name):  # the critic's are
            value = p.grad if grads else p  # zeroed after its step: its weights are compared
            out[canonical(name)] = full(value).clone().contiguous()
    return out


def setup(cfg: DistillConfig):
    """The entry point's run, as ``distill`` builds it (no checkpoint, no loop)."""
    return distill_module.build_run(dataclasses.replace(cfg, family=resolve_family(cfg)))


def one_step(cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """Loss, trained gradients of the student and the weights after one step."""
    run = setup(cfg)
    metrics = distill_module._train_step(run)
    out = {f"grad/{k}": v for k, v in trained(run.student, grads=True).items()}
    out |= {f"after/{k}": v for k, v in trained(run.student).items()}
    out["loss"] = torch.tensor(metrics.get("loss_total", metrics["loss"]), dtype=torch.float64)
    return out


def one_step_worker(rank: int, folder: str, jobs: list[tuple[DistillConfig, str]]) -> None:
    """:func:`one_step` of each ``(config, tag)``, written by rank 0 to ``<tag>.safetensors``."""
    for cfg, tag in jobs:
        out = one_step(cfg)
        if rank == 0:
            save_file(out, os.path.join(folder, f"{tag}.safetensors"))


def traps_worker(rank: int, folder: str, cfg: DistillConfig) -> None:
    """FSDP2's traps on a sharded tiny FLUX: peft's switch, forward AD, deepcopy, rollback."""
    run = setup(cfg)
    tr, student = run.student.transformer, run.student
    report: dict[str, object] = {}
    lora = [p for n, p in tr.named_parameters() if ".lora_" in n]
    report["sharded"] = all(isinstance(p, DTensor) for p in tr.parameters())
    # our switch leaves requires_grad alone: a teacher call inside, then a student backward
    x, cond = run.data.batch(0, 2, 0, "cpu")
    t, r = torch.tensor([0.7, 0.4]), torch.tensor([0.2, 0.4])
    with lora_disabled(tr):
        run.teacher(x, t, **cond)
    student(x, r, t, **cond).square().mean().backward()
    mine = [n for n, p in student.named_parameters() if ".mfcore." in n and ".lora_B" in n]
    report["ours_grads"] = all(
        p.grad is not None for n, p in student.named_parameters() if n in mine
    )
    # forward AD through the sharded blocks equals the one-process JVP (rank 0 checks)
    v = run.teacher(x, t, **cond)
    from mfcore.jvp import total_derivative

    _, dudt = total_derivative(student, x, r, t, v, method="func", cond=cond, keep_graph=False)
    save_file({"dudt": dudt.contiguous()}, os.path.join(folder, f"dudt-{rank}.safetensors"))
    # the critic is never a deep copy: a sharded model refuses one
    try:
        copy.deepcopy(tr)
        report["deepcopy"] = "copied"
    except AssertionError as err:
        report["deepcopy"] = str(err)
    report["base_params"] = sum(1 for p in tr.parameters() if not p.requires_grad)
    # peft's own switch flips requires_grad and freezes the LoRA in the sharded units
    tr.disable_adapters()
    tr.enable_adapters()
    report["peft_frozen"] = sum(not p.requires_grad for p in lora)
    report["lora"] = len(lora)
    if rank == 0:
        with open(os.path.join(folder, "traps.json"), "w") as f:
            json.dump(report, f)


class Killed(Exception):
    """The fault a test injects into a run."""


def resume_worker(rank: int, folder: str, cfg: DistillConfig) -> None:
    """An uninterrupted run, and the same run killed in step 3 (after the checkpoint of
    step 2) then resumed: rank 0 writes both ends, and the rollback's copy across a DCP
    checkpoint."""
    ends = {}
    for name in ("straight", "killed"):
        honest = distill_module._train_step

        def dies_at_three(run, honest=honest):
            if run.step == 2:
                raise Killed
            return honest(run)

        run_cfg = dataclasses.replace(cfg, output=os.path.join(folder, name))
        if name == "killed":
            distill_module._train_step = dies_at_three
            try:
                distill_module.distill(run_cfg)
            except Killed:
                pass
            finally:
                distill_module._train_step = honest
            run_cfg = dataclasses.replace(run_cfg, resume=True)
        ends[name] = trained(distill_module.distill(run_cfg))
    # the warm-up rollback's copy (DTensor shards) survives a DCP checkpoint, and restores
    late = dataclasses.replace(cfg, output=os.path.join(folder, "rollback"), warmup_steps=1)
    one = setup(late)  # switches at step 1, after an optimiser step: the copy holds its state
    for _ in range(2):
        distill_module._train_step(one)
    run_checkpoints.save_checkpoint(one)
    two = setup(dataclasses.replace(late, resume=True))
    run_checkpoints.load_checkpoint(two, *run_checkpoints.resume_point(two))
    copies = [run.rollback.saved for run in (one, two)]
    rolled = []
    for run in (one, two):
        with torch.no_grad():
            for p in run.student.trainable_parameters():
                p.add_(1.0)
        run.rollback.observe({"warmup_reverted": 1.0})
        rolled.append(trained(run.student))
    out = {f"{k}/{n}": v for k, tensors in ends.items() for n, v in tensors.items()}
    out |= {f"rolled/{i}/{n}": v for i, t in enumerate(rolled) for n, v in t.items()}
    for i, saved in enumerate(copies):  # (gathering the shards is collective)
        out |= {f"copy/{i}/params/{j}": full(t) for j, t in enumerate(saved["params"])}
        out |= {f"copy/{i}/ema/{j}": full(t) for j, t in enumerate(saved["also"][0]["shadow"])}
        for j, state in saved["optimizer"]["state"].items():
            out |= {f"copy/{i}/optim/{j}/{k}": full(t) for k, t in state.items()}
    if rank == 0:
        save_file(
            {k: v.contiguous() for k, v in out.items()}, os.path.join(folder, "resume.safetensors")
        )


def _faulty(self, *args):
    """The differential target pushed far from the flow (the guard must revert)."""
    return _honest_target(self, *args) + 50.0


def run_worker(rank: int, folder: str, cfg: DistillConfig, fault: bool) -> None:
    """A whole run (with the differential target made faulty after the switch when
    ``fault``); rank 0 writes its trained weights to ``<output>.safetensors``."""
    if fault:
        DifferentialTarget._target = _faulty
    try:
        out = trained(distill_module.distill(cfg))
    finally:
        DifferentialTarget._target = _honest_target
    if rank == 0:
        save_file(out, cfg.output + ".safetensors")
