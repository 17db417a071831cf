"""Tests of flow matching (diffusion/flow.py, the flow samplers of sampling.py, guidance for flow
times, the t_max of models.py) against the Gaussian oracle: for data x ~ N(0, s^2 I) on the path
x_t = t x + (1 - t) eps, x_t ~ N(0, D_t I) with D_t = t^2 s^2 + (1 - t)^2, and the exact velocity is
    v(x_t, t) = E[x - eps | x_t] = x_t (t s^2 - (1 - t)) / D_t = x_t D_t' / (2 D_t),
so the ODE dx/dt = v carries z at t = 0 to x_1 = sqrt(D_1 / D_0) z = s z, sample by sample."""
import math

import pytest
import torch

import sampling
import train
from diffusion import TIME_DISTS, LinearFlow, create_diffusion
from diffusion.flow import SDE_LAST_STEP, shifted_times
from guidance import EVERY_STEP, Guided
from models import DiT
from test_models import reference_dit_forward

S = 0.5
pytestmark = pytest.mark.usefixtures("one_thread")


def gain(t, s=S):
    """v(x_t, t) / x_t for data std s, float64 for float t."""
    return (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2)


class Oracle:
    """The exact velocity for data N(0, s_y^2 I) per class y (stds[num_classes] for the null label;
    without labels stds[0]), a model with learned-variance channels (NaN: they must not be used).
    Records (batch size, t of its first row) per call."""

    def __init__(self, stds=(S,)):
        self.stds, self.num_classes, self.log = torch.tensor(stds, dtype=torch.float64), len(stds) - 1, []

    def __call__(self, x, t, y=None):
        self.log.append((len(x), t[0].item()))
        s = self.stds[0] if y is None else self.stds[y].view(-1, *[1] * (x.ndim - 1))
        v = x * gain(t.double().view(-1, *[1] * (x.ndim - 1)), s).to(x.dtype)
        return torch.cat([v, torch.full_like(x, float("nan"))], dim=1)


@pytest.fixture(scope="module")
def z():
    """20k samples of dimension 4, standardised: the std of a sample set is then only the sampler's."""
    z = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    return (z - z.mean()) / z.std()


def euler_map(times):
    """The factor by which Euler multiplies every sample for this velocity (s for the exact flow):
    prod (1 + h gain(t))."""
    return math.prod(1 + (b - a) * gain(a) for a, b in zip(times[:-1], times[1:]))


def heun_map(times):
    """Heun's factor: prod (1 + h / 2 (g(t) + g(t') (1 + h g(t))))."""
    return math.prod(1 + (b - a) / 2 * (gain(a) + gain(b) * (1 + (b - a) * gain(a)))
                     for a, b in zip(times[:-1], times[1:]))


def test_euler_and_heun_carry_each_noise_sample_to_s_times_itself(z):
    """The exact flow map is z -> s z; Euler and Heun multiply every sample by their discrete map's
    factor, computed here from the grid (float32 rounding of 100 steps: 1e-5). Euler is first order
    (its error halves from 50 to 100 steps: 2.9% -> 1.5%), Heun second order (quarters: 0.067% ->
    0.018% from 25 to 50 steps), so Heun is closer at equal steps and at equal model calls. The
    samples' std is s within 1% (standardised z: only the discretisation error remains)."""
    errors = {}
    for name, steps, factor_of in (("euler", 50, euler_map), ("euler", 100, euler_map),
                                   ("heun", 25, heun_map), ("heun", 50, heun_map)):
        oracle = Oracle()
        x = sampling.make_sampler(name, steps)(oracle, z, {}, False)
        factor = factor_of([i / steps for i in range(steps + 1)])
        torch.testing.assert_close(x, factor * z, rtol=1e-5, atol=1e-5)
        errors[name, steps] = abs(factor / S - 1)
        assert len(oracle.log) == steps * (2 if name == "heun" else 1)
        assert abs(x.std().item() / S - 1) < 0.01 + errors[name, steps]
    assert errors["euler", 100] < 0.02 and 1.8 < errors["euler", 50] / errors["euler", 100] < 2.2, errors
    assert errors["heun", 50] < 0.001 and 3.5 < errors["heun", 25] / errors["heun", 50] < 4.5, errors
    assert errors["heun", 50] < errors["euler", 50] and errors["heun", 25] < errors["euler", 50] / 5


