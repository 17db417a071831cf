"""Tests of guidance.py: the guidance interval, autoguidance, DiT's 3-channel guidance and float32
guidance arithmetic, on a tiny random DiT and on the Gaussian-data oracle of test_sample.py."""
import numpy as np
import pytest
import torch

import sampling
from diffusion import create_diffusion
from guidance import EVERY_STEP, Guided, ddpm_sigmas
from models import DiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
N = 3
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # in diffusers
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiT(**TINY)
    for p in m.parameters():
        p.data.normal_(std=0.2)
    return m.eval()


def run(sampler_name, steps, fn, z, y):
    return sampling.denoise(fn, sampling.make_sampler(sampler_name, steps), z, y)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, 8, 8, generator=g), torch.tensor([1, 5, 9])


class Recorder:
    """Wraps a model: records (batch size, timesteps, first N rows of x) per call."""

    def __init__(self, model):
        self.model, self.num_classes, self.log = model, model.num_classes, []

    def __call__(self, x, t, y):
        self.log.append((len(x), t[0].item(), x[:N].clone()))
        return self.model(x, t, y)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_interval_0_inf_is_plain_cfg_and_an_empty_one_the_conditional_model(model, name, monkeypatch):
    """Plain CFG is DiT's path (its published forward_with_cfg, guiding all 4 channels, on [cond; uncond]
    batches of 2N); DDPM's step noise is set to zero so that batches of N and 2N sample alike."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    z, y = inputs()
    sampler = sampling.make_sampler(name, 6)
    with torch.no_grad():
        dit = sampler(lambda x, t, y: dit_forward_with_cfg(model, x, t, y, 4.0, channels=4), torch.cat([z, z]),
                      dict(y=torch.cat([y, torch.full_like(y, 10)])), False)[:N]
        conditional = sampler(model, z, dict(y=y), False)
    full, empty = Recorder(model), Recorder(model)
    torch.testing.assert_close(run(name, 6, Guided(full, 4.0, interval=EVERY_STEP), z, y), dit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(name, 6, Guided(empty, 4.0, interval=(5.0, 5.0)), z, y), conditional,
                               rtol=1e-5, atol=1e-5)
    assert [b for b, *_ in full.log] == [2 * N] * 6 and [b for b, *_ in empty.log] == [N] * 6
    assert not torch.allclose(dit, conditional, atol=1e-2)  # guidance does change the samples


def test_half_interval_changes_only_the_steps_inside(model):
    """DDIM-10 calls the model at t = 900, 800, ..., 0. Guided above the noise level of t = 450
    (t = 900 .. 500), the model sees the same x_t as under plain CFG up to and including t = 400 and
    other ones after; guided at or below it (t = 400 .. 0), the same x_t as the conditional model up
    to t = 400."""
    z, y = inputs(1)
    logs, middle = {}, ddpm_sigmas()[450].item()
    for key, scale, interval in (("cfg", 4.0, EVERY_STEP), ("cond", 1.0, EVERY_STEP),
                                 ("high", 4.0, (middle, float("inf"))), ("low", 4.0, (0, middle))):
        rec = Recorder(model)
        run("ddim", 10, Guided(rec, scale, interval=interval), z, y)
        logs[key] = rec.log
    assert [t for _, t, _ in logs["high"]] == list(range(900, -1, -100))
    assert [b for b, *_ in logs["high"]] == [2 * N] * 5 + [N] * 5
    assert [b for b, *_ in logs["low"]] == [N] * 5 + [2 * N] * 5
    same = lambda a, b: [torch.equal(x, x_ref) for (_, _, x), (_, _, x_ref) in zip(logs[a], logs[b])]
    assert same("high", "cfg") == [True] * 6 + [False] * 4
    assert same("low", "cond") == [True] * 6 + [False] * 4


@pytest.mark.parametrize("name, guided_t", [("ddpm", {333, 444}), ("ddim", {300, 400, 500}),
                                            ("dpm++", {300, 400, 500})])
def test_interval_reads_the_original_timestep(model, name, guided_t):
    """10 steps: DDPM keeps t = 0, 111, ..., 999, DDIM t = 0, 100, ..., 900, DPM-Solver++ t = 999, 899,
    ..., 500, 400, ..., 100. (sigma_299, sigma_500] guides the steps whose original t lies in [300, 500],
    not those whose step index does (that would be 3 steps for DDPM)."""
    rec = Recorder(model)
    sigmas = ddpm_sigmas()
    run(name, 10, Guided(rec, 2.0, interval=(sigmas[299].item(), sigmas[500].item())), *inputs())
    assert {t for b, t, _ in rec.log if b == 2 * N} == guided_t
    assert len(rec.log) == 10 and all(b == N for b, t, _ in rec.log if t not in guided_t)


@pytest.mark.parametrize("scale", [1.5, 4.0])
def test_autoguidance_by_the_model_itself_is_the_conditional_model(model, scale):
    z, y = inputs(2)
    main, guide = Recorder(model), Recorder(model)
    got = run("ddim", 5, Guided(main, scale, guide=guide), z, y)
    torch.testing.assert_close(got, run("ddim", 5, Guided(model, 1.0), z, y), rtol=0, atol=1e-6)
    assert [b for b, *_ in main.log] == [N] * 5 and [b for b, *_ in guide.log] == [N] * 5  # same labels, no null


ABAR = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))


class GaussianOracle:
    """The exact model for data x0 ~ N(0, s^2 I) predicting eps, v or x0 (4 channels, NaN variance):
    D(x_t) = E[x0 | x_t] = sqrt(abar) s^2 / (abar s^2 + 1 - abar) x_t; calls counted per batch size."""

    num_classes = 10

    def __init__(self, s, prediction):
        self.s, self.prediction, self.batches = s, prediction, []

    def denoised(self, x, t):
        a = ABAR[t].view(-1, 1, 1, 1)
        return a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a) * x

    def __call__(self, x, t, y):
        self.batches.append(len(x))
        a, d = ABAR[t].view(-1, 1, 1, 1), self.denoised(x, t)
        eps = (x - a.sqrt() * d) / (1 - a).sqrt()
        out = {"eps": eps, "x0": d, "v": a.sqrt() * eps - (1 - a).sqrt() * d}[self.prediction]
        return torch.cat([out, torch.full_like(x, float("nan"))], dim=1)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_autoguidance_is_the_formula_on_the_denoised_output(prediction):
    """D = D_guide + w (D_main - D_guide) in closed form for two Gaussian oracles (data std 0.5 and
    0.8), read back from the guided eps / v / x0 output by the diffusion's own conversion: combining
    in prediction space is the formula on D. Rows of a batch at t = 100, 500, 900: only the row inside
    the interval (1, 10] of noise levels (t = 500, sigma 4.2) is guided, and only that row is given to
    the guide."""
    main, guide = GaussianOracle(0.5, prediction), GaussianOracle(0.8, prediction)
    x, t = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([100, 500, 900])
    out = Guided(main, 2.5, guide=guide, interval=(1.0, 10.0))(x, t, torch.zeros(3, dtype=torch.long))
    diffusion = create_diffusion("", prediction=prediction)
    denoised = diffusion._predict_xstart(x, t, out[:, :4].double())
    want = main.denoised(x, t)
    want[1] = guide.denoised(x, t)[1] + 2.5 * (main.denoised(x, t)[1] - guide.denoised(x, t)[1])
    torch.testing.assert_close(denoised, want, rtol=1e-5, atol=1e-5)
    assert main.batches == [3] and guide.batches == [1]
    assert not torch.allclose(want[1], main.denoised(x, t)[1], atol=1e-3)


def dit_forward_with_cfg(model, x, t, y, cfg_scale, channels=3):
    """facebookresearch/DiT models.py forward_with_cfg, as published (3 guided channels; `channels`
    generalises its 3)."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model.forward(combined, t, y)
    eps, rest = model_out[:, :channels], model_out[:, channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def test_cfg_channels_3_is_dits_guidance_channel_by_channel(model):
    x, y = inputs(3)
    t = torch.full((N,), 600)
    null = torch.full_like(y, 10)
    with torch.no_grad():
        dit = dit_forward_with_cfg(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.5)[:N]
        ours = Guided(model, 1.5, channels=3)(x, t, y)
        all_channels = Guided(model, 1.5)(x, t, y)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    assert ours.shape == dit.shape == (N, 8, 8, 8)
    for c in range(8):
        torch.testing.assert_close(ours[:, c], dit[:, c], rtol=1e-5, atol=1e-5, msg=f"channel {c}")
    torch.testing.assert_close(ours[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)  # 4th eps channel and variance
    torch.testing.assert_close(all_channels[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_channels[:, :3], ours[:, :3])
    assert not torch.allclose(all_channels[:, 3], ours[:, 3], atol=1e-3)


def test_guidance_arithmetic_is_float32_under_bf16_autocast(model):
    """With the forward in bf16 autocast, the guided output is float32 and equals the float32
    combination of the bf16 outputs exactly; bf16 arithmetic (the scale amplifies its rounding)
    would differ. Also for denoise(bf16=True)."""
    outputs = []
    handle = model.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    x, y = inputs(4)
    t, scale = torch.full((N,), 300), 4.0
    try:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            guided = Guided(model, scale)(x, t, y)
        assert outputs[0].dtype == torch.bfloat16  # the model did run in bf16
        cond, uncond = outputs[0][:N, :4], outputs[0][N:, :4]
        want = uncond.float() + scale * (cond.float() - uncond.float())
        assert guided.dtype == torch.float32 and torch.equal(guided[:, :4], want)
        assert not torch.equal((uncond + scale * (cond - uncond)).float(), want)
        outputs.clear()
        sampled = sampling.denoise(Guided(model, scale), sampling.make_sampler("ddim", 2), x, y, bf16=True)
        assert sampled.dtype == torch.float32 and {o.dtype for o in outputs} == {torch.bfloat16}
    finally:
        handle.remove()



def test_the_interval_is_in_noise_levels_as_the_papers_state_it():
    """guided_at(t) is lo < sigma_t <= hi with sigma_t = sqrt((1 - abar_t) / abar_t), abar from DiT's
    betas written out here (linspace(1e-4, 0.02, 1000)): EDM2's (0.28, 5.42] guides t/T in about
    [0.08, 0.58] of this schedule, and REPA's "t <= 0.7" (sigma <= 0.7 / 0.3 = 2.33) t/T up to about
    0.43, not 0.7 (REFERENCE section 9)."""
    sigma = np.sqrt((1 - ABAR.numpy()) / ABAR.numpy())
    t = torch.arange(1000)
    for lo, hi in ((0.28, 5.42), (0.0, 0.7 / 0.3), (3.0, 3.0)):
        got = Guided(None, 2.0, interval=(lo, hi)).guided_at(t).numpy()
        np.testing.assert_array_equal(got, (sigma > lo) & (sigma <= hi))
    edm2 = np.flatnonzero(Guided(None, 2.0, interval=(0.28, 5.42)).guided_at(t).numpy())
    assert abs(edm2[0] / 1000 - 0.08) < 0.005 and abs((edm2[-1] + 1) / 1000 - 0.58) < 0.005
    repa = np.flatnonzero(Guided(None, 2.0, interval=(0.0, 0.7 / 0.3)).guided_at(t).numpy())
    assert repa[0] == 0 and abs((repa[-1] + 1) / 1000 - 0.43) < 0.005
    assert Guided(None, 2.0).guided_at(t).all() and not Guided(None, 1.0).guided_at(t).any()
