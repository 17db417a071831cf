"""Tests of diffusion/ against closed forms, mostly the Gaussian oracle.

For data x0 ~ N(0, S^2 I) everything is Gaussian: x_t ~ N(0, abar_t S^2 + 1 - abar_t), the optimal noise
predictor is eps*(x_t, t) = x_t sqrt(1 - abar_t) / (abar_t S^2 + 1 - abar_t), and the exact reverse step
q(x_{t-1} | x_t) has variance beta~_t + c1_t^2 Var(x0 | x_t) with Var(x0 | x_t) = S^2 (1 - abar_t) / (abar_t S^2 + 1 - abar_t).
abar_t always refers to the original 1000-step linear schedule at the original timestep the model receives.
"""
import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, space_timesteps
from diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood, normal_kl

S = 0.5
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def oracle_v(respacing):
    """Per original timestep, the v in [-1, 1] whose learned-range variance exp(f log beta + (1 - f) log beta~),
    f = (v + 1) / 2, equals the exact reverse variance of the respaced chain (beta, beta~ of the kept steps)."""
    kept = sorted(space_timesteps(1000, respacing))
    abar = ABAR[kept]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev
    post = beta * (1 - abar_prev) / (1 - abar)
    c1 = beta * np.sqrt(abar_prev) / (1 - abar)
    true_var = post + c1**2 * S**2 * (1 - abar) / (abar * S**2 + 1 - abar)
    lo, hi = np.log(np.append(post[1], post[1:])), np.log(beta)
    v = np.zeros(1000)
    v[kept] = np.clip(2 * (np.log(true_var) - lo) / (hi - lo) - 1, -1, 1)
    return torch.tensor(v, dtype=torch.float32)


def gaussian_oracle(v_table=None, eps_scale=1.0):
    """model(x, t) -> (N, 2C, ...): eps_scale * eps*(x, t), then v_table[t] (zeros if None)."""
    abar = torch.tensor(ABAR, dtype=torch.float32)

    def model(x, t):
        a = abar[t].view(-1, *([1] * (x.ndim - 1)))
        eps = eps_scale * x * (1 - a).sqrt() / (a * S**2 + 1 - a)
        v = torch.zeros_like(x) if v_table is None else v_table[t].view_as(a).expand_as(x)
        return torch.cat([eps, v], dim=1)

    return model


def standard_noise(shape):
    """N(0, I) noise standardised to sample mean 0 and std 1, so only the sampler's own error shows."""
    z = torch.randn(shape)
    return (z - z.mean()) / z.std()


def test_space_timesteps_and_respaced_betas():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    assert space_timesteps(11, [4]) == {0, 3, 7, 10}  # stride 10/3, rounded to nearest
    steps = sorted(space_timesteps(1000, "250"))
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert set(np.diff(steps)) <= {4, 5}
    sections = np.bincount(np.array(sorted(space_timesteps(300, [10, 15, 20]))) // 100)
    assert sections.tolist() == [10, 15, 20]
    assert create_diffusion("").num_timesteps == create_diffusion(None).num_timesteps == 1000
    for respacing in ["250", "ddim50", "10,20"]:
        d = create_diffusion(respacing)
        kept = sorted(space_timesteps(1000, respacing))
        assert d.num_timesteps == len(kept) == {"250": 250, "ddim50": 50, "10,20": 30}[respacing]
        np.testing.assert_allclose(np.cumprod(1 - d.betas), ABAR[kept], rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")


def test_model_receives_original_timesteps_and_call_counts():
    calls = []

    def recording(x, t):
        calls.append(t.clone())
        return gaussian_oracle()(x, t)

    d = create_diffusion("ddim50")
    d.ddim_sample_loop(recording, (3, 1, 2, 2), device="cpu")
    assert len(calls) == 50
    assert all(t.dtype == torch.long and (t == t[0]).all() for t in calls)
    assert [int(t[0]) for t in calls] == list(range(980, -1, -20))

    calls.clear()
    d.training_losses(recording, torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 49]))
    assert calls[0].tolist() == [0, 20, 980]

    calls.clear()
    create_diffusion("250").p_sample_loop(recording, (2, 1, 1, 1), device="cpu")
    assert [int(t[0]) for t in calls] == sorted(space_timesteps(1000, "250"), reverse=True)


def test_beta_schedules():
    linear = create_diffusion("", diffusion_steps=500).betas
    assert linear[0] == pytest.approx(2e-4) and linear[-1] == pytest.approx(0.04) and len(linear) == 500
    cosine = create_diffusion("", noise_schedule="squaredcos_cap_v2").betas
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(np.cumprod(1 - cosine)[:990], f[1:991] / f[0], rtol=1e-9)
    assert cosine.max() == 0.999


