"""Time and peak memory of FLUX training steps and few-step generation.

On CUDA: the FLUX slice of the device notes (diffusers FluxTransformer2DModel with 2 double
and 4 single blocks at FLUX.1-dev width, fp32 weights, bf16 autocast, B = 2, 1024 image
tokens (a 64x64x16 latent) and 512 text tokens). On a CPU: a tiny config, so the script can
be smoke-tested. Rows:

- flow-matching step (forward + backward at r = t): the unit;
- MeanFlow step with each JVP backend (differential target, v = eps - x, a no-grad JVP
  and a separate forward/backward; plus the single-forward torch.func variant, with the
  tangents' history cut at every module (the default) and kept);
- the discrete warm-up target (teacher Heun ODE over [r, t], then forward/backward);
- trajectory alignment (fake-velocity critic as a second LoRA, 1-step trajectory): the
  critic's update alone, and a whole seed-method step (critic update, then MeanFlow by
  torch.func plus the student's alignment loss, one backward);
- generation: 1 and 2 student steps vs the 50-step teacher (transformer time only).

Writes ``benchmarks/results/flux_step-<device>.json`` and prints a markdown table; on CUDA
at the real slice it also writes the ``flux_step`` section of ``docs/benchmarks.md``.
Usage: ``python benchmarks/flux_step.py [--reps 10] [--tiny]``.
"""

from __future__ import annotations

import platform

import torch
from _report import (  # benchmarks/ is on sys.path as the script's dir
    gpu_args,
    provenance,
    time_and_peak,
    update_section,
    write_result,
)
from diffusers import FluxTransformer2DModel

from mfcore.adapters.flux import FLUX_DEV_CONFIG, TINY_FLUX_CONFIG, FluxStudent, attention_mode_for
from mfcore.adapters.flux_align import FluxAlignment, FluxFakeVelocity
from mfcore.adapters.lora import LoraSpec
from mfcore.fields import velocity_of
from mfcore.losses import AdaptiveWeight, FlowMatchingLoss, MeanFlowLoss
from mfcore.solvers import sample_meanflow, sample_teacher
from mfcore.targets import DifferentialTarget, TeacherODETarget
from mfcore.time import TimePairSampler

SLICE = dict(FLUX_DEV_CONFIG, num_layers=2, num_single_layers=4)


def _shapes(tiny: bool) -> dict:
    if tiny:
        return {
            "batch": 2,
            "channels": 1,
            "height": 8,
            "width": 8,
            "seq": 8,
            "joint": 32,
            "pooled": 32,
        }
    return {
        "batch": 2,
        "channels": 16,
        "height": 64,
        "width": 64,
        "seq": 512,
        "joint": 4096,
        "pooled": 768,
    }


def _row(name: str, fn, device, reps: int) -> dict:
    try:
        return {"name": name, **time_and_peak(fn, device, reps)}
    except Exception as err:  # a failing row is a result too: record it, keep going
        return {"name": name, "error": f"{type(err).__name__}: {err}"[:300]}


def main() -> None:
    args, device, tiny = gpu_args(__doc__, reps=10)
    s = _shapes(tiny)
    config = dict(TINY_FLUX_CONFIG, guidance_embeds=True) if tiny else SLICE
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config)
    student = FluxStudent(transformer, lora=LoraSpec(rank=4 if tiny else 64)).to(device)
    teacher = student.teacher()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s["batch"], s["channels"], s["height"], s["width"], device=device, generator=g)
    cond = {
        "prompt_embeds": torch.randn(s["batch"], s["seq"], s["joint"], device=device, generator=g),
        "pooled_prompt_embeds": torch.randn(s["batch"], s["pooled"], device=device, generator=g),
    }
    params = student.trainable_parameters()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(loss_fn, **kw):
        def run():
            for p in params:
                p.grad = None
            with autocast:
                loss, _ = loss_fn(**kw)
            loss.backward()

        return run

    fm = FlowMatchingLoss()
    rows = [
        _row(
            "flow matching (fwd + bwd)",
            step(fm, model=velocity_of(student), x=x, cond=cond),
            device,
            args.reps,
        )
    ]
    pairs = TimePairSampler(equal_fraction=0.0)  # every pair r < t: the JVP is always taken
    variants = [(m, False, True) for m in ("fd", "func", "autograd")]
    variants += [("func", True, True), ("func", True, False)]
    for method, single, cut in variants:
        student.attention = attention_mode_for(method)
        target = DifferentialTarget(method, single_forward=single, detach_tangents=cut)
        mf = MeanFlowLoss(pairs, target, AdaptiveWeight())
        name = f"MeanFlow, du/dt by {method}" + (" (single forward)" if single else "")
        name += "" if cut else ", tangent history kept"
        rows.append(_row(name, step(mf, student=student, x=x, cond=cond), device, args.reps))
    student.attention = "auto"
    warm = MeanFlowLoss(pairs, TeacherODETarget(steps=4, method="heun"), AdaptiveWeight())
    rows.append(
        _row(
            "warm-up target (teacher Heun x4)",
            step(warm, student=student, x=x, teacher=teacher, cond=cond),
            device,
            args.reps,
        )
    )

    # the critic's adapter is added last, so the rows above run on the student alone
    rank = 4 if tiny else 64
    align = FluxAlignment(FluxFakeVelocity(student, lora=LoraSpec(rank=rank)), critic_lead=0)
    mf_func = MeanFlowLoss(pairs, DifferentialTarget("func"), AdaptiveWeight())

    def critic_only():
        with autocast:
            align.critic_step(student, teacher, x, cond, 0)

    def seed_method():
        critic_only()
        for p in params:
            p.grad = None
        with autocast:
            loss, _ = mf_func(student, x, cond=cond)
            extra, _ = align.student_loss(student, teacher, x, cond, 0)
            loss = loss + align.weight * extra
        loss.backward()

    rows.append(_row("alignment: critic update (1 step)", critic_only, device, args.reps))
    rows.append(_row("MeanFlow (func) + alignment + critic", seed_method, device, args.reps))

    def generate(steps):
        def run():
            with autocast:
                sample_meanflow(student, x, steps, cond=cond)

        return run

    def teacher50():
        with autocast:
            sample_teacher(teacher, x, 50, cond=cond)

    for n in (1, 2):
        rows.append(_row(f"generate, student {n} step(s)", generate(n), device, args.reps))
    rows.append(_row("generate, teacher 50 Euler steps", teacher50, device, max(1, args.reps // 5)))

    unit = rows[0].get("median_ms")
    for row in rows:
        if unit and "median_ms" in row:
            row["x_flow_matching"] = row["median_ms"] / unit
    result = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": "tiny" if tiny else "FLUX slice: 2 double + 4 single blocks, full width",
        "shapes": s,
        "autocast_bf16": device.type == "cuda",
        "rows": rows,
    }
    path = write_result("flux_step", device.type, tiny, result)
    lines = [
        f"| step ({result['config']}) | time (ms) | x FM step | peak (GiB) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error'][:80]} | | |")
            continue
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        ratio = row.get("x_flow_matching", 0.0)
        lines.append(f"| {row['name']} | {row['median_ms']:.1f} | {ratio:.2f} | {peak} |")
    table = "\n".join(lines)
    print(table)
    if device.type == "cuda" and not tiny:  # a CPU smoke run never overwrites GPU numbers
        update_section("flux_step", "FLUX training step (`benchmarks/flux_step.py`)",
                       provenance(result["device"]) + "\n\n" + table)  # fmt: skip
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
