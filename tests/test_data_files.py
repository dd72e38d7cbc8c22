"""The data and checkpoint files a run reads (issue 17, sections 3 and 4): bounded memory
with the same samples, and an error naming the file (and key) for every bad file."""

from __future__ import annotations

import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mfcore.adapters._state import load_state, save_state
from mfcore.adapters.data import LatentDataset, make_synthetic_data
from mfcore.adapters.distill import DistillConfig, distill, latest_checkpoint
from mfcore.adapters.family import detect_family, get_family
from mfcore.adapters.loading import load_scheduler_config
from mfcore.adapters.student import read_student_config


def write(folder, family="flux", **kw) -> list[str]:
    sizes = dict(num_files=3, per_file=3, height=4, width=4, seq_len=4) | kw
    return make_synthetic_data(folder, family=family, **sizes)


# --------------------------------------------------------------------------- bounded memory


def test_data_reads_hold_no_file_in_memory(tmp_path):
    paths = write(tmp_path)
    data = LatentDataset(tmp_path)
    data.batch(0, len(data), 0, "cpu")  # every file read once
    # the files change on disk: a reader that kept them would return the old values
    for path in paths:
        tensors = load_file(path)
        save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, path)
    x, _ = data.batch(0, len(data), 0, "cpu")
    rows = [data.index[k] for k in data.indices(0, len(data), 0)]
    fresh = torch.stack([load_file(paths[i])["latents"][j] for i, j in rows])
    assert torch.equal(x, fresh)


@pytest.mark.parametrize("family", ["flux", "hunyuanimage2", "hunyuanimage3"])
def test_data_batches_are_the_files_rows_and_ranks_share_them(tmp_path, family):
    paths = write(tmp_path, family)
    data = LatentDataset(tmp_path, get_family(family))
    files = [load_file(p) for p in paths]
    for step in range(4):
        x, cond = data.batch(step, 4, 7, "cpu")
        rows = [data.index[k] for k in data.indices(step, 4, 7)]
        assert torch.equal(x, torch.stack([files[i]["latents"][j] for i, j in rows]))
        for k, v in cond.items():
            assert torch.equal(v, torch.stack([files[i][k][j] for i, j in rows]).to(v.dtype)), k
        # two ranks' halves are the whole batch's rows (as DistributedSampler shards)
        halves = [data.batch(step, 4, 7, "cpu", rows=slice(r * 2, r * 2 + 2))[0] for r in (0, 1)]
        assert torch.equal(torch.cat(halves), x)


# --------------------------------------------------------------------------- named errors


def _bad_files(folder, good: str) -> dict:
    raw = open(good, "rb").read()
    header = b'{"latents":\xff\xfe}'
    return {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "not safetensors": b"hello, this is a text file and not tensors at all",
        "non-UTF-8 header": struct.pack("<Q", len(header)) + header,
    }


@pytest.mark.parametrize("kind", ["truncated", "empty", "not safetensors", "non-UTF-8 header"])
def test_a_broken_data_file_is_named(tmp_path, kind):
    paths = write(tmp_path)
    content = _bad_files(tmp_path, paths[0])[kind]
    with open(paths[1], "wb") as f:
        f.write(content)
    with pytest.raises(ValueError, match=f"data file {paths[1]} is truncated or corrupt"):
        LatentDataset(tmp_path)


