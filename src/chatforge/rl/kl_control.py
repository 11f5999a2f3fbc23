"""KL coefficient controllers for PPO's per-token KL penalty.

`FixedKL` keeps the coefficient; `AdaptiveKL` (Ziegler et al. 2019) moves it so the measured KL
tracks a target: the error is clipped to +-20% and scaled by n_steps / horizon each update.

    >>> c = AdaptiveKL(0.1, target=1.0, horizon=10)
    >>> c.update(current_kl=2.0, n_steps=1); round(c.value, 4)
    0.102
"""

from __future__ import annotations


class FixedKL:
    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKL(FixedKL):
    def __init__(self, init: float, target: float, horizon: int):
        super().__init__(init)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(coef: float, target: float = 0.0, horizon: int = 10000) -> FixedKL:
    """An adaptive controller when a target is given, else a fixed one."""
    return AdaptiveKL(coef, target, horizon) if target > 0 else FixedKL(coef)
