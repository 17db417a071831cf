"""Flow matching on SiT's linear path, beside the Gaussian diffusion: the training objective and
the samplers that integrate it.

Convention (SiT's): t = 0 is noise, t = 1 data,
    x_t = t x + (1 - t) eps,  eps ~ N(0, I),
and the model predicts the velocity u = dx_t/dt = x - eps with the plain squared error. The model
is called as model(x_t, t, **model_kwargs) with float times t (N,) in [0, 1] and its first C output
channels are the velocity (a model built with a learned variance has 2C: the rest is discarded).

Its noise level in EDM's unit (guidance.py): x_t / t = x + sigma eps with sigma = (1 - t) / t.
From the velocity v = E[u | x_t]: the denoised estimate D = E[x | x_t] = x_t + (1 - t) v and the
score grad log p_t(x_t) = -E[eps | x_t] / (1 - t) = (t v - x_t) / (1 - t).
"""
import math

import torch

from .gaussian_diffusion import mean_flat

TIME_DISTS = ("uniform", "logit-normal")
SDE_LAST_STEP = 0.04  # SiT's last step "Mean": the SDE stops at t = 1 - 0.04, then one noiseless step


class LinearFlow:
    """SiT's linear interpolant with velocity prediction.

    time_dist: how training draws t, "uniform" (SiT: U(0, 1)) or "logit-normal" (SD3, LightningDiT:
    t = sigmoid(logit_mean + logit_std n), n ~ N(0, 1))."""

    def __init__(self, time_dist="uniform", logit_mean=0.0, logit_std=1.0):
        if time_dist not in TIME_DISTS:
            raise ValueError(f"{time_dist!r} is not one of {TIME_DISTS}")
        self.time_dist, self.logit_mean, self.logit_std = time_dist, logit_mean, logit_std

    def sample_t(self, draw, n):
        """Training times (this rank's rows of n): draw is train.BatchNoise, draw(torch.rand, n) the
        rows of a global U(0, 1) draw of n."""
        if self.time_dist == "uniform":
            return draw(torch.rand, n)
        return torch.sigmoid(self.logit_mean + self.logit_std * draw(torch.randn, n))

    def q_sample(self, x_start, t, noise=None):
        """x_t = t x + (1 - t) noise, noise ~ N(0, I)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        t = t.to(x_start.dtype).reshape(-1, *([1] * (x_start.ndim - 1)))
        return t * x_start + (1 - t) * noise

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses at times t (N,), with GaussianDiffusion.training_losses' keys: loss = mse
        = mean_flat((x - noise - v)^2), v the model's first C channels; vb zeros (no variance term)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        output = model(self.q_sample(x_start, t, noise), t, **(model_kwargs or {}))
        mse = mean_flat((x_start - noise - output[:, : x_start.shape[1]]) ** 2)
        return {"loss": mse, "mse": mse, "vb": torch.zeros_like(mse)}


def shifted_times(u, shift):
    """SD3's time shift in this convention: t = u / (shift - (shift - 1) u), u in [0, 1] (float64).

    SD3 writes t' = s u / (1 + (s - 1) u) for its time with t = 1 noise; with our t = 1 - its t that
    is the formula above, and in noise levels sigma = (1 - t) / t it is sigma(t) = shift sigma(u):
    every noise level is multiplied by shift. shift > 1 puts the finer steps at the noise end
    (t = 0; d t / d u = 1 / shift there, shift at t = 1), shift < 1 at the data end; 1 keeps u."""
    return u / (shift - (shift - 1) * u)


def velocity(model_fn, x, t, model_kwargs):
    """The velocity (N, C, ...) in x's dtype at one time t (a float or a 0-d tensor): the first C
    channels of model_fn(x, t (N,), **model_kwargs)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(len(x))
    return model_fn(x, t, **model_kwargs)[:, : x.shape[1]].to(x.dtype)


def euler_sample(model_fn, z, model_kwargs, steps, shift=1.0):
    """The ODE dx/dt = v(x, t) from z at t = 0 to t = 1 by Euler on the grid
    shifted_times(linspace(0, 1, steps + 1), shift): one model call per step."""
    times = shifted_times(torch.linspace(0, 1, steps + 1, dtype=torch.float64), shift).tolist()
    x = z
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity(model_fn, x, t, model_kwargs)
    return x


def heun_sample(model_fn, z, model_kwargs, steps, shift=1.0):
    """The ODE by Heun's second-order method (the trapezoid of Euler's predictor) on Euler's grid:
    two model calls per step, the last one at t = 1 (the velocity is finite at both ends)."""
    times = shifted_times(torch.linspace(0, 1, steps + 1, dtype=torch.float64), shift).tolist()
    x = z
    for t, t_next in zip(times[:-1], times[1:]):
        d = velocity(model_fn, x, t, model_kwargs)
        d_next = velocity(model_fn, x + (t_next - t) * d, t_next, model_kwargs)
        x = x + (t_next - t) / 2 * (d + d_next)
    return x


def sde_drift(model_fn, x, t, model_kwargs):
    """SiT's SDE drift for diffusion form "sigma" (w(t) = 1 - t): v + w score = (1 + t) v - x.

    The SDE dx = [v + w(t) score] dt + sqrt(2 w(t)) dW has the ODE's marginals for any w >= 0 (the
    score term and the noise cancel in the Fokker-Planck equation); with the linear path's score
    (t v - x) / (1 - t) and w = 1 - t the drift is (1 + t) v - x, finite up to t = 1."""
    return (1 + t) * velocity(model_fn, x, t, model_kwargs) - x


def sde_sample(model_fn, z, model_kwargs, steps, shift=1.0):
    """SiT's SDE sampler (Euler-Maruyama, diffusion form "sigma", last step "Mean"): steps - 1 steps
    x <- x + h drift(x, t) + sqrt(2 (1 - t) h) n, n ~ N(0, I) (the global RNG), on the grid
    shifted_times(linspace(0, 1 - 0.04, steps), shift), then x <- x + (1 - t) drift(x, t) without noise
    from its last t (1 - 0.04 unshifted, as SiT). steps model calls; SiT's default is 250."""
    times = shifted_times(torch.linspace(0, 1 - SDE_LAST_STEP, steps, dtype=torch.float64), shift).tolist()
    x = z
    for t, t_next in zip(times[:-1], times[1:]):
        h = t_next - t
        x = x + h * sde_drift(model_fn, x, t, model_kwargs) + math.sqrt(2 * (1 - t) * h) * torch.randn_like(x)
    return x + (1 - times[-1]) * sde_drift(model_fn, x, times[-1], model_kwargs)


def dopri5_sample(model_fn, z, model_kwargs):
    """The ODE by torchdiffeq's adaptive Dormand-Prince 5(4) with SiT's tolerances (atol 1e-6, rtol
    1e-3) from t = 0 to 1; the solver chooses its steps (6 model calls each, accepted or not).
    Unlike SiT's call, the last step ends on t = 1 (step_t): left to itself the solver steps past
    the end, calling the model at times it was never trained on (up to t = 1.9 on the Gaussian
    oracle of tests/test_flow.py), and interpolates back, which there cost 5% of the samples' scale."""
    from torchdiffeq import odeint  # only where it is used
    times = torch.tensor([0.0, 1.0], dtype=z.dtype, device=z.device)
    return odeint(lambda t, x: velocity(model_fn, x, t, model_kwargs), z, times, method="dopri5",
                  atol=1e-6, rtol=1e-3, options=dict(step_t=times[1:]))[-1]