def test_a_folder_named_safetensors_is_named(tmp_path):
    write(tmp_path)
    (tmp_path / "zz.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"zz.safetensors is a folder"):
        LatentDataset(tmp_path)


def _rewrite(path, **changes) -> None:
    tensors = load_file(path) | changes
    save_file({k: v for k, v in tensors.items() if v is not None}, path)


def test_a_key_with_the_wrong_dtype_or_shape_is_named(tmp_path):
    paths = write(tmp_path)
    latents = load_file(paths[1])["latents"]
    _rewrite(paths[1], latents=latents.to(torch.int64))
    with pytest.raises(ValueError, match=rf"{paths[1]}: latents are I64, not floating point"):
        LatentDataset(tmp_path)
    _rewrite(paths[1], latents=latents.to(torch.float16))
    with pytest.raises(ValueError, match=rf"{paths[1]}: latents is F16, but .* F32"):
        LatentDataset(tmp_path)
    _rewrite(paths[1], latents=latents, pooled_prompt_embeds=torch.tensor(1.0))
    with pytest.raises(ValueError, match=rf"{paths[1]}: pooled_prompt_embeds is a scalar"):
        LatentDataset(tmp_path)
    _rewrite(paths[1], latents=latents[:, 0].to(torch.int64))  # every fault in one error
    with pytest.raises(ValueError, match=r"is a scalar.*; latents are I64.*; latents must be"):
        LatentDataset(tmp_path)
    _rewrite(paths[1], latents=latents)
    _rewrite(paths[1], pooled_prompt_embeds=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=rf"{paths[1]}: per-sample shapes"):
        LatentDataset(tmp_path)


def test_a_config_json_that_is_not_json_is_named(tmp_path):
    for name, content in (("text", b"not json {"), ("latin", b'{"a": "\xe9"}')):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_bytes(content)
        with pytest.raises(ValueError, match=f"model config {folder / 'config.json'} is not"):
            detect_family(folder)
    (tmp_path / "text" / "scheduler").mkdir()
    (tmp_path / "text" / "scheduler" / "scheduler_config.json").write_text("[1,")
    with pytest.raises(ValueError, match="scheduler config .*scheduler_config.json is not JSON"):
        load_scheduler_config(tmp_path / "text")
    fam = get_family("flux")
    (tmp_path / "text" / fam.student_config_name).write_text("{")
    with pytest.raises(ValueError, match=f"student config .*{fam.student_config_name} is not"):
        read_student_config(tmp_path / "text", fam)


def _run_config(tmp_path, **kw) -> DistillConfig:
    base = dict(data=str(tmp_path / "data"), output=str(tmp_path / "run"), tiny=True, steps=2)
    base |= dict(switch="never", warmup_ode_steps=1, checkpoint_every=2, lora_rank=2)
    base |= dict(batch_size=2, device="cpu", weights_dtype="fp32", progress=False)
    base |= dict(preview_every=0, report_to="none", keep_checkpoints=1)
    return DistillConfig(**(base | kw))


def test_a_checkpoint_with_a_bad_file_or_a_missing_entry_is_named(tmp_path):
    write(tmp_path / "data", num_files=2, per_file=2)
    distill(_run_config(tmp_path))
    ckpt = latest_checkpoint(tmp_path / "run")
    config = os.path.join(ckpt, "config.json")
    saved = open(config, "rb").read()
    open(config, "w").write("{not json")
    with pytest.raises(ValueError, match=f"checkpoint file {config} is not JSON"):
        distill(_run_config(tmp_path, steps=4, resume=True))
    open(config, "wb").write(saved)
    state = load_state(os.path.join(ckpt, "state"))
    del state["optimizer"]
    save_state(state, os.path.join(ckpt, "state"))
    with pytest.raises(ValueError, match=rf"checkpoint {ckpt} lacks the entries \['optimizer'\]"):
        distill(_run_config(tmp_path, steps=4, resume=True))


def test_a_toy_checkpoint_missing_an_entry_is_named(tmp_path):
    import mfcore.toys.train as toy

    cfg = dict(steps=2, batch=8, hidden=8, depth=1, align="none", discrete_steps=1)
    cfg |= dict(eval_samples=8, teacher_steps=1, progress=False, figures=False)
    cfg |= dict(out_dir=str(tmp_path), name="t")
    toy.run(cfg)
    stem = tmp_path / "t" / "checkpoint" / "state"
    state = load_state(stem)
    del state["rng"]
    save_state(state, stem)
    with pytest.raises(ValueError, match=r"lacks the entries \['rng'\]"):
        toy.read_checkpoint(toy.ToyConfig(**cfg, resume=True))
