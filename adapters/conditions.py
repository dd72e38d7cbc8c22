"""The text condition of MMDiT models: a sequence of prompt embeddings and a pooled vector.

``prompt_embeds (B, L, joint_attention_dim)`` and ``pooled_prompt_embeds
(B, pooled_projection_dim)``, the widths read from the transformer's config, and the same
two with a ``negative_`` prefix for two-pass classifier-free guidance. Stable Diffusion 3
takes exactly this (:mod:`mfcore.adapters.sd3`); a family mixes :class:`PooledTextConditions`
in before :class:`~mfcore.adapters.family.FamilyBase` and gets its condition keys, the
checks of a call and of a data folder, and random samples for ``make-data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mfcore._checks import check_tensor
from mfcore.adapters.family import Call, Synthetic

__all__ = ["PooledTextConditions"]

_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


class PooledTextConditions:
    """Condition keys, checks and random samples of a ``(prompt_embeds, pooled)`` model.

    A call's checked inputs are ``{"prompt_embeds": (B, L, D), "pooled": (B, P)}`` (and the
    negative prompt's, for two-pass guidance).
    """

    label: str
    cond_keys = frozenset({*_KEYS, *(f"negative_{k}" for k in _KEYS)})
    data_keys = _KEYS
    optional_keys = tuple(f"negative_{k}" for k in _KEYS)
    negative_key = "negative_prompt_embeds"

    def text_call(
        self, model: nn.Module, z: Tensor, cond: Mapping[str, Any], negative: bool
    ) -> Call:
        """The checked text inputs of one call (the negative prompt's when ``negative``)."""
        inputs = self._text(model, z, cond, "")
        return Call(inputs, self._text(model, z, cond, "negative_") if negative else None)

    def _text(self, model: nn.Module, z: Tensor, cond: Mapping[str, Any], tag: str) -> dict:
        cfg, b = model.config, z.shape[0]
        widths = {"prompt_embeds": (3, cfg.joint_attention_dim),
                  "pooled_prompt_embeds": (2, cfg.pooled_projection_dim)}  # fmt: skip
        out = []
        for key, (ndim, width) in widths.items():
            name = tag + key
            value = cond.get(name)
            if value is None:
                why = "two-pass guidance (true_cfg_scale > 1) needs" if tag else "a call needs"
                raise ValueError(f"{why} {name} for a {self.label} model")
            check_tensor(name, value)
            if value.ndim != ndim or value.shape[0] != b or value.shape[-1] != width:
                shape = "(B, L, D)" if ndim == 3 else "(B, P)"
                raise ValueError(
                    f"{name} must be {shape} with B = {b} and width {width}, got "
                    f"{tuple(value.shape)}"
                )
            out.append(value)
        return {"prompt_embeds": out[0], "pooled": out[1]}

    def check_data(self, shapes: Mapping[str, tuple[int, ...]], model: nn.Module) -> None:
        cfg = model.config
        channels = self.latent_channels(model)  # type: ignore[attr-defined]
        if shapes["latents"][0] != channels:
            raise ValueError(
                f"latents have {shapes['latents'][0]} channels; this {self.label} takes {channels}"
            )
        for tag in ("", "negative_"):
            pe, pooled = shapes.get(f"{tag}prompt_embeds"), shapes.get(f"{tag}pooled_prompt_embeds")
            if pe is not None and (len(pe) != 2 or pe[1] != cfg.joint_attention_dim):
                raise ValueError(
                    f"{tag}prompt_embeds must be (N, L, {cfg.joint_attention_dim}), got (N, *{pe})"
                )
            if pooled is not None and pooled != (cfg.pooled_projection_dim,):
                raise ValueError(
                    f"{tag}pooled_prompt_embeds must be (N, {cfg.pooled_projection_dim}), "
                    f"got (N, *{pooled})"
                )

    def synthetic_sample(self, request: Synthetic) -> dict[str, Tensor]:
        r, g = request, request.generator
        jd, pd = r.dims["joint_attention_dim"], r.dims["pooled_projection_dim"]
        data = {"latents": torch.randn(r.n, r.dims["channels"], r.height, r.width, generator=g)}
        for tag in ("", "negative_") if r.negatives else ("",):
            data[f"{tag}prompt_embeds"] = torch.randn(r.n, r.seq_len, jd, generator=g)
            data[f"{tag}pooled_prompt_embeds"] = torch.randn(r.n, pd, generator=g)
        return data
