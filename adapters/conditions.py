"""The text condition of MMDiT models: a sequence of prompt embeddings and a pooled vector.

``prompt_embeds (B, L, joint_attention_dim)`` and ``pooled_prompt_embeds
(B, pooled_projection_dim)``, the widths read from the transformer's config, and the same
two with a ``negative_`` prefix for two-pass classifier-free guidance. FLUX and Stable
Diffusion 3 take exactly this (:mod:`mfcore.adapters.flux`, :mod:`mfcore.adapters.sd3`); a
family mixes :class:`PooledTextConditions` in before
:class:`~mfcore.adapters.family.FamilyBase` and gets its condition keys, their declared
shapes (which ``FamilyBase`` checks in a call and in a data folder), and random samples for
``make-data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mfcore.adapters._shapes import Shape
from mfcore.adapters.family import Call, Synthetic

__all__ = ["PooledTextConditions"]

_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def _inputs(checked: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"prompt_embeds": checked["prompt_embeds"], "pooled": checked["pooled_prompt_embeds"]}


class PooledTextConditions:
    """Condition keys, checks and random samples of a ``(prompt_embeds, pooled)`` model.

    A call's checked inputs are ``{"prompt_embeds": (B, L, D), "pooled": (B, P)}`` (and the
    negative prompt's, for two-pass guidance); a call without them is a ``ValueError``.
    """

    label: str
    conditions = {
        "prompt_embeds": Shape(("B", "L", "joint_attention_dim")),
        "pooled_prompt_embeds": Shape(("B", "pooled_projection_dim")),
    }
    missing_condition = ValueError
    cond_keys = frozenset({*_KEYS, *(f"negative_{k}" for k in _KEYS)})
    data_keys = _KEYS
    optional_keys = tuple(f"negative_{k}" for k in _KEYS)
    negative_key = "negative_prompt_embeds"

    def text_call(
        self,
        model: nn.Module,
        z: Tensor,
        cond: Mapping[str, Any],
        negative: bool,
        *,
        validate: bool = True,
    ) -> Call:
        """The text inputs of one call (the negative prompt's when ``negative``), checked
        unless ``validate`` is False."""
        call = self.condition_call(model, z, cond, negative, validate=validate)  # type: ignore[attr-defined]
        neg = None if call.negative is None else _inputs(call.negative)
        return Call(_inputs(call.inputs), neg)

    def call_inputs(
        self,
        model: nn.Module,
        z: Tensor,
        cond: Mapping[str, Any],
        guidance: float,
        negative: bool,
        *,
        validate: bool = True,
    ) -> Call:
        """The text inputs of one call, its latents checked too unless ``validate`` is False;
        ``guidance`` is unused (a model without a guidance embedding: SD3)."""
        if validate:
            self.check_latents(model, z)  # type: ignore[attr-defined]
        return self.text_call(model, z, cond, negative, validate=validate)

    def synthetic_sample(self, request: Synthetic) -> dict[str, Tensor]:
        r, g = request, request.generator
        jd, pd = r.dims["joint_attention_dim"], r.dims["pooled_projection_dim"]
        data = {"latents": torch.randn(r.n, r.dims["channels"], r.height, r.width, generator=g)}
        for tag in ("", "negative_") if r.negatives else ("",):
            data[f"{tag}prompt_embeds"] = torch.randn(r.n, r.seq_len, jd, generator=g)
            data[f"{tag}pooled_prompt_embeds"] = torch.randn(r.n, pd, generator=g)
        return data
