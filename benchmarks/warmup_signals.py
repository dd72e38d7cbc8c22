"""What the warm-up switch's agreement signals cost per training step.

During the discrete phase :class:`mfcore.warmup.WarmupTarget` compares the discrete and the
differential target on the batch every ``every`` steps, at one extra JVP of the student
(no graph). This measures a whole training step (loss, backward, optimiser step) of the
discrete phase with the signals off, every 10 steps (the default) and every step, and
reports the mean overhead per step:

- ``toy``: the faithful toy's student (a 3 x 256 SiLU MLP grown from a teacher network),
  the teacher network's 8-step Heun secant as the discrete target, batch 256;
- ``flux-tiny``: the tiny random FLUX of the adapter tests through the distillation entry
  point's loss (4-step Heun teacher secant, LoRA rank 4, batch 2, 16x16 latents), when the
  adapters' dependencies are installed.

Writes ``benchmarks/results/warmup_signals_<device>.json`` and the ``warmup_signals``
section of ``docs/benchmarks.md``. Usage: ``python benchmarks/warmup_signals.py
[--steps 200] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _report import provenance, update_section  # benchmarks/ is on sys.path as the script's dir

from mfcore.losses import AdaptiveWeight, MeanFlowLoss
from mfcore.targets import TeacherODETarget
from mfcore.time import TimePairSampler, UniformTime
from mfcore.warmup import WarmupTarget

ROOT = Path(__file__).resolve().parent.parent
EVERY = (None, 10, 1)


def _toy(device: torch.device):
    from mfcore.toys.gmm import preset
    from mfcore.toys.nets import IntervalStudent, VelocityMLP

    gmm = preset("ring8")
    teacher = VelocityMLP(2, 256, 3, max_freq=32.0).to(device).eval().requires_grad_(False)
    student = IntervalStudent(teacher).to(device)
    gen = torch.Generator().manual_seed(0)

    def batch():
        return gmm.sample(256, generator=gen).to(device), {}

    return student, teacher, batch, TeacherODETarget(steps=8, method="heun")


def _flux_tiny(device: torch.device):
    from diffusers import FluxTransformer2DModel

    from mfcore.adapters.flux import TINY_FLUX_CONFIG, FluxStudent
    from mfcore.adapters.lora import LoraSpec

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY_FLUX_CONFIG).to(device)
    student = FluxStudent(transformer, lora=LoraSpec(rank=4), guidance_scale=3.5)
    teacher = student.teacher()
    c = TINY_FLUX_CONFIG["in_channels"] // 4
    cond = {
        "prompt_embeds": torch.randn(2, 8, TINY_FLUX_CONFIG["joint_attention_dim"], device=device),
        "pooled_prompt_embeds": torch.randn(
            2, TINY_FLUX_CONFIG["pooled_projection_dim"], device=device
        ),
    }

    def batch():
        return torch.randn(2, c, 16, 16, device=device), cond

    return student, teacher, batch, TeacherODETarget(steps=4, method="heun")


MODELS = {"toy": _toy, "flux-tiny": _flux_tiny}


def _time_steps(model: str, every: int | None, steps: int, device: torch.device) -> list[float]:
    student, teacher, batch, discrete = MODELS[model](device)
    target = WarmupTarget(discrete, switch_step=10**9, every=every)
    loss_fn = MeanFlowLoss(
        TimePairSampler(UniformTime(), equal_fraction=0.25), target, AdaptiveWeight(p=0.0)
    )
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1)
    times = []
    for step in range(steps + 10):
        x, cond = batch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = loss_fn(student, x, teacher=teacher, cond=cond, step=step, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 10:  # warm-up steps dropped
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="timed steps per case (a multiple of 10)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    if args.steps < 10 or args.steps % 10:
        p.error("--steps must be a positive multiple of 10")
    device = torch.device(args.device)
    torch.set_num_threads(2)
    rows = []
    for model in args.models:
        try:
            base = None
            for every in EVERY:
                times = _time_steps(model, every, args.steps, device)
                mean = statistics.fmean(times)
                base = mean if every is None else base
                rows.append(
                    {
                        "model": model,
                        "every": every,
                        "mean_ms": 1e3 * mean,
                        "median_ms": 1e3 * statistics.median(times),
                        "overhead": None if every is None else mean / base - 1.0,
                    }
                )
        except ImportError as err:  # the adapters' extra is not installed
            print(f"skipping {model}: {err}")
    name = "cuda" if device.type == "cuda" else "cpu"
    label = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    )
    out = ROOT / "benchmarks" / "results" / f"warmup_signals_{name}.json"
    out.write_text(json.dumps({"device": label, "steps": args.steps, "rows": rows}, indent=1))
    lines = [
        f"{provenance(label)} Mean over {args.steps} discrete-phase steps after 10 untimed.",
        "",
        "| model | signals | step (ms, mean) | step (ms, median) | overhead |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        every = "off" if r["every"] is None else f"every {r['every']}"
        over = "-" if r["overhead"] is None else f"{100 * r['overhead']:+.1f} %"
        lines.append(
            f"| {r['model']} | {every} | {r['mean_ms']:.2f} | {r['median_ms']:.2f} | {over} |"
        )
    update_section(
        "warmup_signals", "Warm-up signals (`benchmarks/warmup_signals.py`)", "\n".join(lines)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
