"""A student that takes ``r`` through the model's own MeanFlow input, so a stock diffusers
pipeline runs it (``r_embedding="native"``; HunyuanImage 2.1's ``use_meanflow`` branch).

diffusers' ``HunyuanImageTransformer2DModel(use_meanflow=True)`` embeds both times as

    temb = (e(t) + e_r(r)) / 2,     e = timestep_embedder(time_proj(1000 t)),

(Tencent's distilled 2.1 release is such a model), and ``HunyuanImagePipeline`` feeds it
``timestep_r``, the next time of its grid, so its Euler step ``z + (sigma_next - sigma) out``
is MeanFlow's ``z_r = z_t - (t - r) u(z_t, r, t)`` (MeanFlow, arXiv 2505.13447, eq. 12). The
student here is a base checkpoint put in that form:

- ``e_r`` starts as a copy of ``e`` and is trained whole (about 10M parameters at 2.1's width),
  with the blocks' LoRA. At init the student equals the teacher at ``r = t``; for ``r < t`` it
  starts at the teacher called with the mean embedding ``(e(t) + e(r)) / 2``, not at
  ``v(z, t)`` as the interval student (:mod:`mfcore.adapters.interval`) does: no ``e_r(r)``
  equals ``e(t)`` for every ``t``.
- :meth:`NativeMeanFlowStudent.save_stock` writes a stock transformer folder (LoRA
  merged, diffusers' names, ``use_meanflow: true``) that
  ``HunyuanImagePipeline.from_pretrained(base, transformer=...)`` runs at few steps.

The teacher is the same module called without ``timestep_r`` (diffusers then skips the
branch) and with the LoRA off: the base model, unchanged.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from diffusers.models.embeddings import Timesteps
from huggingface_hub import save_torch_state_dict
from torch import Tensor, nn

from mfcore.adapters.lora import merged_state_dict
from mfcore.adapters.student import MeanFlowStudent

__all__ = ["enable_native_meanflow", "NativeMeanFlowStudent", "STOCK_WEIGHTS"]

#: The file names of a stock export (diffusers' own, ``{suffix}`` the shard's).
STOCK_WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"


class _OwnDtype:
    """Hooks that run a module in its parameters' dtype and hand back the caller's: the
    trained ``e_r`` stays fp32 on a bf16 base (small optimiser steps are not rounded away),
    and the model around it keeps its own dtype."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.caller: torch.dtype | None = None
        module.register_forward_pre_hook(self.before)
        module.register_forward_hook(self.after)

    def before(self, module: nn.Module, args: tuple) -> tuple:
        self.caller = args[0].dtype
        return (args[0].to(next(module.parameters()).dtype), *args[1:])

    def after(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return out.to(self.caller)


def enable_native_meanflow(transformer: nn.Module) -> nn.Module:
    """Give a base ``transformer`` diffusers' ``use_meanflow`` branch, in place (a
    ``HunyuanImageTransformer2DModel``, checked by its family).

    ``time_proj_r`` gets ``time_proj``'s settings and ``timestep_embedder_r`` (``e_r``) starts
    as a copy of ``timestep_embedder`` (trainable); the config says ``use_meanflow: true``.

    Returns:
        ``e_r``, the module to train.

    Raises:
        ValueError: if ``transformer`` is ``use_meanflow`` already (a distilled checkpoint).
    """
    if transformer.config.use_meanflow:
        raise ValueError(
            "transformer is a use_meanflow (distilled) checkpoint already: build the native "
            "student on the base checkpoint"
        )
    embed = transformer.time_guidance_embed
    proj = embed.time_proj
    embed.time_proj_r = Timesteps(
        num_channels=proj.num_channels,
        flip_sin_to_cos=proj.flip_sin_to_cos,
        downscale_freq_shift=proj.downscale_freq_shift,
        scale=proj.scale,
    )
    embed.timestep_embedder_r = copy.deepcopy(embed.timestep_embedder).requires_grad_(True)
    embed.use_meanflow = True
    transformer.register_to_config(use_meanflow=True)
    return embed.timestep_embedder_r


class NativeMeanFlowStudent(MeanFlowStudent):
    """A base transformer as a student in diffusers' ``use_meanflow`` form.

    :class:`~mfcore.adapters.student.MeanFlowStudent` with ``r`` fed to the model's own
    ``timestep_r`` (module docstring) instead of an interval embedding; :attr:`interval` is
    ``e_r``. Same arguments; the family's calls pass an ``"r"`` input on to ``timestep_r``.
    """

    r_embedding = "native"
    interval_file = "timestep_embedder_r.safetensors"

    def _r_input(self, transformer: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        e_r = enable_native_meanflow(transformer)
        self._own_dtype = _OwnDtype(e_r)
        return e_r, []

    def _call_inputs(self, inputs: dict[str, Any], r: Tensor) -> dict[str, Any]:
        return {**inputs, "r": r}

    def _model_card(self) -> str:
        return _MODEL_CARD.format(rank=self.lora_spec.rank, file=self.interval_file)

    def save_stock(self, directory: str | os.PathLike) -> None:
        """Write the student as a stock diffusers ``HunyuanImageTransformer2DModel`` folder.

        ``config.json`` (``use_meanflow: true``) and ``diffusion_pytorch_model*.safetensors``
        (sharded at 10 GB with an index, as diffusers' ``save_pretrained``): the base weights
        with the LoRA merged (:func:`~mfcore.adapters.lora.merged_state_dict`) and ``e_r``,
        every tensor in the base's dtype; plus a ``README.md`` that says how to run it. The
        transformer is not changed (the teacher that shares it stays the base).
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        dtype = self.transformer.dtype
        state = merged_state_dict(self.transformer, adapter_name=self.adapter_name)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        save_torch_state_dict(state, directory, filename_pattern=STOCK_WEIGHTS,
                              max_shard_size="10GB")  # fmt: skip
        self.transformer.save_config(directory)
        with open(os.path.join(directory, "README.md"), "w") as f:
            f.write(_STOCK_CARD)


_MODEL_CARD = """# A few-step MeanFlow student of a HunyuanImage 2.1 checkpoint, in diffusers' form

Written by mfcore (`NativeMeanFlowStudent.save_pretrained`): a rank-{rank} LoRA
(`pytorch_lora_weights.safetensors`) and the trained `timestep_embedder_r` of diffusers'
`use_meanflow` branch (`{file}`), on the base checkpoint's own weights.

Generate with it:

    mfcore-distill generate --model BASE --student THIS_FOLDER --prompt "..." \\
        --steps 1 2 4 --output images

or write a stock transformer folder that diffusers' own `HunyuanImagePipeline` runs:

    mfcore-distill export --model BASE --student THIS_FOLDER --output STOCK
"""

_STOCK_CARD = """# A few-step MeanFlow student of HunyuanImage 2.1, as a stock diffusers transformer

Written by mfcore (`mfcore-distill export`): the base checkpoint's
`HunyuanImageTransformer2DModel` with the student's LoRA merged in and diffusers' own
`use_meanflow` branch (`timestep_embedder_r`) trained, so the stock pipeline takes
MeanFlow steps with it (`timestep_r` = the next time of its grid):

```python
import torch
from diffusers import HunyuanImagePipeline, HunyuanImageTransformer2DModel

transformer = HunyuanImageTransformer2DModel.from_pretrained(
    "THIS_FOLDER", torch_dtype=torch.bfloat16
)
pipe = HunyuanImagePipeline.from_pretrained(
    "BASE", transformer=transformer, guider=None, ocr_guider=None, torch_dtype=torch.bfloat16
)
image = pipe("a red cat", num_inference_steps=2).images[0]
```

Use 1, 2 or 4 steps. `guider=None, ocr_guider=None`: the student learned the guided teacher
(its guidance is inside it), so the pipeline must call it once per step, unguided; the base
release's APG guiders would guide it a second time.
"""
