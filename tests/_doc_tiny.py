"""Tiny stand-ins for the docs' code blocks (``<!-- doctest: tiny NAME -->``).

Each setup is a generator ``setup(ns, tmp_path)``: before its ``yield`` it puts small,
defined objects into the page's namespace ``ns`` (a tiny model saved where a block loads a
checkpoint, a few batches where it loops over a loader); after it, it asserts what the
block's text claims. The block itself runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests._cfg_peers import F64, fastgen_gradient_gap, peer_data, peer_inputs, peer_student
from tests._nets import MLPStudent

Setup = Callable[[dict, Path], Iterator[None]]
TINY: dict[str, Setup] = {}


def tiny(name: str) -> Callable[[Setup], Setup]:
    def register(setup: Setup) -> Setup:
        TINY[name] = setup
        return setup

    return register


# --------------------------------------------------------------------------- README


@tiny("quickstart")
def _quickstart(ns: dict, tmp: Path) -> Iterator[None]:
    from mfcore.toys.gmm import GaussianMixture

    torch.manual_seed(0)
    ns["student"] = MLPStudent(2, hidden=16)
    ns["teacher"] = GaussianMixture.ring(4).velocity
    ns["loader"] = [torch.randn(16, 2) for _ in range(3)]
    before = [p.detach().clone() for p in ns["student"].parameters()]
    yield
    assert ns["step"] == 2 and ns["images"].shape == (16, 2)
    assert bool(torch.isfinite(ns["images"]).all())
    after = list(ns["student"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


# --------------------------------------------------------------------------- concepts.md


class _LabelStudent(nn.Module):
    """The peers' tiny conditional student (``NUM_CLASSES = 3`` labels plus the null one)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = peer_student()

    def forward(self, z, r, t, y):
        return self.net(z, r, t, y)


@tiny("guided_training")
def _guided_training(ns: dict, tmp: Path) -> Iterator[None]:
    d = peer_inputs()
    ns.update(NUM_CLASSES=peer_data()["model"]["null_class"], student=_LabelStudent())
    ns.update(x=d["x"], labels=d["y"], mask=d["drop"], gen=torch.Generator().manual_seed(0))
    yield
    metrics = ns["metrics"]  # the second call's: the mask drops sample 0 of 8
    assert metrics["frac_dropped"].item() == 1 / 8
    assert ns["loss"].dtype == F64 and bool(torch.isfinite(ns["loss"]))


@tiny("guide_every_sample")
def _guide_every_sample(ns: dict, tmp: Path) -> Iterator[None]:
    from mfcore.losses import AdaptiveWeight, MeanFlowLoss

    case = peer_data()["cases"]["w1.5_k0.3/l2"]
    ns.update(omega=case["omega"], kappa=case["kappa"])
    yield
    # "that behaviour is one line away": the old values, stored when the old code ran
    g = ns["old"]
    assert g.label_dropout == 0.0 and not g.eval_mode and (g.t_min, g.t_max) == (0.0, 1.0)
    d = peer_inputs()
    loss_fn = MeanFlowLoss(weighting=AdaptiveWeight(case["p"], case["c"]), guidance=g)
    loss, _ = loss_fn(
        peer_student(), d["x"], noise=d["eps"], cond={"y": d["y"]}, r=d["r"], t=d["t"]
    )
    ref = torch.tensor(case["guide_every_sample"]["loss"], dtype=F64)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)  # fp64


@tiny("fastgen_opt_grad")
def _fastgen_opt_grad(ns: dict, tmp: Path) -> Iterator[None]:
    yield
    assert (ns["p"], ns["c"]) == (1.0, 0.1)  # FastGen's LossConfig defaults
    assert fastgen_gradient_gap(ns["opt_grad"], p=ns["p"], c=ns["c"]) < 1e-12  # fp64


# --------------------------------------------------------------------------- attention.md


@tiny("attention_jvp")
def _attention_jvp(ns: dict, tmp: Path) -> Iterator[None]:
    from mfcore.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 8, generator=g, dtype=F64)
    proj = nn.Linear(8, 8, dtype=F64)

    def model(z, r, t):  # z (B, H, S, D): self-attention of a time-shifted projection
        h = proj(z) * (1 + t - r)[:, None, None, None]
        return attention(h, h, h)

    b = q.shape[0]
    r, t = torch.rand(b, generator=g, dtype=F64), torch.ones(b, dtype=F64)
    ns.update(q=q, k=k, v=v, model=model, z=torch.randn_like(q), r=r, t=t)
    ns.update(zeros=torch.zeros_like(r), ones=torch.ones_like(t))
    ns["loss"] = lambda u, target: ((u - target) ** 2).sum()
    yield
    assert ns["o"].shape == (2, 2, 5, 8)  # (B, H, S_q, D_v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ns["o"], sdpa, rtol=1e-12, atol=1e-12)  # fp64
    u_ref, du_ref = torch.func.jvp(model, (ns["z"], r, t), (v, ns["zeros"], ns["ones"]))
    torch.testing.assert_close(ns["u"], u_ref, rtol=0, atol=0)
    du = ns["du"]
    torch.testing.assert_close(du, du_ref, rtol=0, atol=0)
    # "grads through u only": the gradient of loss(u, const) with u from a plain forward
    grad = torch.autograd.grad(ns["loss"](model(ns["z"], r, t), du.detach()), proj.weight)[0]
    torch.testing.assert_close(proj.weight.grad, grad, rtol=1e-12, atol=1e-12)  # fp64


