"""Trainable fractions of the MeanFlow students at the real configs, built on the meta device.

FLUX.1-dev, HunyuanImage 2.1 (base) and HunyuanImage 3.0 (the release config, through NeMo
Automodel's class) with each family's default LoRA targets at ranks 16, 64 and 128, plus the
interval embedding. No weights are allocated: the numbers are exact parameter counts.
Writes ``benchmarks/results/trainable_fractions.json`` and its section of docs/benchmarks.md.

    python benchmarks/trainable_fractions.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks._report import provenance, update_section
from mfcore.adapters.family import get_family
from mfcore.adapters.flux import FLUX_DEV_CONFIG
from mfcore.adapters.hunyuanimage2 import HY21_BASE_CONFIG
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.sizes import meta_counts

RESULTS = Path(__file__).resolve().parent / "results" / "trainable_fractions.json"
RANKS = (16, 64, 128)


def builders() -> dict:
    from diffusers import FluxTransformer2DModel, HunyuanImageTransformer2DModel
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.hunyuan_image3.config import HunyuanImage3Config
    from nemo_automodel.components.models.hunyuan_image3.model import HunyuanImage3ForCausalMM

    from mfcore.adapters.hunyuanimage3 import BACKEND

    backend = BackendConfig(**BACKEND, enable_hf_state_dict_adapter=False)
    return {
        "FLUX.1-dev": ("flux", lambda: FluxTransformer2DModel(**FLUX_DEV_CONFIG)),
        "HunyuanImage-2.1": (
            "hunyuanimage2",
            lambda: HunyuanImageTransformer2DModel(**HY21_BASE_CONFIG),
        ),
        "HunyuanImage-3.0": (
            "hunyuanimage3",
            lambda: HunyuanImage3ForCausalMM(HunyuanImage3Config(), backend=backend),
        ),
    }


def active_parameters() -> int:
    """HunyuanImage 3.0's parameters used per token: all but the routed experts, plus the
    top-k share of them."""
    from nemo_automodel.components.models.common import BackendConfig
    from nemo_automodel.components.models.hunyuan_image3.config import HunyuanImage3Config
    from nemo_automodel.components.models.hunyuan_image3.model import HunyuanImage3ForCausalMM

    from mfcore.adapters.hunyuanimage3 import BACKEND

    config = HunyuanImage3Config()
    with torch.device("meta"):
        model = HunyuanImage3ForCausalMM(
            config, backend=BackendConfig(**BACKEND, enable_hf_state_dict_adapter=False)
        )
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    topk = config.moe_topk[0] if isinstance(config.moe_topk, list) else config.moe_topk
    return total - routed + routed * topk // config.num_experts


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name, (family, build) in builders().items():
        for rank in RANKS:
            counts = meta_counts(build, get_family(family), LoraSpec(rank=rank))
            rows.append({"model": name, "family": family, "rank": rank, **counts})
            print(f"{name:18s} rank {rank:3d}: {counts['trainable'] / 1e6:8.1f}M of "
                  f"{counts['base'] / 1e9:.2f}B, {100 * counts['fraction']:.3f} %")  # fmt: skip
    active = active_parameters()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "hunyuanimage3_active": active}, indent=2))
    lines = [
        provenance("meta device (parameter counts, no weights)"),
        "",
        "| model | base parameters | LoRA rank | trainable (LoRA + interval) | fraction of total |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['base'] / 1e9:.2f}B | {r['rank']} | "
            f"{r['trainable'] / 1e6:.1f}M | {100 * r['fraction']:.3f} % |"
        )
    lines += [
        "",
        f"HunyuanImage-3.0 uses {active / 1e9:.2f}B parameters per token (top-k experts).",
    ]
    update_section(
        "trainable_fractions", "Trainable fractions at the real configs", "\n".join(lines)
    )


if __name__ == "__main__":
    main()
