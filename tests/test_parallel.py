"""adapters.parallel without a process group: how a global batch splits, which modules are
FSDP2 units, the mode rule, and the named errors of the command line."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfcore.adapters.alignment import FakeVelocity
from mfcore.adapters.family import FAMILIES, get_family
from mfcore.adapters.lora import LoraSpec
from mfcore.adapters.parallel import (
    Split,
    World,
    choose_mode,
    mixed_precision,
    transformer_blocks,
)
from mfcore.adapters.student import MeanFlowStudent
from tests._cli import usage_error
from tests.test_distill import data

ADAPTERS = pathlib.Path(__file__).parents[1] / "adapters"


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 8), micro=st.integers(1, 4), parts=st.integers(1, 4))
def test_ranks_and_micro_batches_cover_the_global_batch_once(size, micro, parts):
    total = size * micro * parts
    rows = [r for rank in range(size) for a, b in Split(total, micro, rank, size).parts()
            for r in range(a, b)]  # fmt: skip
    assert rows == list(range(total))
    split = Split(total, micro, 0, size)
    # the weights make the ranks' average of accumulated means the global mean
    assert sum(split.weight(micro) for _ in range(parts)) * size / size == pytest.approx(1.0)
    assert split.weight(micro) * total / size == pytest.approx(micro)


def test_a_batch_that_does_not_split_is_named():
    with pytest.raises(ValueError, match="batch_size 6 .* world size 4 .* micro_batch_size 1"):
        Split(6, 1, 0, 4)
    with pytest.raises(ValueError, match="micro_batch_size 2"):
        Split(4, 2, 0, 4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_block_is_an_fsdp_unit(family):
    fam = get_family(family)
    model = fam.tiny_model(0, torch.float32, False)
    student = MeanFlowStudent(model, fam, lora=LoraSpec(rank=2))
    FakeVelocity(student)  # LoRA layers (FLUX's final layer too) hold dicts of one class
    blocks = transformer_blocks(model)
    names = {n for n, m in model.named_modules() if any(m is b for b in blocks)}
    blocks_of = {
        "flux": {"transformer_blocks.0", "single_transformer_blocks.0"},
        "hunyuanimage2": {"transformer_blocks.0", "single_transformer_blocks.0",
                          "context_embedder.token_refiner.refiner_blocks.0"},
        "hunyuanimage3": {"model.layers.0", "model.layers.1"},
        "sd3": {"transformer_blocks.0"},
    }  # fmt: skip
    assert names == blocks_of[family] and len(blocks) == len(names)


def test_modes_and_their_errors():
    model = torch.nn.Linear(2, 2)
    cpu = torch.device("cpu")
    assert choose_mode("auto", 1, model, cpu) == "none"  # one process, no torchrun
    assert choose_mode("none", 1, model, cpu) == "none"
    with pytest.raises(ValueError, match="torchrun"):
        choose_mode("fsdp", 1, model, cpu)
    with pytest.raises(ValueError, match="cannot run 2 processes"):
        choose_mode("none", 2, model, cpu)
    with pytest.raises(ValueError, match="parallel must be one of"):
        choose_mode("zero3", 1, model, cpu)
    policy = mixed_precision(torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision(torch.float32).param_dtype is None
    world = World("none", 0, 1, cpu)
    x = torch.ones(3)
    assert world.reduce(x) is x and torch.equal(x, torch.ones(3)) and world.main


def test_command_line_errors_name_the_setting(tmp_path, capsys):
    folder = data(tmp_path, "flux")
    argv = ["train", "--tiny", "--data", str(folder), "--output", str(tmp_path / "o")]
    argv += ["--device", "cpu", "--no-progress"]
    assert "torchrun" in usage_error([*argv, "--parallel", "fsdp"], capsys)
    assert "micro_batch_size" in usage_error(
        [*argv, "--batch-size", "4", "--micro-batch-size", "3"], capsys
    )
    assert "parallel" in usage_error([*argv, "--parallel", "zero3"], capsys)
    assert "micro_batch_size" in usage_error([*argv, "--micro-batch-size", "0"], capsys)


def test_the_adapters_switch_lora_with_our_switch_only():
    """peft's disable_adapters/enable_adapters flip requires_grad and freeze LoRA tensors in
    FSDP2 units (test_distributed.test_fsdp2_traps): only lora_disabled/lora_active are used."""
    for path in ADAPTERS.glob("*.py"):
        text = path.read_text()
        assert ".disable_adapters(" not in text and ".enable_adapters(" not in text, path


def test_an_alignment_hook_of_ones_own_runs_whole_batches_in_one_process(tmp_path):
    from mfcore.adapters.distill import DistillConfig, build_run

    cfg = DistillConfig(data=str(data(tmp_path, "flux")), output=str(tmp_path / "o"), tiny=True,
                        family="flux", batch_size=2, micro_batch_size=1, device="cpu",
                        weights_dtype="fp32", lora_rank=2, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="alignment hook of your own"):
        build_run(cfg, alignment=object())
    # an ArcFlow student refuses the term and the micro-batches too, all named in one error
    arcflow = dataclasses.replace(cfg, student="arcflow", r_embedding="interval")
    with pytest.raises(ValueError, match="hook of your own.*; .*no alignment term.*; .*one proc"):
        build_run(arcflow, alignment=object())