def test_sde_reaches_the_data_std_and_forgets_the_noise(z):
    """SiT's SDE: the Euler-Maruyama steps keep the marginal N(0, D_t) up to t = 0.96 (up to their
    O(h) bias), then the noiseless "Mean" step multiplies by m = 1 + 0.04 ((1 + t) gain(t) - 1):
    std m sqrt(D_0.96) = 0.990 s (the last step leaves 1% on the table, as in SiT). 80000 normal
    values give a std to 1 / sqrt(2 * 80000) = 0.25%: 1% is 4 standard errors (measured 0.2% off).
    The samples are not s z (correlation with z measured 0.30, the ODE's is 1); a seed fixes them."""
    t = 1 - SDE_LAST_STEP
    want = (1 + SDE_LAST_STEP * ((1 + t) * gain(t) - 1)) * math.sqrt(t**2 * S**2 + (1 - t) ** 2)
    oracle = Oracle()
    torch.manual_seed(1)
    x = sampling.make_sampler("sde", 250)(oracle, z, {}, False)
    assert abs(x.std().item() / want - 1) < 0.01 and abs(x.mean().item()) < 4 * S / math.sqrt(z.numel())
    assert len(oracle.log) == 250 and oracle.log[0][1] == 0 and oracle.log[-1][1] == pytest.approx(t)
    assert abs(torch.corrcoef(torch.stack([x.flatten(), z.flatten()]))[0, 1]) < 0.5
    torch.manual_seed(1)
    assert torch.equal(sampling.make_sampler("sde", 250)(Oracle(), z, {}, False), x)


def test_dopri5_solves_the_ode_inside_the_trained_times(z):
    """torchdiffeq's dopri5 at SiT's tolerances: within 1% of s z sample by sample (the tolerances
    bound each step's error estimate, not the global error: measured 0.2%), every model call at a
    time in [0, 1], the last at t = 1 (up to float32 rounding)."""
    oracle = Oracle()
    x = sampling.make_sampler("dopri5", None)(oracle, z, {}, False)
    assert (torch.linalg.norm(x - S * z) / torch.linalg.norm(S * z)).item() < 0.01
    times = [t for _, t in oracle.log]
    assert all(0 <= t <= 1 for t in times) and times[-1] == pytest.approx(1, abs=1e-6) and len(times) < 100


def test_the_shift_scales_every_noise_level_of_the_grid():
    """shifted_times is SD3's t' = s u / (1 + (s - 1) u) written for t = 1 - its time: the noise levels
    sigma = (1 - t) / t of the grid are shift times the unshifted ones, so shift 3 puts the small steps
    at the noise end (t = 0) and 1/3 at the data end; the samplers call the model on that grid."""
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    for shift in (3.0, 1 / 3):
        t = shifted_times(u, shift)
        sd3 = shift * (1 - u) / (1 + (shift - 1) * (1 - u))  # SD3's formula in its own time, 1 - u
        torch.testing.assert_close(t, 1 - sd3)
        torch.testing.assert_close(((1 - t) / t)[1:-1], shift * ((1 - u) / u)[1:-1])
        steps = t.diff()
        assert (steps[0] < steps[-1]) == (shift > 1) and t[0] == 0 and t[-1] == 1
        oracle = Oracle()
        sampling.make_sampler("euler", 10, shift=shift)(oracle, torch.ones(2, 1), {}, False)
        torch.testing.assert_close(torch.tensor([t for _, t in oracle.log], dtype=torch.float64), t[:-1].float().double())
    torch.testing.assert_close(shifted_times(u, 1.0), u)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_the_loss_of_the_exact_velocity_is_the_conditional_variance(t):
    """u = x - eps and x_t are jointly Gaussian per dimension: Var u = s^2 + 1, Cov(u, x_t) = t s^2 -
    (1 - t), so E (u - E[u | x_t])^2 = s^2 + 1 - (t s^2 - (1 - t))^2 / D_t = s^2 / D_t. The mse of a
    sample averages 4 squared normals: its mean over 20000 samples has a relative standard error of
    sqrt(2 / 80000) = 0.5%; 2% is 4 of them. loss = mse (the velocity's squared error only), vb zeros,
    whatever the NaN variance channels hold."""
    g = torch.Generator().manual_seed(1)
    x, noise = S * torch.randn(20000, 4, generator=g), torch.randn(20000, 4, generator=g)
    losses = LinearFlow().training_losses(Oracle(), x, torch.full((20000,), t), noise=noise)
    want = S**2 / (t**2 * S**2 + (1 - t) ** 2)
    assert abs(losses["mse"].mean().item() / want - 1) < 0.02
    assert torch.equal(losses["loss"], losses["mse"]) and torch.equal(losses["vb"], torch.zeros(20000))
    worse = LinearFlow().training_losses(lambda x_t, t: 1.1 * Oracle()(x_t, t), x, torch.full((20000,), t), noise=noise)
    assert worse["mse"].mean() > losses["mse"].mean()


