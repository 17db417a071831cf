"""Gaussian diffusion: DDPM forward process, ancestral and DDIM samplers, improved-DDPM hybrid loss.

Notation (t = 0 .. T-1): alpha_t = 1 - beta_t, abar_t = prod_{s <= t} alpha_s, abar_{-1} = 1,
    q(x_t | x_0)        = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I),  beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
Schedule arrays are float64 numpy; they are indexed by t and cast to the data's device and dtype.
"""
import math

import numpy as np
import torch

from progress import progress as progress_bar

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def get_named_beta_schedule(name, num_timesteps):
    """Betas, float64 of shape (T,): "linear" (DDPM's 1e-4 .. 0.02, scaled by 1000 / T) or
    "squaredcos_cap_v2" (cosine abar(u) = cos^2((u + 0.008) / 1.008 * pi / 2), betas capped at 0.999)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "squaredcos_cap_v2":
        abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        T = num_timesteps
        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}")


def mean_flat(x):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) ~= (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Elementwise log-probability of x in [-1, 1], quantised to 256 bins of width 2/255, under
    N(means, e^{2 log_scales}); the first and last bins extend to -inf and +inf."""
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - means + 1 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - means - 1 / 255))
    log = lambda p: torch.log(p.clamp(min=1e-12))
    return torch.where(x < -0.999, log(cdf_plus), torch.where(x > 0.999, log(1 - cdf_min), log(cdf_plus - cdf_min)))