def test_learned_range_endpoints_and_last_step():
    """v = +1 gives log beta_t, v = -1 gives log beta~_t, with beta~_0 = 0 replaced by beta~_1; the last
    ancestral step (t = 0) adds no noise."""
    d = create_diffusion("")
    t = torch.tensor([0, 1, 500, 999])
    a, a_prev = ABAR[t], np.append(1.0, ABAR)[t]
    beta = 1 - a / a_prev
    post = beta * (1 - a_prev) / (1 - a)
    post[0] = (1 - ABAR[1] / ABAR[0]) * (1 - ABAR[0]) / (1 - ABAR[1])
    x = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    for v, expected in [(1.0, np.log(beta)), (-1.0, np.log(post))]:
        out = d.p_mean_variance(lambda x, t: torch.cat([x, torch.full_like(x, v)], 1), x, t, clip_denoised=False)
        np.testing.assert_allclose(out["log_variance"].flatten().numpy(), expected, rtol=1e-9)
    model = gaussian_oracle(torch.ones(1000))
    x = torch.randn(8, 1, 1, 1)
    first, second = (d.p_sample(model, x, torch.zeros(8, dtype=torch.long), clip_denoised=False)["sample"]
                     for _ in range(2))
    torch.testing.assert_close(first, second)


def test_q_sample_mean_and_variance():
    d = create_diffusion("")
    t, x0 = 300, 0.7
    x_start = torch.full((200_000, 1), x0)
    x_t = d.q_sample(x_start, torch.full((200_000,), t))
    mean, var = math.sqrt(ABAR[t]) * x0, 1 - ABAR[t]
    # Standard errors: sqrt(var / n) for the mean, var * sqrt(2 / n) for the variance; allow 5 of them.
    assert abs(x_t.mean().item() - mean) < 5 * math.sqrt(var / 2e5)
    assert abs(x_t.var().item() - var) < 5 * var * math.sqrt(2 / 2e5)
    noise = torch.randn(4, 1)
    expected = math.sqrt(ABAR[t]) * x_start[:4] + math.sqrt(1 - ABAR[t]) * noise
    torch.testing.assert_close(d.q_sample(x_start[:4], torch.full((4,), t), noise), expected)


def test_q_posterior_matches_bayes_rule():
    """x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t):
    the posterior precision is 1 / (1 - abar_{t-1}) + alpha_t / beta_t."""
    d = create_diffusion("")
    t, x0, xt = 500, 0.3, -1.2
    a_prev, alpha = ABAR[t - 1], ABAR[t] / ABAR[t - 1]
    var = 1 / (1 / (1 - a_prev) + alpha / (1 - alpha))
    mean = var * (math.sqrt(a_prev) * x0 / (1 - a_prev) + math.sqrt(alpha) * xt / (1 - alpha))
    got_mean, got_var, got_log_var = d.q_posterior_mean_variance(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t]))
    assert got_mean.item() == pytest.approx(mean, rel=1e-9)
    assert got_var.item() == pytest.approx(var, rel=1e-9)
    assert got_log_var.item() == pytest.approx(math.log(var), rel=1e-9)


def test_kl_and_discretized_likelihood():
    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=torch.float64) for v in (0.3, -1.0, -0.2, 0.5))
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 bin centres, 2/255 apart
    for mean, log_scale in [(0.1, -3.0), (0.9, -1.0), (-0.5, 0.5)]:
        log_p = discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_scale))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_p_sample_loop_std_250():
    """Exact eps and reverse variance: the only bias is x_T ~ N(0, I) instead of N(0, ~1), -0.02% in std
    (scalar recursion). Monte-Carlo error of the std of 65536 samples: S / sqrt(2n) = 0.28%, so 1% is 3.6 sd.
    Wrong variances fail: v = 0 gives -1.16%, fixed beta~ gives -2.8% (same recursion)."""
    shape = (16384, 1, 2, 2)
    x = create_diffusion("250").p_sample_loop(
        gaussian_oracle(oracle_v("250")), shape, noise=standard_noise(shape), clip_denoised=False)
    assert abs(x.std().item() / S - 1) < 0.01


def test_ddim_std_250_and_50():
    """eta = 0 with this oracle is linear and deterministic, so with standardised x_T the std error is the
    discretisation error alone: -1.15% at 250 steps, -5.51% at ddim50 (scalar recursion of the DDIM update)."""
    shape = (4096, 1, 2, 2)
    noise = standard_noise(shape)
    errors = {}
    for respacing in ["250", "ddim50"]:
        x = create_diffusion(respacing).ddim_sample_loop(gaussian_oracle(), shape, noise=noise, clip_denoised=False)
        errors[respacing] = x.std().item() / S - 1
    assert abs(errors["250"]) < 0.02
    assert -0.07 < errors["ddim50"] < -0.04
    assert abs(errors["ddim50"]) > abs(errors["250"])


