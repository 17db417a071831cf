"""Guidance for sampling: classifier-free guidance, autoguidance and the guidance interval, as one
model function for the samplers.

Every method is D = D_ref + w (D_main - D_ref) with the main model's conditional output D_main:
- classifier-free guidance (DiT): D_ref is the same model given the null label;
- autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): D_ref
  is a guide model, smaller and/or less trained, given the same labels (EDM2: ref_Dx.lerp(Dx, w)).
The combination is taken in the model's prediction space (eps, v or x0; a flow's velocity). At fixed
x_t and t each of them is affine in the denoised output D = x_0-estimate (eps = (x_t - sqrt(abar) D) /
sqrt(1 - abar), v = (sqrt(abar) x_t - D) / sqrt(1 - abar), x0 = D; a flow's velocity, from
x_t = t D + (1 - t) eps, u = D - eps = (D - x_t) / (1 - t)), and the weights (1 - w, w) sum to one, so
the guided prediction is exactly the prediction of the guided D: combining any of them is the same.

Guidance interval (Kynkaenniemi et al. 2024): guidance only where the noise level of the model's
input lies in (lo, hi], the main model's conditional prediction elsewhere. The noise level is EDM's
sigma of x_t / scale = x_0 + sigma eps, the unit the paper and EDM2 state it in and the only one that
transfers between schedules and objectives:
- DDPM: sigma = sqrt((1 - abar_t) / abar_t) at the training timestep t (0 .. T-1) the model is
  called with (for respaced DDPM and DDIM and for DPM-Solver++ the original timestep of the step, not
  its index). EDM2's (0.28, 5.42] is t/T in about [0.08, 0.58] of DiT's linear schedule.
- flow (diffusion/flow.py, t = 0 noise, t = 1 data): x_t / t = x_0 + ((1 - t) / t) eps, so
  sigma = (1 - t) / t (inf at t = 0, 0 at t = 1).
REPA's "t <= 0.7" (its flow time, t = 1 noise, sigma = t / (1 - t)) is sigma <= 2.33: t/T up to about
0.43 of DDPM here, and t >= 0.3 in this repository's flow time. lo = 0 has no lower bound: it
includes sigma = 0 (a flow's t = 1, where Heun and dopri5 call the model), so (0, inf] guides every
step of either objective; lo = hi > 0 guides none. Outside the interval the reference (the
unconditional half, or the guide) is not evaluated.
"""
import math

import numpy as np
import torch

from diffusion import get_named_beta_schedule

EVERY_STEP = (0.0, math.inf)  # the guidance interval that guides every step
OBJECTIVES = ("ddpm", "flow")


def combine(cond, ref, scale, channels):
    """ref + scale (cond - ref) on the first `channels` channels, in float32 whatever the inputs'
    dtype; cond's other channels (a learned variance; with DiT's 3-channel guidance also the fourth
    latent channel) are kept as they are. cond (N, C', H, W), ref (N, >= channels, H, W) -> (N, C', H, W)."""
    cond, ref = cond.float(), ref[:, :channels].float()
    return torch.cat([ref + scale * (cond[:, :channels] - ref), cond[:, channels:]], dim=1)


def ddpm_sigmas(num_timesteps=1000):
    """Noise level sigma_t = sqrt((1 - abar_t) / abar_t) at each training timestep t of DiT's linear
    beta schedule, float64 (T,): 0.0100 at t = 0, 157 at t = T - 1."""
    abar = np.cumprod(1 - get_named_beta_schedule("linear", num_timesteps))
    return torch.from_numpy(np.sqrt((1 - abar) / abar))


DDPM_SIGMAS = ddpm_sigmas()


def noise_level(t, objective):
    """sigma (N,) float64 of the model's input at times t (N,): DDPM's sigma_t at integer timesteps,
    or a flow's (1 - t) / t (module docstring)."""
    if objective == "ddpm":
        return DDPM_SIGMAS.to(t.device)[t.long()]
    t = t.double()
    return (1 - t) / t


class Guided:
    """model_fn(x (N, C, H, W), t (N,), y (N,)) -> guided output (N, C', H, W), float32, for the samplers.

    model: the main (conditional) model; num_classes is its null label. scale: w (1 runs the main
    model alone, at every t). guide: None for classifier-free guidance, else the guide model
    (autoguidance). interval: (lo, hi], noise levels sigma (module docstring). channels: the number
    of leading prediction channels guided (None = all; 3 = the original DiT code's choice for
    4-channel latents). objective: "ddpm" (t integer timesteps) or "flow" (t float times in [0, 1]).
    Model calls per step: one of batch N where no row is guided; else one of batch N + M ([main
    rows; null-label rows], M rows guided) for CFG, or the main model on N rows and the guide on
    the M guided rows for autoguidance.
    """

    def __init__(self, model, scale, guide=None, interval=EVERY_STEP, channels=None, objective="ddpm"):
        if objective not in OBJECTIVES:
            raise ValueError(f"{objective!r} is not one of {OBJECTIVES}")
        self.model, self.scale, self.guide, self.channels = model, scale, guide, channels
        self.interval, self.objective = interval, objective

    def guided_at(self, t):
        """Bool (N,): lo < sigma_t <= hi in float64 (lo = 0: sigma_t <= hi)."""
        if self.scale == 1:
            return torch.zeros_like(t, dtype=torch.bool)
        lo, hi = self.interval
        sigma = noise_level(t, self.objective)
        return ((sigma > lo) | (lo == 0)) & (sigma <= hi)

    def __call__(self, x, t, y):
        rows = self.guided_at(t).nonzero().squeeze(1)
        if len(rows) == 0:
            return self.model(x, t, y).float()
        if self.guide is None:
            null = torch.full_like(y[rows], self.model.num_classes)
            out = self.model(torch.cat([x, x[rows]]), torch.cat([t, t[rows]]), torch.cat([y, null]))
            cond, ref = out[: len(x)], out[len(x):]
        else:
            cond, ref = self.model(x, t, y), self.guide(x[rows], t[rows], y[rows])
        k = self.channels or x.shape[1]
        if len(rows) == len(x):
            return combine(cond, ref, self.scale, k)
        out = cond.float()
        out[rows] = combine(cond[rows], ref, self.scale, k)
        return out
