"""The constraint form of the bilevel problem: minimise L_cu(θ) subject to L_ft(θ) <= (1 + tol) · min L_ft.

The user gives a quality tolerance instead of a penalty weight. The multiplier mu of the constraint is what the
penalty form calls lambda (the student follows d L_cu + mu · d L_ft); here it is found by dual ascent.

Noise: the diffusion loss of one batch varies by an order of magnitude with its timesteps, so L_ft(θ) of a
training batch says little about the constraint. The check runs instead on a fixed probe set (the same latents,
noise and evenly spread timesteps at every check, see TrainingEngine.probe_batches), for the student and for the
value model ϑ (trained on L_ft alone, see the bilevel solver): their ratio L_ft(θ) / L_ft(ϑ) then moves only when
the models do. Every `check_every` steps the multiplier moves on a log scale (the right weight differs by orders
of magnitude between data sets and objectives), with the violation in units of the tolerance, clipped:

    log mu += rate · clip((ratio − (1 + tol)) / tol, −1, 1)

so a violation of the tolerance's own size raises mu e-fold in 1 / rate checks, and a satisfied constraint with
full slack lowers it as fast. A slow rate matters: the student's loss answers a change of mu only over many
steps, and a fast controller winds up to its bounds and oscillates. mu stays within [mu_0 / 1e3, mu_0 · 1e3].
"""
from __future__ import annotations

import math

import torch


class DualMultiplier:
    """The multiplier of L_ft(θ) <= (1 + tolerance) · v*, updated from paired loss ratios."""

    def __init__(self, tolerance: float, initial: float, rate: float = 0.1, smoothing: float = 0.5,
                 span: float = 1e3):
        if tolerance <= 0:
            raise ValueError(f"tolerance must be positive, got {tolerance}")
        if initial <= 0:
            raise ValueError(f"the initial multiplier must be positive, got {initial}")
        self.tolerance, self.rate, self.smoothing = tolerance, rate, smoothing
        self.log_multiplier = math.log(initial)
        self.bounds = (math.log(initial / span), math.log(initial * span))
        self.ratio_ema: float | None = None

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_multiplier)

    @property
    def slack(self) -> float:
        """(1 + tol) − smoothed ratio: positive while the constraint holds."""
        return 1.0 + self.tolerance - (1.0 if self.ratio_ema is None else self.ratio_ema)

    def update(self, student_loss: float, value_loss: float) -> None:
        """One dual-ascent step from L_ft of the student and of the value model on the probe set."""
        ratio = student_loss / max(value_loss, 1e-12)
        self.ratio_ema = ratio if self.ratio_ema is None else (
            self.smoothing * self.ratio_ema + (1.0 - self.smoothing) * ratio)
        violation = min(max(-self.slack / self.tolerance, -1.0), 1.0)
        low, high = self.bounds
        self.log_multiplier = min(max(self.log_multiplier + self.rate * violation, low), high)

    def scalars(self) -> dict[str, float]:
        return {"constraint/multiplier": self.multiplier, "constraint/slack": self.slack,
                "constraint/ratio": float("nan") if self.ratio_ema is None else self.ratio_ema}

    def state_dict(self) -> dict[str, torch.Tensor]:
        ratio = float("nan") if self.ratio_ema is None else self.ratio_ema
        return {"dual": torch.tensor([self.log_multiplier, ratio], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        log_multiplier, ratio = state["dual"].tolist()
        self.log_multiplier = log_multiplier
        self.ratio_ema = None if ratio != ratio else ratio
