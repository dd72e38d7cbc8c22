"""Memory of a MeanFlow step, per way of taking du/dt: its peak, and what it holds for the
backward.

For a FLUX-shaped student (diffusers' FluxTransformer2DModel, 2 double + 2 single blocks,
8 heads of 64, B = 2, 1024 image + 256 text tokens, LoRA rank 16, fp32, attention through
``mfcore.attention``), measured from just before the forward to the end of the backward:

- ``training forward``: ``u(z, r, t)`` with the graph, then its backward (what a
  flow-matching step costs; the unit);
- ``one forward, history cut``: ``total_derivative(..., keep_graph=True)`` (the default
  ``detach_tangents=True``);
- ``one forward, history kept``: the same with ``detach_tangents=False``;
- ``one forward, torch's tangent rules``: the default with mfcore's explicit tangent rules
  switched off (``mfcore.tangent_rules``);
- ``no-grad JVP, then forward``: ``total_derivative(..., keep_graph=False)`` and a
  separate training forward (``DifferentialTarget(single_forward=False)``).

Two numbers per case: ``held``, what is still allocated when the forward that the backward
needs has finished (above what was allocated before it), and ``peak``, the most tensor
memory allocated at any time during the forward and the backward. Each case also checks
that its gradients equal the history-kept case's. On CUDA the counters are the caching
allocator's (``memory_allocated``, ``max_memory_allocated``); on a CPU the bytes of live
tensor storages, counted by a dispatch mode (``benchmarks/_memory.py``), each case in a
fresh process. Writes ``benchmarks/results/jvp_memory_<device>.json`` and the
``jvp_memory`` section of ``docs/benchmarks.md``. Usage:
``python benchmarks/jvp_memory.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import platform
from pathlib import Path

import torch
from _memory import TensorMemory
from _report import provenance, update_section

ROOT = Path(__file__).resolve().parent.parent
CASES = (
    "training forward",
    "one forward, history cut",
    "one forward, history kept",
    "one forward, torch's tangent rules",
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


def _measure(case: str, device: str) -> dict:
    from diffusers import FluxTransformer2DModel

    from mfcore.adapters.flux import FluxStudent
    from mfcore.adapters.lora import LoraSpec

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
    mem = TensorMemory(torch.device(device))
    with mem.track():
        u = _forward(case, student, z, r, t, v, cond)
        held = mem.current()
        u.square().mean().backward()
        del u
    grads = torch.cat([p.grad.flatten() for p in student.trainable_parameters()])
    return {"held_mb": held / 2**20, "peak_mb": mem.peak / 2**20, "grads": grads.cpu().tolist()}


def _forward(case, student, z, r, t, v, cond):
    """The forward of ``case``: ``u`` with the graph the backward needs."""
    from mfcore.jvp import torch_tangent_rules, total_derivative

    if case == "training forward":
        return student(z, r, t, **cond)
    if case == "no-grad JVP, then forward":
        total_derivative(student, z, r, t, v, cond=cond)
        return student(z, r, t, **cond)
    kept = case == "one forward, history kept"
    rules_off = case == "one forward, torch's tangent rules"
    with torch_tangent_rules() if rules_off else contextlib.nullcontext():
        u, _ = total_derivative(
            student, z, r, t, v, cond=cond, keep_graph=True, detach_tangents=not kept
        )
    return u


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
    unit = rows["training forward"]
    for row in rows.values():
        grads = torch.tensor(row.pop("grads"))
        row["grad_rel_diff"] = float((grads - reference).norm() / reference.norm())
        row["held_x"] = row["held_mb"] / unit["held_mb"]
        row["peak_x"] = row["peak_mb"] / unit["peak_mb"]
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
        "| case | peak (MB) | x training step | held for the backward (MB) | x training "
        "forward | grads vs history kept |",
        "|---|---|---|---|---|---|",
    ]
    for case, row in rows.items():
        lines.append(
            f"| {case} | {row['peak_mb']:.0f} | {row['peak_x']:.2f} | {row['held_mb']:.0f} | "
            f"{row['held_x']:.2f} | {row['grad_rel_diff']:.1e} |"
        )
    table = "\n".join(lines)
    out = ROOT / "benchmarks" / "results" / f"jvp_memory_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": _device_name(args.device), "rows": rows}, indent=2))
    update_section("jvp_memory", "Memory of a MeanFlow step (`benchmarks/jvp_memory.py`)", table)
    print(table)


if __name__ == "__main__":
    main()