def test_training_losses_gaussian_oracle():
    d = create_diffusion("")
    t = torch.arange(1000).repeat(4)
    x_start = S * torch.randn(len(t), 1, 4, 4)
    noise = torch.randn_like(x_start)
    v = oracle_v("1000")
    oracle = d.training_losses(gaussian_oracle(v), x_start, t, noise=noise)
    perturbed = d.training_losses(gaussian_oracle(v, eps_scale=1.1), x_start, t, noise=noise)
    a = torch.tensor(ABAR, dtype=torch.float64)[t]
    m = 1 - (1 - a) / (a * S**2 + 1 - a)  # E[(eps - eps*)^2] per element at t
    # Each element's squared error is m_t chi^2_1 (variance 2 m_t^2): the sd of the mean over n elements is
    # sqrt(2 mean(m^2) / n) ~ 0.002 for n = 64000; allow 5 sd.
    tolerance = 5 * math.sqrt(2 * (m**2).mean().item() / x_start.numel())
    assert abs(oracle["mse"].mean().item() - m.mean().item()) < tolerance
    torch.testing.assert_close(oracle["loss"], oracle["mse"] + oracle["vb"])
    assert oracle["loss"].mean() < perturbed["loss"].mean()
    assert oracle["vb"].mean() < d.training_losses(gaussian_oracle(), x_start, t, noise=noise)["vb"].mean()


def test_vb_trains_only_the_variance():
    d = create_diffusion("")
    eps_gain, v_bias = torch.ones((), requires_grad=True), torch.zeros((), requires_grad=True)

    def model(x, t):
        out = gaussian_oracle()(x, t)
        return torch.cat([eps_gain * out[:, :1], out[:, 1:] + v_bias], dim=1)

    losses = d.training_losses(model, S * torch.randn(64, 1, 2, 2), torch.randint(0, 1000, (64,)))
    eps_grad, v_grad = torch.autograd.grad(losses["vb"].mean(), [eps_gain, v_bias], allow_unused=True)
    assert (eps_grad is None or eps_grad == 0) and v_grad != 0
    rescaled = create_diffusion("250", rescale_learned_sigmas=True)
    plain = create_diffusion("250")
    x, t, noise = torch.randn(8, 1, 2, 2), torch.randint(0, 250, (8,)), torch.randn(8, 1, 2, 2)
    vb = plain.training_losses(model, x, t, noise=noise)["vb"]
    torch.testing.assert_close(rescaled.training_losses(model, x, t, noise=noise)["vb"], vb * 0.25)


def as_prediction(eps_model, prediction):
    """The same model as a predictor of eps, x0 or v (Salimans & Ho 2022): with x0 = (x - sqrt(1 - abar) eps) /
    sqrt(abar), v = sqrt(abar) eps - sqrt(1 - abar) x0. Learned-variance channels pass through."""
    abar = torch.tensor(ABAR, dtype=torch.float32)

    def model(x, t):
        eps, var = eps_model(x, t).chunk(2, dim=1)
        a = abar[t].view(-1, *([1] * (x.ndim - 1)))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]
        return torch.cat([out, var], dim=1)

    return model


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_prediction_type_samples_the_same_chain(prediction):
    """One oracle written as eps, x0 or v predictor gives the same DDIM and DDPM samples for the same noise:
    a wrong conversion to x_0 (sign, sqrt(abar) or sqrt(1 - abar) swapped) moves them far beyond 1e-3."""
    shape = (256, 1, 2, 2)
    noise = standard_noise(shape)
    model = gaussian_oracle(oracle_v("50"))
    for respacing, loop in (("ddim50", "ddim_sample_loop"), ("50", "p_sample_loop")):
        samples = {}
        for kind, fn in (("eps", model), (prediction, as_prediction(model, prediction))):
            torch.manual_seed(1)
            d = create_diffusion(respacing, prediction=kind)
            samples[kind] = getattr(d, loop)(fn, shape, noise=noise, clip_denoised=False)
        torch.testing.assert_close(samples[prediction], samples["eps"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_target_per_prediction_type(prediction):
    """A model that outputs the defined target (v = sqrt(abar) eps - sqrt(1 - abar) x0) has mse 0; the
    other two targets do not."""
    d = create_diffusion("", prediction=prediction, learn_sigma=False)
    t = torch.arange(0, 1000, 37)
    x_start, noise = S * torch.randn(len(t), 1, 4, 4), torch.randn(len(t), 1, 4, 4)
    a = torch.tensor(ABAR, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    targets = {"eps": noise, "x0": x_start, "v": a.sqrt() * noise - (1 - a).sqrt() * x_start}
    for kind, target in targets.items():
        mse = d.training_losses(lambda x, t: target, x_start, t, noise=noise)["mse"]
        assert (mse.max() < 1e-10) if kind == prediction else (mse.mean() > 0.01), (kind, mse)
