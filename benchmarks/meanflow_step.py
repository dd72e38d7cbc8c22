"""A MeanFlow training step, mfcore's and its peers', against a flow-matching step.

For each model (the MLP and the DiT-like transformer of ``benchmarks/_nets.py``, and a
FLUX-shaped tiny student: diffusers' ``FluxTransformer2DModel`` with 1 double + 2 single
blocks, 4 heads of 64, 256 image + 64 text tokens, B = 2, LoRA rank 16, attention through
``mfcore.attention``), every step of ``benchmarks/_meanflow_steps.py`` runs on the same
model, weights and batch. Reported, each as a ratio to the flow-matching step:

- time: median over interleaved rounds (every step once per round, after two warm-up
  rounds), with the 25 % and 75 % quantiles;
- peak: the tensor memory's peak over the step (forward and backward), above what was
  allocated before it; held: what the forward leaves allocated for the backward;
  (``benchmarks/_memory.py``: CUDA's allocator counters, or on a CPU the bytes of live
  storages counted by a dispatch mode);
- matmul FLOPs executed (``torch.utils.flop_counter.FlopCounterMode``);
- the gradients' relative L2 distance to py-meanflow's (exact, torch's tangent rules);

and, in a second table, the peak and FLOPs of mfcore's default step with each of its
tangent rules left out (what each rule gains).

Writes ``benchmarks/results/meanflow_step_<device>.json`` and the ``meanflow_step`` section
of docs/benchmarks.md. Usage: ``python benchmarks/meanflow_step.py [--rounds 20]
[--threads 2] [--models mlp transformer flux] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _meanflow_steps import STEPS, Batch  # benchmarks/ is on sys.path as the script's dir
from _memory import TensorMemory
from _nets import MLP, Transformer
from _report import provenance, update_section
from torch.utils.flop_counter import FlopCounterMode

from mfcore import tangent_rules

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("transformer", "mlp", "flux")
UNIT = "flow matching (the unit)"
DEFAULT = "mfcore default (func, one forward)"
REFERENCE = "py-meanflow (func.jvp, one pass)"
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=256,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=(8, 28, 28),
)


def _times(gen, n, device):
    t = torch.rand(n, generator=gen, device=device)
    return t * torch.rand(n, generator=gen, device=device), t


def build(model: str, device: torch.device):
    """``(student, trained parameters, batch)``, the same for every step."""
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(1)
    if model == "flux":
        from diffusers import FluxTransformer2DModel

        from mfcore.adapters.flux import FluxStudent
        from mfcore.adapters.lora import LoraSpec

        net = FluxStudent(FluxTransformer2DModel(**FLUX_CONFIG), lora=LoraSpec(rank=16))
        net.attention = "mfcore"
        for p in net.trainable_parameters():  # LoRA B starts at zero: give it a value
            p.data.normal_(0.0, 0.02, generator=None)
        shape = (2, 16, 32, 32)
        cond = {
            "prompt_embeds": torch.randn(2, 64, 256, generator=gen, device=device),
            "pooled_prompt_embeds": torch.randn(2, 64, generator=gen, device=device),
        }
    else:
        net, shape = (MLP(), (256, 64)) if model == "mlp" else (Transformer(), (4, 256, 16))
        cond = {}
    net = net.to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    z = torch.randn(shape, generator=gen, device=device)
    v = torch.randn(shape, generator=gen, device=device)
    r, t = _times(gen, shape[0], device)
    return net, params, Batch(z, r, t, v, {k: x.to(device) for k, x in cond.items()})


class _Global:
    """A stand-in for FlopCounterMode's module tracker: count globally only (its hooks
    break ``torch.autograd.grad`` on leaves, which zhuyu-cs's step runs)."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _flop_counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Global()
    return counter


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn, net, params, batch):
    for p in params:
        p.grad = None
    fn(net, batch).backward()


def _grads(params):
    return torch.cat([p.grad.flatten() for p in params])


def measure(model: str, device: torch.device, rounds: int) -> dict:
    net, params, batch = build(model, device)
    rows = {}
    for name, fn in STEPS.items():
        with _flop_counter() as flops:
            _step(fn, net, params, batch)
        mem = TensorMemory(device)
        for p in params:
            p.grad = None
        with mem.track():
            loss = fn(net, batch)
            held = mem.current()
            loss.backward()
            del loss
        rows[name] = {
            "flops": flops.get_total_flops(),
            "peak_mb": mem.peak / 2**20,
            "held_mb": held / 2**20,
            "grads": _grads(params).detach().clone(),
            "times": [],
        }
    for i in range(rounds + 2):
        for name, fn in STEPS.items():
            _sync(device)
            start = time.perf_counter()
            _step(fn, net, params, batch)
            _sync(device)
            if i >= 2:  # two warm-up rounds
                rows[name]["times"].append(time.perf_counter() - start)
    return _ratios(rows)


