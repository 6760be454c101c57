"""The critic's loss and the KL coefficient controller (the policy loss is a kernel)."""

from __future__ import annotations

import math

import torch


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), PPO's clipped value loss; and the
    share of tokens where the clipped branch is taken.

    ``num_tokens`` divides the masked sum instead of the mask's own count: with the mini-batch's
    token count, micro-batch losses add up to the mini-batch's mean however it was cut.
    """
    m = mask.float()
    unclipped = (values - returns) ** 2
    if clip is None:
        loss, frac = unclipped, torch.zeros((), device=values.device)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (clipped_values - returns) ** 2
        loss = torch.maximum(unclipped, clipped)
        frac = ((clipped > unclipped).float() * m).sum() / m.sum().clamp_min(1)
    denom = m.sum().clamp_min(1) if num_tokens is None else num_tokens
    return 0.5 * (loss * m).sum() / denom, frac.detach()


class KLController:
    """Fixed coefficient, or the adaptive one of Ziegler et al. (2019) when a target is set:
    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * batch / horizon."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, batch: int) -> None:
        # A NaN would pass the clip below as +0.2 (min/max keep their first argument).
        if self.target is None or not math.isfinite(kl):
            return
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.coef *= 1.0 + error * batch / self.horizon

    def state_dict(self) -> dict[str, float | None]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.target, self.horizon = state["coef"], state["target"], state["horizon"]
