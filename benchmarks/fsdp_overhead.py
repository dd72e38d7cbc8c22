"""What FSDP2 costs on one GPU: ``mfcore-distill``'s step with ``--parallel fsdp`` in a
process group of one, against the same step with ``--parallel none``.

Two GPUs' worth of FSDP2 cannot run on one device, but its machinery can: at world size 1
every unit still gathers its (single) shard into a separate buffer before each call of the
shared transformer and frees it after, the hooks run, the gradients go through the reduce,
and the optimiser and EMA work on DTensors. The difference to the plain step is that
overhead; what sharding saves per GPU at 8 and 16 ranks is in docs/distributed.md.

On CUDA: the FLUX slice of ``benchmarks/flux_step.py`` (FLUX.1-dev width, 2 double + 4
single blocks), bf16 base weights and autocast, B = 2 at 1024 image + 512 text tokens, LoRA
rank 64, the seed method's step (critic update, differential target by ``func``, alignment
loss), built by :func:`mfcore.adapters.distill.build_run` and run by its ``train_step``. On a
CPU: the tiny FLUX with gloo, only to smoke-test the script.

Writes ``benchmarks/results/fsdp_overhead-<device>.json`` and prints a table; on CUDA at the
slice also the ``fsdp_overhead`` section of ``docs/benchmarks.md``.
Usage: ``python benchmarks/fsdp_overhead.py [--reps 5] [--tiny]``.
"""

from __future__ import annotations

import functools
import gc
import os
import platform
import socket
import tempfile

import _report  # benchmarks/ is on sys.path as the script's dir
import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel

from mfcore.adapters.data import make_synthetic_data
from mfcore.adapters.distill import DistillConfig, build_run
from mfcore.adapters.flux import FLUX_DEV_CONFIG, TINY_FLUX_CONFIG
from mfcore.adapters.step import train_step

SLICE = dict(FLUX_DEV_CONFIG, num_layers=2, num_single_layers=4)
MODES = ("none", "fsdp")


def _data(folder: str, tiny: bool) -> None:
    sizes = {} if tiny else dict(channels=16, height=64, width=64, seq_len=512)
    dims = {} if tiny else dict(joint_attention_dim=4096, pooled_projection_dim=768)
    make_synthetic_data(folder, family="flux", num_files=1, per_file=2, **sizes, **dims)


def _measure(mode: str, folder: str, device: torch.device, tiny: bool, reps: int) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**(TINY_FLUX_CONFIG if tiny else SLICE))
    dtype = "fp32" if tiny else "bf16"
    transformer.to(torch.float32 if tiny else torch.bfloat16)
    cfg = DistillConfig(
        data=folder, output=os.path.join(folder, mode), tiny=True, family="flux",
        batch_size=2, switch="fixed", warmup_steps=0, align="fake", critic_lead=0,
        lora_rank=4 if tiny else 64, critic_rank=4 if tiny else 64, weights_dtype=dtype,
        device=device.type, parallel=mode, preview_every=0, report_to="none", progress=False,
    )  # fmt: skip
    run = build_run(cfg, transformer=transformer)
    row = {"mode": mode, **_report.time_and_peak(functools.partial(train_step, run), device, reps)}
    del run, transformer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    args, device, tiny = _report.gpu_args(__doc__, reps=5)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            _data(folder, tiny)
            rows = [_measure(m, folder, device, tiny, args.reps) for m in MODES]
    finally:
        dist.destroy_process_group()
    for row in rows:
        row["x_plain"] = row["median_ms"] / rows[0]["median_ms"]
        if row["peak_gib"] is not None and rows[0]["peak_gib"]:
            row["peak_x_plain"] = row["peak_gib"] / rows[0]["peak_gib"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    config = "tiny FLUX" if tiny else "FLUX slice: 2 double + 4 single blocks, full width"
    result = {"device": name, "torch": torch.__version__, "config": config, "rows": rows}
    path = _report.write_result("fsdp_overhead", device.type, tiny, result)
    lines = [
        f"| seed-method step ({config}) | time (ms) | x plain | peak (GiB) |",
        "|---|---|---|---|",
    ]
    label = {"none": "plain (`--parallel none`)", "fsdp": "FSDP2, world size 1 (`--parallel fsdp`)"}
    for row in rows:
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        lines.append(
            f"| {label[row['mode']]} | {row['median_ms']:.1f} | {row['x_plain']:.2f} | {peak} |"
        )
    table = "\n".join(lines)
    print(table)
    if device.type == "cuda" and not tiny:  # a CPU smoke run never overwrites GPU numbers
        title = "FSDP2 at world size 1 (`benchmarks/fsdp_overhead.py`)"
        head = _report.provenance(name) + f" Median of {args.reps} steps."
        _report.update_section("fsdp_overhead", title, head + "\n\n" + table)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