def test_the_loss_averaged_over_uniform_time_is_pi_s_over_2():
    """Averaged over t ~ U(0, 1): integral of s^2 / ((s^2 + 1) t^2 - 2 t + 1) dt = s (arctan s +
    arctan 1/s) = pi s / 2. Within 4 standard errors of the Monte Carlo mean (estimated from the
    per-sample losses)."""
    g = torch.Generator().manual_seed(2)
    draw = lambda fn, *size: fn(*size, generator=g)
    flow = LinearFlow()
    x, noise = S * torch.randn(40000, 4, generator=g), torch.randn(40000, 4, generator=g)
    loss = flow.training_losses(Oracle(), x, flow.sample_t(draw, 40000), noise=noise)["loss"]
    assert abs(loss.mean().item() - math.pi * S / 2) < 4 * loss.std().item() / math.sqrt(len(loss))


def test_q_sample_is_the_linear_path():
    x, noise, t = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.tensor([0.0, 0.25, 1.0])
    x_t = LinearFlow().q_sample(x, t, noise)
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[2], x[2])
    torch.testing.assert_close(x_t[1], 0.25 * x[1] + 0.75 * noise[1])


def test_time_distributions():
    """uniform: mean 1/2 and std 1/sqrt(12); logit-normal(0.3, 1.5): logit t has mean 0.3 and std 1.5.
    Tolerances 4 standard errors of 100k draws (std of a std estimate: std / sqrt(2 n) for the
    normal, about 0.45 std / sqrt(n) for the uniform)."""
    n = 100_000
    noise = train.BatchNoise(0, 0, 1, torch.device("cpu"))
    t = LinearFlow().sample_t(noise, n)
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1
    assert abs(t.mean() - 0.5) < 4 * 0.289 / math.sqrt(n) and abs(t.std() - 0.2887) < 4 * 0.13 / math.sqrt(n)
    logit = torch.logit(LinearFlow("logit-normal", 0.3, 1.5).sample_t(noise, n).double())
    assert abs(logit.mean() - 0.3) < 4 * 1.5 / math.sqrt(n) and abs(logit.std() - 1.5) < 4 * 1.5 / math.sqrt(2 * n)
    with pytest.raises(ValueError, match="logit-normal"):
        LinearFlow("lognormal")
    assert TIME_DISTS == ("uniform", "logit-normal")


@pytest.mark.parametrize("objective", [LinearFlow(), LinearFlow("logit-normal", -0.5, 2.0), create_diffusion("")])
def test_sample_t_on_two_ranks_deals_the_rows_of_the_global_draw(objective):
    """train.BatchNoise on 2 processes: each rank's times are rows rank::2 of the 1-process draw of the
    global batch. DDPM's sample_t is train.py's draw, torch.randint(1000, (n,)), bit for bit."""
    one = objective.sample_t(train.BatchNoise(5, 0, 1, torch.device("cpu")), 8)
    two = [objective.sample_t(train.BatchNoise(5, rank, 2, torch.device("cpu")), 8) for rank in (0, 1)]
    assert torch.equal(two[0], one[0::2]) and torch.equal(two[1], one[1::2]) and len(set(one.tolist())) == 8
    if not isinstance(objective, LinearFlow):
        assert torch.equal(one, torch.randint(1000, (8,), generator=torch.Generator().manual_seed(5)))


