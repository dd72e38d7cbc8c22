""":class:`SwitchRollback`: restore the weights, optimiser and EMA saved at the warm-up switch
when the guard of :class:`~mfcore.warmup.WarmupTarget` reverts it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mfcore._checks import check_instance, check_state

__all__ = ["SwitchRollback"]


def _clone(state: Any, device: torch.device | str | None) -> Any:
    if isinstance(state, Tensor):
        return state.detach().to(device=device or state.device, copy=True)
    if isinstance(state, dict):
        return {k: _clone(v, device) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_clone(v, device) for v in state)
    return state


def _happened(metrics: Mapping[str, Any], event: str) -> bool:
    """Whether ``metrics`` report ``event`` (present, with a nonzero value)."""
    return event in metrics and float(metrics[event]) != 0.0


class SwitchRollback:
    """Restore the trained weights and the optimiser to the switch when the guard reverts.

    A revert alone leaves the student where the differential phase took it; on the toys a
    guard that caught a blow-up 20 steps after the switch still ended far worse than the
    switch state (docs/toys.md). With a rollback the run continues on the discrete target
    from exactly the state at the switch.

    Call :meth:`observe` with a step's metrics after the loss and *before* the optimiser
    step: at ``warmup_switched`` it copies the optimiser's parameters and state (and the
    states of ``also``, e.g. an EMA of the weights); at ``warmup_reverted`` it writes them
    back and returns ``True``, and the caller then skips this step's update. The copy is
    part of :meth:`state_dict`, so a resumed run can still roll back.

    Args:
        optimizer: the student's optimiser; its parameters are what is restored.
        also: further objects with ``state_dict()`` / ``load_state_dict()`` to restore.
        device: where the copy lives (e.g. ``"cpu"`` to spare accelerator memory; default:
            beside each tensor).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        also: tuple[Any, ...] = (),
        device: torch.device | str | None = None,
    ) -> None:
        check_instance("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer")
        for obj in also:
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"also must hold objects with state_dict(), got {obj!r}")
        self.optimizer, self.also, self.device = optimizer, tuple(also), device
        self.saved: dict[str, Any] | None = None

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def observe(self, metrics: Mapping[str, Any]) -> bool:
        """Save at a switch, restore at a revert; ``True`` when this step was rolled back.

        An event happened when its key is in ``metrics`` with a nonzero value
        (``{"warmup_reverted": 0.0}`` is no revert).

        Raises:
            TypeError: unless ``metrics`` is a mapping.
        """
        check_instance("metrics", metrics, Mapping, "a mapping (a step's metrics)")
        if _happened(metrics, "warmup_switched"):
            self.saved = {
                "params": _clone(self._params(), self.device),
                "optimizer": _clone(self.optimizer.state_dict(), self.device),
                "also": [_clone(obj.state_dict(), self.device) for obj in self.also],
            }
        if _happened(metrics, "warmup_reverted") and self.saved is not None:
            with torch.no_grad():
                for p, saved in zip(self._params(), self.saved["params"], strict=True):
                    p.copy_(saved)
            self.optimizer.load_state_dict(_clone(self.saved["optimizer"], None))
            for obj, state in zip(self.also, self.saved["also"], strict=True):
                obj.load_state_dict(_clone(state, None))
            self.saved = None
            return True
        return False

    def state_dict(self) -> dict:
        return {"saved": self.saved}

    def load_state_dict(self, state: dict) -> None:
        check_state("SwitchRollback", state, ("saved",))
        self.saved = state["saved"]
