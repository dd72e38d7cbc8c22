"""An exponential moving average of a student's trained weights.

``ema <- d_n ema + (1 - d_n) w`` after every optimiser step ``n`` (0-based), with the warm-up
``d_n = min(decay, (1 + n) / (10 + n))`` so that early averages are not dominated by the
initial weights. The average is part of every checkpoint, and the entry point uses it for
previews and for the exported student by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from mfcore._checks import check_fraction

__all__ = ["EMA"]


class EMA:
    """Shadow copies (fp32 at least) of ``params``, updated by :meth:`update`.

    Args:
        params: the trained parameters (their order is the state's order).
        decay: the long-run decay ``d`` in ``[0, 1)``.
    """

    def __init__(self, params: Sequence[nn.Parameter], decay: float = 0.999) -> None:
        decay = check_fraction("ema_decay", decay, below_one=True)
        self.params = list(params)
        self.decay = decay
        self.reset()

    def reset(self) -> None:
        """Start the average again from the parameters' current values."""
        self.shadow = [
            p.detach().clone().to(torch.promote_types(p.dtype, torch.float32)) for p in self.params
        ]
        self.updates = 0

    def current_decay(self) -> float:
        """``d_n`` of the next update."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters' current values into the average."""
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the parameters with the average."""
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the average inside the block, their own values after it."""
        saved = [p.detach().clone() for p in self.params]
        self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved, strict=True):
                    p.copy_(v)

    def state_dict(self) -> dict:
        """The averages, the update count and the decay."""
        return {"shadow": list(self.shadow), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (``ValueError`` if the shapes do not match)."""
        shadow: list[Tensor] = state["shadow"]
        if [tuple(s.shape) for s in shadow] != [tuple(s.shape) for s in self.shadow]:
            raise ValueError("the EMA state does not match the trained parameters")
        self.shadow = [
            s.to(device=p.device, dtype=o.dtype)
            for s, p, o in zip(shadow, self.params, self.shadow, strict=True)
        ]
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