@contextlib.contextmanager
def _only_rules(names):
    """mfcore's tangent rules restricted to ``names`` (benchmark-only: edits the private
    routing table of ``mfcore.tangent_rules`` for the duration of the block)."""
    full = dict(tangent_rules._ROUTED)
    tangent_rules._ROUTED.clear()
    tangent_rules._ROUTED.update({k: fn for k, fn in full.items() if k in names})
    try:
        yield
    finally:
        tangent_rules._ROUTED.clear()
        tangent_rules._ROUTED.update(full)


def ablation(model: str, device: torch.device) -> dict:
    """Peak memory and matmul FLOPs of mfcore's default step (x FM) with each tangent rule
    left out in turn: what each rule gains (deterministic, so not timed)."""
    net, params, batch = build(model, device)
    names = tuple(tangent_rules._ROUTED)
    subsets = {"all rules": names, **{f"without {n}": [m for m in names if m != n] for n in names}}
    subsets["linear only"], subsets["none (torch's rules)"] = ("linear",), ()
    out = {}
    for label, fn, subset in [("FM", STEPS[UNIT], names)] + [
        (label, STEPS[DEFAULT], subset) for label, subset in subsets.items()
    ]:
        with _only_rules(subset):
            for p in params:
                p.grad = None
            mem = TensorMemory(device)
            with mem.track(), _flop_counter() as flops:
                fn(net, batch).backward()
        out[label] = {"peak": mem.peak, "flops": flops.get_total_flops()}
    unit = out.pop("FM")
    return {
        k: {"peak_x": v["peak"] / unit["peak"], "flops_x": v["flops"] / unit["flops"]}
        for k, v in out.items()
    }


def ablation_table(results: dict) -> str:
    labels = list(next(iter(results.values())))
    lines = [
        "mfcore's default step with each tangent rule left out: peak memory / matmul FLOPs, "
        "x the FM step.",
        "",
        "| model | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for model, rows in results.items():
        cells = [f"{rows[k]['peak_x']:.2f} / {rows[k]['flops_x']:.2f}" for k in labels]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratios(rows: dict) -> dict:
    unit, ref = next(iter(rows.values())), rows[REFERENCE]["grads"]
    unit_ms = 1e3 * statistics.median(unit["times"])
    out = {}
    for name, row in rows.items():
        ms = [1e3 * x for x in row["times"]]
        q1, _, q3 = statistics.quantiles(ms, n=4)
        med = statistics.median(ms)
        grads = row.pop("grads")
        out[name] = {
            "ms": med,
            "ms_q1": q1,
            "ms_q3": q3,
            "time_x": med / unit_ms,
            "time_x_q1": q1 / unit_ms,
            "time_x_q3": q3 / unit_ms,
            "peak_mb": row["peak_mb"],
            "peak_x": row["peak_mb"] / unit["peak_mb"],
            "held_mb": row["held_mb"],
            "held_x": row["held_mb"] / unit["held_mb"],
            "flops": row["flops"],
            "flops_x": row["flops"] / unit["flops"],
            "grad_rel_diff": None
            if name == next(iter(rows))
            else float((grads - ref).norm() / ref.norm()),
        }
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def table(results: dict, note: str) -> str:
    lines = [
        note,
        "",
        "| model | step | time x FM (q25-q75) | ms | peak x FM | held x FM | FLOPs x FM "
        "| grads vs py-meanflow |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in results.items():
        for name, row in rows.items():
            diff = "-" if row["grad_rel_diff"] is None else f"{row['grad_rel_diff']:.1e}"
            lines.append(
                f"| {model} | {name} | {row['time_x']:.2f} ({row['time_x_q1']:.2f}-"
                f"{row['time_x_q3']:.2f}) | {row['ms']:.1f} | {row['peak_x']:.2f} | "
                f"{row['held_x']:.2f} | {row['flops_x']:.2f} | {diff} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU only)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--load", default="", help="the load average, noted in the table")
    args = parser.parse_args()
    if args.rounds < 2 or args.threads < 1:
        parser.error("--rounds must be at least 2 (quartiles) and --threads at least 1")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    results = {model: measure(model, device, args.rounds) for model in args.models}
    rules = {model: ablation(model, device) for model in args.models}
    note = provenance(_device_name(device)) + f" {args.rounds} interleaved rounds."
    if args.load:
        note += f" Load average before the run: {args.load}."
    out = ROOT / "benchmarks" / "results" / f"meanflow_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    dump = {"device": _device_name(device), "results": results, "rule_ablation": rules}
    out.write_text(json.dumps(dump, indent=2))
    text = table(results, note) + "\n\n" + ablation_table(rules)
    update_section("meanflow_step", "One MeanFlow step (`benchmarks/meanflow_step.py`)", text)
    print(text)


if __name__ == "__main__":
    main()
