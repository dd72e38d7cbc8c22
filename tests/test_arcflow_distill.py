"""``mfcore-distill train --student arcflow``: ArcFlow's student through the entry point (EMA,
checkpoints, resume, export, generate), on the tiny FLUX model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mfcore.adapters.data import LatentDataset, make_synthetic_data
from mfcore.adapters.distill import DistillConfig, distill
from mfcore.adapters.distill_cli import main
from mfcore.adapters.family import get_family
from mfcore.adapters.flux_arcflow import FluxArcFlowStudent
from mfcore.adapters.generation import seeded_noise
from mfcore.arcflow import sample_arcflow
from tests._close import FP32, assert_close_to


def _cfg(tmp_path, data, name, **kw) -> DistillConfig:
    base = dict(data=str(data), output=str(tmp_path / name), tiny=True, student="arcflow",
                steps=4, batch_size=2, lr=1e-2, lora_rank=2, device="cpu", seed=1,
                weights_dtype="fp32", checkpoint_every=2, preview_every=0, progress=False,
                report_to="none")  # fmt: skip
    return DistillConfig(**(base | kw))


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    make_synthetic_data(str(folder), family="flux", num_files=2, per_file=2, height=4, width=4)
    return folder


def test_arcflow_run_trains_exports_resumes_and_generates(tmp_path, data, capsys):
    """The run trains the ArcFlow loss (its metrics), the export reloads to the returned
    student, a run resumed at step 2 ends where the uninterrupted one does (one process:
    bitwise), and generate samples the mixture's closed-form steps on FLUX's grid."""
    student = distill(_cfg(tmp_path, data, "run"))
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4 and all('"phase": "arcflow"' in r and "velocity_mse" in r for r in rows)
    state = student.trainable_state_dict()
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)  # trained

    fam = get_family("flux")
    fresh = fam.tiny_model(1, torch.float32, False)
    loaded = FluxArcFlowStudent.from_pretrained(fresh, tmp_path / "run" / "student")
    for k, v in loaded.trainable_state_dict().items():
        assert torch.equal(v, state[k]), k  # the EMA weights, saved and read back as they are

    distill(_cfg(tmp_path, data, "resumed", steps=2))
    resumed = distill(_cfg(tmp_path, data, "resumed", resume=True))
    for k, v in resumed.trainable_state_dict().items():
        assert torch.equal(v, state[k]), k

    out = tmp_path / "images"
    argv = ["generate", "--student", str(tmp_path / "run"), "--data", str(data), "--count",
            "2", "--steps", "1", "2", "--seed", "4", "--dtype", "fp32",
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    latents = load_file(str(out / "latents.safetensors"))
    x, cond = LatentDataset(data, fam).take([0, 1], "cpu")
    noise = seeded_noise((2, *x.shape[1:]), 4, "cpu", torch.float32)
    loaded.eval()
    for k in (1, 2):
        grid = fam.sampling_grid(k, 4, 4, dtype=torch.float32)
        ref = sample_arcflow(loaded, noise, k, grid=grid, cond=cond)
        assert_close_to(latents[f"{k}step"], ref, FP32, f"{k} steps")
    # its last checkpoint (the EMA weights it kept) generates the same images
    again = tmp_path / "from-checkpoint"
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert main([*argv[:2], str(ckpt), *argv[3:-1], str(again)]) == 0
    other = load_file(str(again / "latents.safetensors"))
    for k in ("1step", "2step"):
        assert_close_to(other[k], latents[k], FP32, f"checkpoint {k}")


def test_arcflow_refuses_what_it_cannot_run(tmp_path, data):
    with pytest.raises(ValueError, match="FLUX only"):
        distill(_cfg(tmp_path, data, "a", family="hunyuanimage2"))
    with pytest.raises(ValueError, match="no alignment"):
        distill(_cfg(tmp_path, data, "b", align="fake"))
    with pytest.raises(ValueError, match="micro-batches"):
        distill(_cfg(tmp_path, data, "c", micro_batch_size=1))
    with pytest.raises(ValueError, match="student"):
        _cfg(tmp_path, data, "d", student="consistency")