def _softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@tiny("sdpa_routing")
def _sdpa_routing(ns: dict, tmp: Path) -> Iterator[None]:
    g = torch.Generator().manual_seed(1)
    primals = tuple(torch.randn(2, 2, 4, 8, generator=g, dtype=F64) for _ in range(3))
    tangents = tuple(torch.randn(2, 2, 4, 8, generator=g, dtype=F64) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def transformer_fn(q, k, v):  # an unmodified model: it looks SDPA up when called
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    ns.update(transformer_fn=transformer_fn, primals=primals, tangents=tangents)
    yield
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # restored on exit
    with pytest.raises(NotImplementedError):  # what torch's own fused SDPA does
        torch.func.jvp(transformer_fn, primals, tangents)
    u_ref, du_ref = torch.func.jvp(_softmax_attention, primals, tangents)
    torch.testing.assert_close(ns["u"], u_ref, rtol=1e-12, atol=1e-12)  # fp64
    torch.testing.assert_close(ns["du"], du_ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- FLUX


def _tiny_flux_checkpoint(tmp: Path) -> str:
    from diffusers import FluxTransformer2DModel

    from mfcore.adapters.flux import TINY_FLUX_CONFIG

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**dict(TINY_FLUX_CONFIG, guidance_embeds=True))
    model.save_pretrained(tmp / "transformer")
    return str(tmp)


def _flux_inputs(ns: dict, channels: int) -> None:
    g = torch.Generator().manual_seed(2)
    b, h, w = 2, 4, 4
    ns.update(height=h, width=w, z=torch.randn(b, channels, h, w, generator=g))
    ns["noise"] = ns["z"]
    ns["t"] = torch.rand(b, generator=g)
    ns["r"] = ns["t"] * torch.rand(b, generator=g)
    ns["pe"] = torch.randn(b, 3, 32, generator=g)
    ns["pooled"] = torch.randn(b, 32, generator=g)


@tiny("flux_student")
def _flux_student(ns: dict, tmp: Path) -> Iterator[None]:
    ns["path"] = _tiny_flux_checkpoint(tmp)  # stands for a FLUX.1-dev snapshot
    _flux_inputs(ns, channels=1)
    yield
    assert ns["u"].shape == ns["z"].shape
    t = ns["t"]
    v = ns["teacher"](ns["z"], t, prompt_embeds=ns["pe"], pooled_prompt_embeds=ns["pooled"])
    torch.testing.assert_close(ns["u"], v, rtol=0, atol=0)  # LoRA B = 0, interval branch 0


@tiny("flux_pipeline")
def _flux_pipeline(ns: dict, tmp: Path) -> Iterator[None]:
    from mfcore.adapters.family import get_family
    from mfcore.adapters.lora import LoraSpec
    from mfcore.adapters.student import MeanFlowStudent
    from tests._pipelines import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(levels=4)  # FLUX.1's VAE factor, 8
    pipe.save_pretrained(tmp / "flux")
    ns["path"] = str(tmp / "flux")  # stands for a FLUX.1-dev snapshot
    # what `train --output runs/flux-mf` exports (the working folder is the page's tmp)
    MeanFlowStudent(pipe.transformer, get_family("flux"), lora=LoraSpec(rank=2)).save_pretrained(
        "runs/flux-mf/student"
    )
    yield
    assert [im.size for im in ns["images"]] == [(512, 512)]
    assert Path("a-red-cat.png").is_file()


@tiny("flux_arcflow")
def _flux_arcflow(ns: dict, tmp: Path) -> Iterator[None]:
    ns["path"] = _tiny_flux_checkpoint(tmp)
    _flux_inputs(ns, channels=1)
    yield
    assert ns["latents"].shape == ns["noise"].shape
    assert bool(torch.isfinite(ns["loss"])) and ns["grid"].shape == (3,)


# --------------------------------------------------------------------------- adapters.md


@tiny("sd3_family")
def _sd3_family(ns: dict, tmp: Path) -> Iterator[None]:
    from mfcore.adapters.family import TrainingFamily

    yield
    # the block defines the whole family: every method and attribute the entry point needs
    assert isinstance(ns["FAMILY"], TrainingFamily)
    assert ns["SD3Student"].default_family is ns["FAMILY"]
    model = ns["FAMILY"].tiny_model(0, torch.float32, False)
    assert ns["FAMILY"].check_model(model) is model