def labelled(n=4, seed=3):
    """Noise (n, 4, 2, 2) and labels of the two classes of the guidance oracle."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 2, 2, generator=g), torch.tensor([0, 1] * (n // 2))


STDS = (0.5, 0.8, 1.2)  # classes 0 and 1; the null label 2: the data without its class


@pytest.mark.parametrize("name", ["euler", "heun", "dopri5"])
def test_flow_guidance_interval_0_inf_is_plain_cfg(name):
    """(0, inf] guides every call (also Heun's and dopri5's at t = 1, sigma = 0): the same samples as
    the guided velocity v_null + w (v_y - v_null) written out, from batches of 2N."""
    z, y = labelled()
    oracle, w = Oracle(STDS), 3.0

    def plain(x, t, y):
        cond, uncond = oracle(x, t, y), oracle(x, t, torch.full_like(y, 2))
        return uncond + w * (cond - uncond)

    sampler = sampling.make_sampler(name, 6)
    want = sampler(plain, z, dict(y=y), False)
    oracle.log.clear()
    got = sampling.denoise(Guided(oracle, w, interval=EVERY_STEP, objective="flow"), sampler, z, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert {b for b, _ in oracle.log} == {2 * len(z)}
    assert max(t for _, t in oracle.log) == pytest.approx(5 / 6 if name == "euler" else 1, abs=1e-6)
    conditional = sampler(oracle, z, dict(y=y), False)
    assert not torch.allclose(got, conditional, atol=1e-2)


@pytest.mark.parametrize("name", ["euler", "sde"])
def test_flow_guidance_scale_1_and_autoguidance_by_itself_are_the_conditional_model(name):
    z, y = labelled()
    oracle = Oracle(STDS)
    torch.manual_seed(0)
    conditional = sampling.make_sampler(name, 8)(oracle, z, dict(y=y), False)
    for guided in (Guided(oracle, 1.0, objective="flow"), Guided(oracle, 2.5, guide=Oracle(STDS), objective="flow")):
        oracle.log.clear()
        torch.manual_seed(0)
        got = sampling.denoise(guided, sampling.make_sampler(name, 8), z, y)
        torch.testing.assert_close(got, conditional, rtol=0, atol=1e-6)
        assert {b for b, _ in oracle.log} == {len(z)}  # no null-label rows


def test_flow_guidance_interval_guides_exactly_the_times_inside():
    """Euler-10 calls the model at t = 0, 0.1, ..., 0.9: sigma = (1 - t) / t = inf, 9, 4, 2.33, 1.5,
    1, 0.67, 0.43, 0.25, 0.11. (0.5, 3] guides t = 0.3 .. 0.6 and no other. REPA's t <= 0.7 in its
    time (t = 1 noise), sigma <= 0.7 / 0.3, is t >= 0.3 here."""
    oracle = Oracle(STDS)
    sampling.denoise(Guided(oracle, 2.0, interval=(0.5, 3.0), objective="flow"), sampling.make_sampler("euler", 10),
                     *labelled())
    assert [round(t, 6) for b, t in oracle.log if b == 8] == [0.3, 0.4, 0.5, 0.6]
    assert len(oracle.log) == 10
    t = (torch.arange(1000) + 0.5) / 1000
    assert torch.equal(Guided(None, 2.0, interval=(0, 0.7 / 0.3), objective="flow").guided_at(t), t > 0.3)
    assert Guided(None, 2.0, objective="flow").guided_at(torch.tensor([0.0, 0.5, 1.0])).all()
    assert not Guided(None, 2.0, interval=(2.0, 2.0), objective="flow").guided_at(t).any()


def test_flow_guidance_is_the_formula_on_the_denoised_estimate():
    """Autoguidance on the velocity is D = D_guide + w (D_main - D_guide) on the denoised estimate
    D = x_t + (1 - t) v, in closed form E[x | x_t] = t s^2 / D_t x_t for two oracles (std 0.5, 0.8)."""
    main, guide = Oracle((0.5,)), Oracle((0.8,))
    x, t = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    out = Guided(main, 2.5, guide=guide, objective="flow")(x, t, torch.zeros(3, dtype=torch.long))
    tt = t.view(-1, 1, 1, 1)
    denoised = lambda s: tt * s**2 / (tt**2 * s**2 + (1 - tt) ** 2) * x
    torch.testing.assert_close(x + (1 - tt) * out[:, :4].double(), denoised(0.8) + 2.5 * (denoised(0.5) - denoised(0.8)),
                               rtol=1e-5, atol=1e-5)


TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def test_a_flow_dit_gives_sits_velocity():
    """SiT's model is DiT's with learn_sigma=True, called with t in [0, 1] straight into DiT's sinusoid,
    its first C output channels the velocity (reference_dit_forward, DiT written out from a state
    dict). A vanilla DiT built with t_max=1 gives that velocity to the samplers and the loss."""
    torch.manual_seed(0)
    model = DiT(**TINY, learn_sigma=True, t_max=1).eval()
    sd = {k: torch.randn_like(v) * 0.3 if k != "pos_embed" else v for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.37, 1.0]), torch.tensor([1, 4, 10])
    with torch.no_grad():
        sit = reference_dit_forward(sd, x, t, y)[:, :4]
        calls = []
        sampled = sampling.make_sampler("euler", 1)(lambda x, t, y: calls.append(t) or model(x, t, y), x, dict(y=y), False)
        torch.testing.assert_close(sampled, x + reference_dit_forward(sd, x, torch.zeros(3), y)[:, :4], rtol=1e-4, atol=1e-4)
        assert calls[0].dtype == torch.float32
        torch.testing.assert_close(model(x, t, y)[:, :4], sit, rtol=1e-4, atol=1e-4)
        loss = LinearFlow().training_losses(model, x, t, dict(y=y), noise=torch.zeros_like(x))["mse"]
        x_t = t.view(-1, 1, 1, 1) * x  # zero noise: the velocity target is x itself
        torch.testing.assert_close(loss, ((x - reference_dit_forward(sd, x_t, t, y)[:, :4]) ** 2).mean((1, 2, 3)),
                                   rtol=1e-4, atol=1e-4)


def test_an_mp_flow_dit_sees_2t_minus_1():
    """The MP Fourier embedding gets 2 t / t_max - 1: a model with t_max=1 at t equals the same weights
    with t_max=1000 at 1000 t, and its Fourier input spans [-1, 1] over t in [0, 1]."""
    torch.manual_seed(0)
    flow = DiT(**TINY, mp=True, t_max=1).eval()
    ddpm = DiT(**TINY, mp=True).eval()
    ddpm.load_state_dict(flow.state_dict())
    seen = []
    flow.t_embedder.fourier.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 0.37, 1.0]), torch.tensor([1, 4, 10])
    with torch.no_grad():
        torch.testing.assert_close(flow(x, t, y), ddpm(x, 1000 * t, y))
    torch.testing.assert_close(seen[0], torch.tensor([-1.0, -0.26, 1.0]))
    assert ddpm.t_embedder.t_max == 1000


@pytest.mark.parametrize("name", sampling.SAMPLERS["flow"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_every_flow_sampler_at_few_steps_samples(name, steps):
    """Finite samples of the input's shape from 1 step on (dopri5 ignores the count)."""
    z = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    oracle = Oracle()
    x = sampling.make_sampler(name, steps, shift=3.0)(oracle, z, {}, False)
    assert x.shape == z.shape and torch.isfinite(x).all()
    if name != "dopri5":
        assert len(oracle.log) == steps * (2 if name == "heun" else 1)


