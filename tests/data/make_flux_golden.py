"""Write the FLUX golden outputs that ``tests/test_flux_golden.py`` compares against.

Run once, on the FLUX adapter as it was before the model-agnostic adapter core (commit
c9a6143), from the repository root::

    python tests/data/make_flux_golden.py

It writes ``tests/data/flux_golden.safetensors`` (teacher, student, du/dt, generation,
ArcFlow and a short distillation run on tiny random FLUX models, all from fixed seeds) and
``tests/data/flux_legacy/`` (a checkpoint and a student folder in that code's format), so
that the adapter after the move can be checked against the code before it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
torch.set_num_threads(1)

from mfcore.adapters.flux import FluxStudent, FluxTeacher  # noqa: E402
from mfcore.adapters.flux_arcflow import FluxArcFlowStudent  # noqa: E402
from mfcore.adapters.flux_distill import DistillConfig, distill, make_synthetic_data  # noqa: E402
from mfcore.adapters.generation import generate_latents  # noqa: E402
from mfcore.adapters.lora import LoraSpec  # noqa: E402
from mfcore.jvp import total_derivative  # noqa: E402
from tests.test_flux import batch, perturb, tiny  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def distill_config(data: str, output: str, **kw) -> DistillConfig:
    base = dict(data=data, output=output, tiny=True, steps=4, warmup_steps=1, warmup_ode_steps=2)
    base |= dict(checkpoint_every=2, lora_rank=2, batch_size=2, device="cpu")
    base |= dict(weights_dtype="fp32", progress=False, lr=1e-3, switch="fixed", signal_every=1)
    return DistillConfig(**(base | kw))


def main() -> None:
    out: dict[str, torch.Tensor] = {}
    z, r, t, cond = batch()
    for guidance in (False, True):
        tag = "g" if guidance else "n"
        out[f"teacher_{tag}"] = FluxTeacher(tiny(guidance), guidance_scale=2.5)(z, t, **cond)
        student = FluxStudent(tiny(guidance), lora=LoraSpec(rank=4, alpha=8.0))
        perturb(student)
        out[f"student_{tag}"] = student(z, r, t, **cond).detach()
        out[f"student_rt_{tag}"] = student(z, t, t, **cond).detach()
        v = torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=z.dtype)
        t2, r2 = 0.2 + 0.6 * t, 0.1 + 0.3 * t
        out[f"dudt_{tag}"] = total_derivative(student, z, r2, t2, v, method="func", cond=cond)[1]
    _, _, _, neg = batch(seed=5, seq=3)
    negs = {"negative_" + k: v for k, v in neg.items()}
    out["teacher_cfg"] = FluxTeacher(tiny(False), true_cfg_scale=4.0)(z, t, **cond, **negs)

    student = FluxStudent(tiny(True, dtype=torch.float32), lora=LoraSpec(rank=2))
    perturb(student)
    _, _, _, c32 = batch(b=2, dtype=torch.float32)
    for steps in (1, 2, 4):
        out[f"generate_{steps}"] = generate_latents(
            student, c32, height=4, width=6, steps=steps, seed=11
        )

    arc = FluxArcFlowStudent(tiny(True), num_components=2, guidance_scale=2.5)
    perturb(arc)
    params = arc(z, t, **cond)
    out["arc_m"], out["arc_weights"], out["arc_rates"] = params.m, params.weights, params.rates

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        make_synthetic_data(data, num_files=2, per_file=3, height=4, width=4, seq_len=4)
        run = os.path.join(tmp, "run")
        result = distill(distill_config(data, run, align="fake", critic_lead=1, critic_rank=2))
        for k, v in result.trainable_state_dict().items():
            out[f"distill.{k}"] = v
        with open(os.path.join(run, "metrics.jsonl")) as f:
            losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in f]
        out["distill_losses"] = torch.tensor(losses, dtype=torch.float64)
        legacy = os.path.join(HERE, "flux_legacy")
        shutil.rmtree(legacy, ignore_errors=True)
        os.makedirs(legacy)
        shutil.copytree(os.path.join(run, "checkpoints", "step-0000002"),
                        os.path.join(legacy, "checkpoints", "step-0000002"))  # fmt: skip
        shutil.copytree(os.path.join(run, "student"), os.path.join(legacy, "student"))
        shutil.copytree(data, os.path.join(legacy, "data"))

    out = {k: v.detach().contiguous() for k, v in out.items()}
    save_file(out, os.path.join(HERE, "flux_golden.safetensors"))
    print(f"wrote {len(out)} tensors")


if __name__ == "__main__":
    main()
