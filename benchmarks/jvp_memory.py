"""Activation memory a MeanFlow step holds for its backward, per way of taking du/dt.

For a FLUX-shaped student (diffusers' FluxTransformer2DModel, 2 double + 2 single blocks,
8 heads of 64, B = 2, 1024 image + 256 text tokens, LoRA rank 16, fp32, attention through
``mfcore.attention``), the memory still allocated when the forward that the backward
needs has finished, above what was allocated before it:

- ``training forward``: ``u(z, r, t)`` with the graph (what a flow-matching step keeps; the unit);
- ``one forward, history cut``: ``total_derivative(..., keep_graph=True)`` (the default
  ``detach_tangents=True``);
- ``one forward, history kept``: the same with ``detach_tangents=False``;
- ``no-grad JVP, then forward``: ``total_derivative(..., keep_graph=False)`` and a
  separate training forward (``DifferentialTarget(single_forward=False)``).

Each case also checks that its gradients equal the history-kept case's. On CUDA the memory
is ``torch.cuda.memory_allocated``; on a CPU it is the C heap in use (glibc ``mallinfo2``),
which counts what is allocated, not what the allocator keeps, each case in a fresh
process. Writes ``benchmarks/results/jvp_memory_<device>.json`` and the ``jvp_memory``
section of ``docs/benchmarks.md``. Usage: ``python benchmarks/jvp_memory.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing as mp
import platform
from pathlib import Path

import torch
from _report import provenance, update_section  # benchmarks/ is on sys.path as the script's dir

ROOT = Path(__file__).resolve().parent.parent
CASES = (
    "training forward",
    "one forward, history cut",
    "one forward, history kept",
    "no-grad JVP, then forward",
)
CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=256,
    pooled_projection_dim=64,
    guidance_embeds=True,
    axes_dims_rope=(8, 28, 28),
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _allocated(device: str) -> float:
    """Bytes allocated now: CUDA's allocator, or the C heap in use (glibc) on a CPU."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return float(torch.cuda.memory_allocated())
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return float(info.uordblks + info.hblkhd)


def _measure(case: str, device: str) -> dict:
    from diffusers import FluxTransformer2DModel

    from mfcore.adapters.flux import FluxStudent
    from mfcore.adapters.lora import LoraSpec
    from mfcore.jvp import total_derivative

    torch.manual_seed(0)
    student = FluxStudent(FluxTransformer2DModel(**CONFIG), lora=LoraSpec(rank=16)).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    z = torch.randn(2, 16, 64, 64, generator=gen, device=device)
    v = torch.randn(2, 16, 64, 64, generator=gen, device=device)
    cond = {
        "prompt_embeds": torch.randn(2, 256, 256, generator=gen, device=device),
        "pooled_prompt_embeds": torch.randn(2, 64, generator=gen, device=device),
    }
    t = torch.rand(2, generator=gen, device=device)
    r = 0.5 * t
    before = _allocated(device)
    if case == "training forward":
        u = student(z, r, t, **cond)
    elif case == "no-grad JVP, then forward":
        total_derivative(student, z, r, t, v, cond=cond)
        u = student(z, r, t, **cond)
    else:
        cut = case == "one forward, history cut"
        u, _ = total_derivative(
            student, z, r, t, v, cond=cond, keep_graph=True, detach_tangents=cut
        )
    held = _allocated(device) - before
    u.square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in student.trainable_parameters()])
    return {"held_mb": held / 2**20, "grads": grads.cpu().tolist()}


def _in_subprocess(args):
    return _measure(*args)


def run(device: str) -> dict:
    rows = {}
    ctx = mp.get_context("spawn")
    for case in CASES:
        if device == "cpu":  # a fresh process per case: nothing cached from the others
            with ctx.Pool(1) as pool:
                rows[case] = pool.apply(_in_subprocess, ((case, device),))
        else:
            rows[case] = _measure(case, device)
    reference = torch.tensor(rows["one forward, history kept"]["grads"])
    unit = rows["training forward"]["held_mb"]
    for row in rows.values():
        grads = torch.tensor(row.pop("grads"))
        row["grad_rel_diff"] = float((grads - reference).norm() / reference.norm())
        row["x_training_forward"] = row["held_mb"] / unit
    return rows


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = run(args.device)
    lines = [
        provenance(_device_name(args.device)),
        "",
        "| case | held for the backward (MB) | x training forward | grads vs history kept |",
        "|---|---|---|---|",
    ]
    for case, row in rows.items():
        lines.append(
            f"| {case} | {row['held_mb']:.0f} | {row['x_training_forward']:.2f} | "
            f"{row['grad_rel_diff']:.1e} |"
        )
    table = "\n".join(lines)
    out = ROOT / "benchmarks" / "results" / f"jvp_memory_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": _device_name(args.device), "rows": rows}, indent=2))
    update_section("jvp_memory", "Memory held for the backward (`benchmarks/jvp_memory.py`)", table)
    print(table)


if __name__ == "__main__":
    main()