def test_sampler_names_and_bad_settings_are_usage_errors():
    assert set(sampling.DEFAULT_STEPS) == {*sampling.SAMPLERS["ddpm"], *sampling.SAMPLERS["flow"]}
    assert all(sampling.GRID_SAMPLER[objective] in names for objective, names in sampling.SAMPLERS.items())
    for name, steps, shift in (("rk4", 10, 1.0), ("euler", 0, 1.0), ("heun", 10, 0.0), ("sde", 10, float("nan"))):
        with pytest.raises(train.UsageError, match=name):
            sampling.make_sampler(name, steps, shift=shift)


@pytest.mark.parametrize("mp", [False, True])
def test_a_flow_dit_trains_under_bf16_autocast(mp):
    """Three Adam steps on the flow loss of a tiny DiT (t_max=1), the forward in bf16 autocast as
    train.py runs it: finite float32 losses that fall and (once the zero-initialised layers have
    moved) a gradient reaching the timestep embedding."""
    torch.manual_seed(0)
    model = DiT(**TINY, mp=mp, t_max=1)
    flow, opt = LinearFlow("logit-normal"), torch.optim.Adam(model.parameters(), lr=1e-2)
    draw = lambda fn, *size: fn(*size, generator=torch.Generator().manual_seed(1))
    x, y, noise = torch.randn(8, 4, 8, 8), torch.arange(8), torch.randn(8, 4, 8, 8)
    t, losses = flow.sample_t(draw, 8), []
    for _ in range(3):
        with torch.autocast("cpu", torch.bfloat16):
            loss = flow.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.t_embedder.mlp[0].weight.grad.abs().sum() > 0
    assert losses[2] < losses[0]