def _extract(arr, t, x):
    """arr[t] for a float64 numpy array and indices t (N,), as x's dtype, shaped (N, 1, ..., 1) like x."""
    out = torch.from_numpy(arr).to(t.device)[t].to(x.dtype)
    return out.reshape(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """A T-step Gaussian diffusion for a given beta schedule.

    model_mean_type: what the model predicts: "eps" (the noise), "x0" (x_0) or "v" (the velocity
        v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans & Ho 2022; x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v).
    model_var_type: "learned_range" (the model outputs (N, 2C, ...): the prediction, then r in [-1, 1]
        with log sigma_t^2 = f log beta_t + (1 - f) log beta~_t, f = (r + 1) / 2), "fixed_small"
        (sigma_t^2 = beta~_t) or "fixed_large" (sigma_t^2 = beta_t, beta~_1 at t = 0).
    loss_type: "mse" (MSE + vb), "rescaled_mse" (vb scaled by T / 1000), "kl" or "rescaled_kl" (vb, times T).
    The model is called as model(x_t, t, **model_kwargs) with integer timesteps t of shape (N,).
    """

    def __init__(self, *, betas, model_mean_type="eps", model_var_type="learned_range", loss_type="mse"):
        for value, allowed in ((model_mean_type, MEAN_TYPES), (model_var_type, VAR_TYPES), (loss_type, LOSS_TYPES)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        if len(betas) < 2:  # beta~ at t = 1 stands in for the zero posterior variance at t = 0
            raise ValueError(f"a diffusion needs at least 2 timesteps, got {len(betas)}")
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = abar = np.cumprod(alphas)
        self.alphas_cumprod_prev = abar_prev = np.append(1.0, abar[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(abar)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - abar)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1)
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        self.log_betas = np.log(betas)
        self.fixed_log_variance = {
            "fixed_small": self.posterior_log_variance_clipped,
            "fixed_large": np.log(np.append(self.posterior_variance[1], betas[1:])),
        }.get(model_var_type)

    def _call_model(self, model, x, t, **model_kwargs):
        return model(x, t, **model_kwargs)

    def sample_t(self, draw, n):
        """Training timesteps, uniform in 0 .. T-1 (this rank's rows of n): draw is train.BatchNoise,
        draw(torch.randint, T, (n,)) the rows of a global draw of n."""
        return draw(torch.randint, self.num_timesteps, (n,))

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, noise ~ N(0, I)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean c1_t x_0 + c2_t x_t, variance beta~_t and its (clipped at t = 0) log of q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x_start + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def _predict_xstart(self, x_t, t, prediction):
        """x_0 from the model's prediction of model_mean_type."""
        if self.model_mean_type == "x0":
            return prediction
        if self.model_mean_type == "v":
            a, s = _extract(self.sqrt_alphas_cumprod, t, x_t), _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
            return a * x_t - s * prediction
        return self._predict_xstart_from_eps(x_t, t, prediction)

    def _target(self, x_start, t, noise):
        """What the model should predict at (x_t, t): eps, x_0 or v."""
        if self.model_mean_type == "x0":
            return x_start
        if self.model_mean_type == "v":
            a, s = _extract(self.sqrt_alphas_cumprod, t, x_start), _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start)
            return a * noise - s * x_start
        return noise

    def _predict_eps_from_xstart(self, x_t, t, x_start):
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start) / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    @staticmethod
    def _split_learned(output, x):
        """(N, 2C, ...) -> prediction (N, C, ...), variance interpolation r (N, C, ...)."""
        if output.shape[1] != 2 * x.shape[1]:
            raise ValueError(f"learned variance needs {2 * x.shape[1]} output channels, got {output.shape[1]}")
        return output.split(x.shape[1], dim=1)

    def _p_from_output(self, output, x, t, clip_denoised, denoised_fn=None):
        """p(x_{t-1} | x_t) from a raw model output: dict of mean, variance, log_variance, pred_xstart."""
        if self.model_var_type == "learned_range":
            output, r = self._split_learned(output, x)
            frac = (r + 1) / 2
            log_var = frac * _extract(self.log_betas, t, x) + (1 - frac) * _extract(self.posterior_log_variance_clipped, t, x)
        else:
            log_var = _extract(self.fixed_log_variance, t, x).expand_as(x)
        pred_xstart = self._predict_xstart(x, t, output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": log_var.exp(), "log_variance": log_var, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model at (x_t, t) and return p(x_{t-1} | x_t) (see _p_from_output)."""
        output = self._call_model(model, x, t, **(model_kwargs or {}))
        return self._p_from_output(output, x, t, clip_denoised, denoised_fn)

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """One ancestral step x_{t-1} = mean + sigma_t z (no noise at t = 0): dict of sample, pred_xstart."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """One DDIM step: x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}); variance outputs are ignored."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar, abar_prev = _extract(self.alphas_cumprod, t, x), _extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = (out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
                  + nonzero * sigma * torch.randn_like(x))
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _loop(self, step, model, shape, noise, device, progress):
        """x_T = noise (default N(0, I)), then x <- step(x, t)["sample"] for t = T-1 .. 0; returns x_0."""
        if device is None:
            device = noise.device if noise is not None else next(model.parameters()).device
        x = torch.randn(*shape, device=device) if noise is None else noise.to(device)
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in progress_bar(steps, desc="sampling") if progress else steps:
            x = step(x, torch.full((shape[0],), i, device=device, dtype=torch.long))["sample"]
        return x

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False):
        """Ancestral (DDPM) sampling of a batch of the given shape; one model call per step."""
        step = lambda x, t: self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        return self._loop(step, model, shape, noise, device, progress)

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0):
        """DDIM sampling (deterministic for eta = 0) of a batch of the given shape; one model call per step."""
        step = lambda x, t: self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta)
        return self._loop(step, model, shape, noise, device, progress)

    def _vb_terms_bpd(self, p, x_start, x_t, t):
        """L_t in bits/dim, (N,): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the
        discretised decoder NLL -log p(x_0 | x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses at timesteps t (N,), a dict of (N,) tensors.

        MSE types: mse = mean_flat((target - prediction)^2), target eps, x_0 or v; with a learned variance also
        vb = L_t in bits/dim computed with the predicted mean detached, so vb trains only the variance
        (improved DDPM's hybrid loss); loss = mse + vb. KL types: loss = vb through the whole output.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        output = self._call_model(model, x_t, t, **(model_kwargs or {}))
        if self.loss_type in ("kl", "rescaled_kl"):
            vb = self._vb_terms_bpd(self._p_from_output(output, x_t, t, clip_denoised=False), x_start, x_t, t)
            return {"loss": vb * self.num_timesteps if self.loss_type == "rescaled_kl" else vb, "vb": vb}
        terms = {}
        prediction = output
        if self.model_var_type == "learned_range":
            prediction, r = self._split_learned(output, x_t)
            frozen = torch.cat([prediction.detach(), r], dim=1)
            terms["vb"] = self._vb_terms_bpd(self._p_from_output(frozen, x_t, t, clip_denoised=False), x_start, x_t, t)
            if self.loss_type == "rescaled_mse":
                terms["vb"] = terms["vb"] * self.num_timesteps / 1000.0
        terms["mse"] = mean_flat((self._target(x_start, t, noise) - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
