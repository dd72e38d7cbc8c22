"""Memory per GPU of ``mfcore-distill`` at 1024 px: FLUX.1-dev, HunyuanImage 2.1 and 3.0 at
world sizes 1, 8 and 16 (an estimate: counted, and scaled from a measured tiny run).

Weights, gradients and optimiser state are exact counts of the real configs on the meta
device, built as the entry point builds them: the student (LoRA rank 64 on the family's
targets plus the interval embedding) and the critic's second adapter (rank 64), times the
bytes each parameter costs:

- frozen base, bf16: 2 B, sharded over the ranks by FSDP2 (world size 1 is the plain run);
- FSDP2's gathered units: the root (everything outside the blocks, gathered for the whole
  step) plus two blocks (the one running and the one prefetched), bf16;
- the student's trained weights, fp32: weight, gradient, AdamW's two moments and the EMA
  (20 B), plus the warm-up rollback's copy of weight, moments and EMA (16 B; on the GPU and
  sharded under FSDP2, in host memory in a one-process run);
- the critic's LoRA, fp32: weight, gradient and AdamW (16 B).

Activations are measured, not counted: a training forward of each family's tiny model
(fp32, CPU, torch's flash SDPA, which saves O(tokens x width) per attention like the GPU
kernels) records the bytes it saves for the backward inside each block and outside them
(``torch.autograd.graph.saved_tensors_hooks``, parameters excluded), as a multiple of
``tokens x width``. At the real size, with gradient checkpointing (the default), a forward
with its graph keeps each block's input (``tokens x width``) and everything outside the
blocks; the backward recomputes one block at a time (its measured multiple); a step holds
two such forwards (the MeanFlow loss's and the 1-step alignment trajectory's) at bf16
(2 B), for one sample per rank. The multiples come from tiny models built with the real
models' proportions (MLP ratio; for HunyuanImage 3.0 top-8 experts of 3/4 width plus a
shared one); attention matrices are not stored (flash attention), the JVP's no-grad pass
holds only a few layers' tensors at a time and is left out.

Writes ``benchmarks/results/distributed_memory.json`` and the tables to
``docs/distributed.md`` and ``docs/benchmarks.md``. Usage (from the repository root):
``python -m benchmarks.distributed_memory``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, HunyuanImageTransformer2DModel
from torch import nn

from benchmarks._report import DOCS, provenance, update_section
from benchmarks.trainable_fractions import builders
from mfcore.adapters.alignment import FakeVelocity
from mfcore.adapters.data import LatentDataset, make_synthetic_data
from mfcore.adapters.family import get_family
from mfcore.adapters.flux import TINY_FLUX_CONFIG
from mfcore.adapters.hunyuanimage2 import TINY_HY21_CONFIG
from mfcore.adapters.hunyuanimage3 import TINY_HY3_CONFIG, build_model
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.parallel import transformer_blocks
from mfcore.adapters.student import MeanFlowStudent

RESULTS = Path(__file__).resolve().parent / "results" / "distributed_memory.json"
GUIDE = DOCS.parent / "distributed.md"
WORLDS = (1, 8, 16)
RANK = 64
GPU_GB = 80
FORWARDS = 2  # forwards whose graphs a step keeps until its backward
#: At 1024 x 1024 px: image tokens, text tokens, width (from the real configs; docs/flux.md,
#: docs/hunyuanimage.md): FLUX packs 2x2 of a 128x128 latent with 512 T5 tokens;
#: HunyuanImage 2.1 has a 32x32 latent (32x VAE) with 1000 Qwen + 128 ByT5 tokens;
#: HunyuanImage 3.0 a 64x64 latent (16x VAE) after a prompt of about 128 tokens.
SHAPES = {
    "flux": {"image": 4096, "text": 512, "width": 3072},
    "hunyuanimage2": {"image": 1024, "text": 1128, "width": 3584},
    "hunyuanimage3": {"image": 4096, "text": 134, "width": 4096},
}
#: Tiny models with the real proportions, and their latent side and text length.
TINY = {
    "flux": (TINY_FLUX_CONFIG, 16, 32),
    "hunyuanimage2": (TINY_HY21_CONFIG | {"mlp_ratio": 4.0}, 16, 32),
    "hunyuanimage3": (
        TINY_HY3_CONFIG
        | {"num_experts": 16, "moe_topk": 8, "moe_intermediate_size": 48}
        | {"intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 1},
        16,
        16,
    ),
}


def _tiny_model(family: str) -> nn.Module:
    config = TINY[family][0]
    if family == "hunyuanimage3":
        return build_model(config, torch.float32)
    torch.manual_seed(0)
    cls = FluxTransformer2DModel if family == "flux" else HunyuanImageTransformer2DModel
    return cls(**config)


def activation_multiples(family: str, folder: Path) -> dict[str, float]:
    """Bytes a training forward saves for the backward, per block (the largest) and outside
    the blocks, each over ``tokens x width x 4`` (fp32), on the family's proportioned tiny
    model."""
    fam = get_family(family)
    _, side, text = TINY[family]
    model = _tiny_model(family)
    student = MeanFlowStudent(model, fam, lora=LoraSpec(rank=2))
    data = folder / family  # the proportioned models take the tiny models' inputs
    make_synthetic_data(data, family=family, num_files=1, per_file=1, height=side, width=side,
                        seq_len=text)  # fmt: skip
    x, cond = LatentDataset(data, fam).batch(0, 1, 0, "cpu")
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    blocks = transformer_blocks(model)
    saved: dict[int, int] = {}
    seen: set[int] = set()
    current = [-1]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            saved[current[0]] = saved.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, -1)))
    t = torch.tensor([0.7])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student(x, torch.tensor([0.3]), t, **cond).sum()
    for h in handles:
        h.remove()
    tokens = _tiny_tokens(family, x, cond)
    width = _width(model, family)
    per_block = max(v for k, v in saved.items() if k >= 0)
    return {
        "block": per_block / (tokens * width * 4),
        "outside": saved.get(-1, 0) / (tokens * width * 4),
        "tiny_tokens": tokens,
        "tiny_width": width,
    }


def _tiny_tokens(family: str, x: torch.Tensor, cond: dict) -> int:
    _, _, h, w = x.shape
    if family == "flux":
        return h * w // 4 + cond["prompt_embeds"].shape[1]
    if family == "hunyuanimage2":
        return h * w + cond["prompt_embeds"].shape[1]
    return cond["input_ids"].shape[1]


def _width(model: nn.Module, family: str) -> int:
    cfg = model.config
    if family == "hunyuanimage3":
        return cfg.hidden_size
    return cfg.num_attention_heads * cfg.attention_head_dim


def meta_sizes(family: str, build) -> dict[str, float]:
    """Parameter counts of the real student and critic on the meta device."""
    with torch.device("meta"):
        student = MeanFlowStudent(build(), get_family(family), lora=LoraSpec(rank=RANK))
        spec = LoraSpec(rank=RANK, target_modules=student.lora_spec.target_modules)
        fake = FakeVelocity(student, lora=spec)
    tr = student.transformer
    trained = sum(p.numel() for p in student.trainable_parameters())
    critic = sum(p.numel() for p in fake.parameters())
    total = sum(p.numel() for p in tr.parameters()) + sum(
        p.numel() for p in student.interval.parameters()
    )
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(tr)]
    experts = sum(p.numel() for n, p in tr.named_parameters() if ".mlp.experts." in n)
    return {
        "base": total - trained - critic,
        "trained": trained,
        "critic": critic,
        "blocks": len(block_sizes),
        "largest_block": max(block_sizes),
        "outside_blocks": total - sum(block_sizes),
        "experts": experts,
    }


def _trained(sizes: dict, shard: int, on_gpu_copy: bool) -> dict[str, float]:
    """GB per GPU of the trained state: the student's and the critic's fp32 weights, their
    gradients and AdamW moments, the student's EMA and (under FSDP2) the rollback's copy."""
    gb, both = 1e9, sizes["trained"] + sizes["critic"]
    copy = 16 if on_gpu_copy else 0  # weight, two moments, EMA (host memory in one process)
    return {
        "weights": 4 * both / shard / gb,
        "gradients": 4 * both / shard / gb,
        "AdamW": 8 * both / shard / gb,
        "EMA + rollback": (4 + copy) * sizes["trained"] / shard / gb,
    }


def estimate(sizes: dict, acts: dict, shape: dict, world: int) -> dict[str, float]:
    """GB per GPU at ``world`` ranks (1: the plain run; more: FSDP2)."""
    gb, shard = 1e9, world if world > 1 else 1
    tokens, width = shape["image"] + shape["text"], shape["width"]
    plane = tokens * width * 2  # one bf16 activation of the whole sequence
    kept = FORWARDS * (sizes["blocks"] + acts["outside"]) * plane
    gathered = 2 * (sizes["outside_blocks"] + 2 * sizes["largest_block"]) / gb
    out = {
        "base": 2 * sizes["base"] / shard / gb,
        "gathered": gathered if world > 1 else 0.0,
        **_trained(sizes, shard, world > 1),
        "activations": (kept + acts["block"] * plane) / gb,
    }
    out["total"] = sum(out.values())
    return out


def expert_parallel(sizes: dict, acts: dict, shape: dict, world: int) -> dict[str, float]:
    """HunyuanImage 3.0 with NeMo-style expert parallelism over ``world`` ranks: each rank
    holds ``experts / world`` routed experts whole, FSDP2 shards the rest, and tokens travel
    to their top-8 experts' ranks and back (send and receive buffers of ``tokens x 8 x
    width``, bf16)."""
    gb = 1e9
    dense = sizes["base"] - sizes["experts"]
    per_layer_dense = sizes["largest_block"] - sizes["experts"] / sizes["blocks"]
    tokens, width = shape["image"] + shape["text"], shape["width"]
    out = {
        "experts": 2 * sizes["experts"] / world / gb,
        "dense (sharded)": 2 * dense / world / gb,
        "gathered": 2 * (sizes["outside_blocks"] + 2 * per_layer_dense) / gb,
        **{f"trained: {k}": v for k, v in _trained(sizes, world, True).items()},
        "dispatch": 2 * 2 * tokens * 8 * width * 2 / gb,
        "activations": estimate(sizes, acts, shape, world)["activations"],
    }
    out["total"] = sum(out.values())
    return out


def main() -> None:
    torch.set_num_threads(1)
    rows, parallel = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, build) in builders().items():
            acts = activation_multiples(family, Path(tmp))
            sizes = meta_sizes(family, build)
            shape = SHAPES[family]
            for world in WORLDS:
                rows.append({"model": name, "family": family, "world": world, "sizes": sizes,
                             "multiples": acts, "shape": shape,
                             "gb": estimate(sizes, acts, shape, world)})  # fmt: skip
            if family == "hunyuanimage3":
                parallel = expert_parallel(sizes, acts, shape, 8)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "hunyuanimage3_ep8": parallel}, indent=2))
    table = _table(rows, parallel)
    print(table)
    body = provenance("meta device counts; activations from tiny CPU runs") + "\n\n" + table
    title = "Memory per GPU at 1024 px (`benchmarks/distributed_memory.py`)"
    update_section("distributed_memory", title, body)
    update_section("distributed_memory", title, body, docs=GUIDE)


def _table(rows: list[dict], parallel: dict) -> str:
    keys = ("base", "gathered", "weights", "gradients", "AdamW", "EMA + rollback")
    keys += ("activations", "total")
    lines = [
        "| model | GPUs | base weights (bf16) | FSDP2 gathered | trained weights (fp32) "
        "| gradients | AdamW | EMA + rollback | activations | total (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mode = "1 (one process)" if r["world"] == 1 else f"{r['world']} (FSDP2)"
        cells = " | ".join(f"{r['gb'][k]:.1f}" for k in keys)
        fits = "" if r["gb"]["total"] <= GPU_GB else " (over 80 GB)"
        lines.append(f"| {r['model']} | {mode} | {cells}{fits} |")
    lines += [
        "",
        "| HunyuanImage-3.0 on 8 GPUs, expert parallel (computed, not built) | GB per GPU |",
    ]
    lines += ["|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in parallel.items()]
    lines += ["", "| model | parameters (base) | student trained | critic | blocks | largest "
              "block | outside blocks | measured multiples (block, outside) |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows[:: len(WORLDS)]:
        s, m = r["sizes"], r["multiples"]
        lines.append(
            f"| {r['model']} | {s['base'] / 1e9:.2f}B | {s['trained'] / 1e6:.1f}M | "
            f"{s['critic'] / 1e6:.1f}M | {s['blocks']} | {s['largest_block'] / 1e6:.0f}M | "
            f"{s['outside_blocks'] / 1e6:.0f}M | {m['block']:.1f}, {m['outside']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
