"""The timestep schedule and the SDE-DPM-Solver++(2M) coefficients shared by abduction and prediction.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

Variance-preserving notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), the half log-SNR
lambda_t = log(alpha_t / sigma_t), and the data prediction x0_hat(x_t) = (x_t - sigma_t eps) / alpha_t.
One step of the stochastic DPM-Solver++ (2nd order multistep, midpoint form) from s = t_i to
t = t_{i+1}, with h = lambda_t - lambda_s, reads

    x_t = (sigma_t / sigma_s) e^{-h} x_s                      (x_coeff)
        + alpha_t (1 - e^{-2h}) D0                             (d0_coeff, D0 = x0_hat(x_s))
        + 0.5 alpha_t (1 - e^{-2h}) (h / h_prev) D1            (d1_coeff, D1 = x0_hat(x_s) - x0_hat(x_prev))
        + sigma_t sqrt(1 - e^{-2h}) z                          (noise_std)

The first step has no history and the last step goes to sigma = 0, so both are first order
(d1_coeff = 0); the last one returns x0_hat exactly, as diffusers' scheduler does. Precomputing these
scalars in float64 lets abduction and prediction share the very same arithmetic, which is what
makes edit-friendly inversion reconstruct exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class SolverStep:
    t: int  # the training timestep this step starts from
    alpha: float
    sigma: float
    x_coeff: float
    d0_coeff: float
    d1_coeff: float
    noise_std: float

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x - self.sigma * eps) / self.alpha

    def mean(self, x: torch.Tensor, x0_pred: torch.Tensor, prev_x0_pred: torch.Tensor | None) -> torch.Tensor:
        """The deterministic part of the step; ``prev_x0_pred`` is ignored on first-order steps."""
        out = self.x_coeff * x + self.d0_coeff * x0_pred
        if self.d1_coeff != 0.0:
            out = out + self.d1_coeff * (x0_pred - prev_x0_pred)
        return out


@dataclass(frozen=True)
class Schedule:
    steps: tuple[SolverStep, ...]  # in sampling order, from the noisiest kept timestep down

    @property
    def timesteps(self) -> list[int]:
        return [s.t for s in self.steps]

    def __len__(self) -> int:
        return len(self.steps)


def leading_timesteps(num_steps: int, skip: float, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """The last ``num_steps`` of a "leading"-spaced schedule of M = int(num_steps * (1 + skip)) steps.

    This is diffusers' DPMSolverMultistepScheduler with ``timestep_spacing="leading"`` and SDXL's
    ``steps_offset=1``: stride T // (M + 1), timesteps stride*M .. stride*1 plus the offset. With
    100 steps and skip 0.15, M = 114 and the kept steps start at t = 801.
    """
    if num_steps < 2:
        raise InputError(f"num_steps must be at least 2, got {num_steps}.")
    if not 0.0 <= skip < 1.0:
        raise InputError(f"skip must be in [0, 1), got {skip}. It is the fraction of the noisiest steps left out.")
    total = int(num_steps * (1 + skip))
    stride = num_train_timesteps // (total + 1)
    if stride < 1:
        raise InputError(f"{total} steps exceed the model's {num_train_timesteps} training timesteps; use fewer steps.")
    all_steps = [stride * k + steps_offset for k in range(total, 0, -1)]
    return all_steps[-num_steps:]


def sde_dpmpp_2m_schedule(alphas_cumprod: torch.Tensor, timesteps: list[int], final_noise_std: float = 0.0) -> Schedule:
    """Per-step coefficients for ``timesteps`` (descending), ending at sigma = 0.

    ``final_noise_std`` scales the last step's noise map. The sampler's last step has no noise
    (0.0, the reference); exact reconstruction stores the last residual x0 - x0_hat there with
    scale 1.0, so the chain lands on the input latent.
    """
    abar = alphas_cumprod.detach().to("cpu", torch.float64)
    alphas = [math.sqrt(abar[t].item()) for t in timesteps]
    sigmas = [math.sqrt(1.0 - abar[t].item()) for t in timesteps]
    lambdas = [math.log(a / s) for a, s in zip(alphas, sigmas)]
    steps = []
    for i, t in enumerate(timesteps):
        a_s, s_s = alphas[i], sigmas[i]
        if i == len(timesteps) - 1:  # to sigma = 0: x0_hat, first order
            steps.append(SolverStep(t, a_s, s_s, 0.0, 1.0, 0.0, final_noise_std))
            continue
        a_t, s_t = alphas[i + 1], sigmas[i + 1]
        h = lambdas[i + 1] - lambdas[i]
        decay = math.exp(-h)
        d0 = a_t * (1.0 - decay**2)
        d1 = 0.0 if i == 0 else 0.5 * d0 * h / (lambdas[i] - lambdas[i - 1])
        steps.append(SolverStep(t, a_s, s_s, s_t / s_s * decay, d0, d1, s_t * math.sqrt(1.0 - decay**2)))
    return Schedule(tuple(steps))
