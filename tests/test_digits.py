"""The digits benchmark (mfcore.toys.digits): its data, its metrics against known values, the
saved teacher through the FLUX family, and a smoke run of the whole pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")

from mfcore.adapters.data import LatentDataset  # noqa: E402
from mfcore.adapters.family import detect_family, get_family  # noqa: E402
from mfcore.toys.digits.data import (  # noqa: E402
    NULL_CLASS,
    NUM_CLASSES,
    SIZE,
    class_embeddings,
    load_digits,
    split,
    to_digits,
    write_data,
)
from mfcore.toys.digits.metrics import frechet_distance, precision_recall  # noqa: E402
from mfcore.toys.digits.teacher import TeacherConfig, teacher_folder  # noqa: E402

# float64 sample moments; scipy's sqrtm of a 5x5 product is good to about 1e-10 relative
FD_RTOL = 1e-8

TINY_TEACHER = TeacherConfig(
    num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
    text_dim=8, pooled_dim=8, steps=2, batch_size=8,
)  # fmt: skip


def _cloud(seed: int, n: int = 400, d: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)) @ np.diag(np.arange(1.0, d + 1))


# ------------------------------------------------------------------------------------ data


def test_digits_load_as_16x16_latents_in_the_unit_range():
    d = load_digits()
    assert d.x.shape == (1797, 1, SIZE, SIZE) and d.x.dtype == torch.float32
    assert d.x.min() >= -1 and d.x.max() <= 1
    assert d.x.min() == -1  # the background is 0 of 16
    assert sorted(d.y.unique().tolist()) == list(range(NUM_CLASSES))


def test_digits_at_8x8_round_trip_to_sklearn_features_exactly():
    from sklearn.datasets import load_digits as sk_load

    np.testing.assert_array_equal(to_digits(load_digits(8).x), sk_load().data)


def test_split_is_stratified_disjoint_and_seeded():
    d = load_digits()
    train, held = split(d, 0.5, seed=0)
    assert len(train) + len(held) == len(d)
    for c in range(NUM_CLASSES):
        n = int((d.y == c).sum())
        assert int((held.y == c).sum()) == n // 2
    rows = {tuple(x.flatten().tolist()) for x in train.x[:50]}
    assert not rows & {tuple(x.flatten().tolist()) for x in held.x}
    again, _ = split(d, 0.5, seed=0)
    other, _ = split(d, 0.5, seed=1)
    assert torch.equal(train.x, again.x) and not torch.equal(train.x, other.x)
    with pytest.raises(ValueError, match="held_out"):
        split(d, 1.0)


def test_written_data_reads_as_flux_training_data(tmp_path):
    train, _ = split(load_digits())
    table = class_embeddings(8, 8)
    write_data(tmp_path, train, table, per_file=300)
    data = LatentDataset(tmp_path, get_family("flux"))
    assert len(data) == len(train)
    assert data.shapes["latents"] == (1, SIZE, SIZE)
    assert data.shapes["prompt_embeds"] == (1, 8) and data.shapes["pooled_prompt_embeds"] == (8,)
    x, cond = data.batch(0, 4, 0, "cpu")
    labels = [int(train.y[i]) for i in data.indices(0, 4, 0)]
    torch.testing.assert_close(cond["pooled_prompt_embeds"], table[1][labels], rtol=0, atol=0)
    torch.testing.assert_close(
        cond["negative_pooled_prompt_embeds"], table[1][[NULL_CLASS] * 4], rtol=0, atol=0
    )


# ------------------------------------------------------------------------------------ metrics


def test_frechet_distance_of_identical_sets_is_zero():
    a = _cloud(0)
    assert frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=FD_RTOL * np.trace(np.cov(a.T)))


def test_frechet_distance_of_a_shifted_and_scaled_set_is_closed_form():
    # b = s a + m has mean s mu + m and covariance s^2 S (S's root is s S), so
    # FD = |(s - 1) mu + m|^2 + (1 - s)^2 tr S exactly
    a, m, s = _cloud(1), np.array([1.0, -2.0, 0.5, 0.0, 3.0]), 0.7
    shift = (s - 1) * a.mean(0) + m
    want = shift @ shift + (1 - s) ** 2 * np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, s * a + m) == pytest.approx(want, rel=FD_RTOL)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-5, 5), st.floats(0.2, 3))
def test_frechet_distance_is_symmetric_and_invariant_to_a_common_shift(seed, c, s):
    a, b = _cloud(seed, 200, 4), s * _cloud(seed + 1, 300, 4)
    fd = frechet_distance(a, b)
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-7, abs=1e-9)
    assert frechet_distance(a + c, b + c) == pytest.approx(fd, rel=1e-7, abs=1e-9)


def test_precision_and_recall_of_identical_sets_are_one():
    a = _cloud(2)
    assert precision_recall(a, a.copy(), k=3) == (1.0, 1.0)


def test_a_collapsed_set_has_precision_one_and_recall_near_zero():
    real = _cloud(3)
    fake = np.repeat(real[:1], 300, axis=0)  # every sample is one real point
    precision, recall = precision_recall(real, fake, k=3)
    assert precision == 1.0
    assert recall == pytest.approx(1 / len(real))  # only that point itself


def test_metrics_reject_bad_input():
    a = _cloud(4)
    with pytest.raises(ValueError, match="share D"):
        frechet_distance(a, a[:, :3])
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(a, a, k=0)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(a, np.full_like(a, np.nan))


# ------------------------------------------------------------------------------------ teacher


def test_saved_teacher_loads_through_the_flux_family_and_is_cached(tmp_path):
    from diffusers import FluxTransformer2DModel

    train, _ = split(load_digits())
    first = teacher_folder(tmp_path / "t", train, TINY_TEACHER)
    assert first["cached"] is False
    assert teacher_folder(tmp_path / "t", train, TINY_TEACHER)["cached"] is True
    assert detect_family(tmp_path / "t") == "flux"
    family = get_family("flux")
    model, scheduler = family.load_model(str(tmp_path / "t"), torch.float32)
    assert isinstance(model, FluxTransformer2DModel)
    assert model.config.num_layers == 1 and model.config.in_channels == 4
    assert scheduler["max_shift"] == 1.15
    write_data(tmp_path / "d", train, class_embeddings(8, 8))
    LatentDataset(tmp_path / "d", family).check_transformer(model)  # fits the model


# ------------------------------------------------------------------------------------ pipeline


@pytest.mark.slow
def test_the_whole_benchmark_runs_at_a_tiny_budget(tmp_path):
    from mfcore.toys.digits.bench import BenchConfig, format_table, run_bench

    bench = BenchConfig(
        out=str(tmp_path), per_class=3, teacher_steps=4, teacher=TINY_TEACHER,
        distill=dict(steps=2, batch_size=4, checkpoint_every=1, preview_every=2, lora_rank=4),
    )  # fmt: skip
    result = run_bench(bench)
    rows = result["rows"]
    # the teacher's 4-step Euler reference and its 4-step "50-step" one share the noise
    assert rows["teacher euler 4"]["to_teacher"] == 0.0
    # two optimiser steps barely move the zero-initialised student off the teacher it starts as
    assert rows["student 4"]["to_teacher"] < 0.05
    assert result["distillation"]["teacher_evaluations"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["rows"]) == set(rows)
    samples = load_file(str(tmp_path / "samples.safetensors"))
    assert samples["student_1"].shape == (30, 1, SIZE, SIZE)
    assert samples["labels"].tolist() == sorted(samples["labels"].tolist())
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert "| student 2 |" in format_table(rows)
    # the run is the grid's default at seed 0, so the grid does not run it again
    logged = [json.loads(x) for x in (tmp_path / "grid" / "runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in logged] == [("default", 0)]


# ------------------------------------------------------------------------------------ grid


def _fake_row(seed: int, accuracy: float) -> dict:
    scores = {"accuracy": accuracy, "fd": 1.0, "precision": 0.5, "recall": 0.5, "to_teacher": 0.1}
    return {
        "seed": seed,
        "teacher_evaluations": 10,
        "seconds": 1.0,
        "differential_steps": 0,
        "reverts": 0,
        "steps": {"1": scores, "2": scores, "4": scores},
    }


def test_grid_resumes_run_by_run_and_summarises_over_seeds(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import mfcore.toys.digits.grid as grid
    from mfcore.toys.digits.bench import BenchConfig

    calls = []

    def fake_run(setup, name, seed, settings):
        calls.append((name, seed))
        return _fake_row(seed, 0.5 + 0.25 * seed), {"student 1": torch.zeros(2, 1, 4, 4)}

    bench = BenchConfig(out=str(tmp_path))
    refs = {"teacher 50": torch.zeros(2, 1, 4, 4), "teacher euler 1": torch.zeros(2, 1, 4, 4)}
    setup = SimpleNamespace(labels=torch.zeros(2, dtype=torch.long), rows={}, references=refs,
                            bench=bench)  # fmt: skip
    monkeypatch.setattr(grid, "prepare", lambda bench: setup)
    monkeypatch.setattr(grid, "run_variant", fake_run)
    grid.run_grid(bench, only=["discrete"], seeds=1)
    assert calls == [("grid-discrete", 0)]
    tables = grid.run_grid(bench, only=["discrete"], seeds=2)  # seed 0 is not run again
    assert calls == [("grid-discrete", 0), ("grid-discrete", 1)]
    assert (tmp_path / "grid" / "figure.png").is_file()  # the teacher's columns, at least
    summary = json.loads((tmp_path / "grid" / "results.json").read_text())["summary"]
    mean, sd = summary["discrete"]["1"]["accuracy"]
    assert mean == pytest.approx(0.625) and sd == pytest.approx(0.25 / 2**0.5)
    assert "| discrete | 2 | 0.625 ± 0.177 |" in tables
    assert (tmp_path / "grid" / "samples" / "discrete-seed1.safetensors").is_file()
    grid.run_grid(bench, only=["discrete", "fixed"], seeds=3, run=False)  # tabulates only
    assert len(calls) == 2
    with pytest.raises(ValueError, match="unknown variants"):
        grid.run_grid(bench, only=["nope"])
