"""Tests of sample.py, offline: tiny runs trained in-process (8x8 pixels; 4x4x4 latents), a tiny
random AutoencoderKL (downsampling 8) for the SD VAE, and a synthetic state dict with the official
DiT key names."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import sample
import sampling
import train
from data import ShardWriter
from download import dit_keys
from ema import posthoc_coefficients
from guidance import Guided
from models import DiT_models

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # in diffusers
              pytest.mark.usefixtures("one_thread")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "DiT-XS/4", "--global-batch-size", "8", "--num-workers", "0", "--log-every", "3",
        "--monitor-every", "100", "--sample-steps", "2"]


def train_run(data, results, *extra):
    return train.main(train.parse_args(["--data-path", data, "--results-dir", str(results), *TINY, *extra]))


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """MaP run (v-prediction) on 8x8x3 pixels, 4 classes: checkpoints at steps 3 and 6, power-EMA
    snapshots every step."""
    root = tmp_path_factory.mktemp("pixel")
    writer = ShardWriter(root / "data", "pixel", (3, 8, 8), 4)
    rng = np.random.default_rng(0)
    writer.write_shard(0, np.arange(32) % 4, images=rng.integers(0, 256, (32, 3, 8, 8), dtype=np.uint8))
    writer.finish()
    return train_run(str(root / "data"), root / "results", "--mp", "--depth", "2", "--hidden-size", "64",
                     "--num-heads", "2", "--num-steps", "6", "--ckpt-every", "3", "--snapshot-every", "1",
                     "--prediction", "v")


@pytest.fixture(scope="module")
def vae_dir(tiny_vae):
    """A tiny AutoencoderKL with the SD VAE's downsampling 8 and 4 latent channels, random weights."""
    return tiny_vae(levels=4, channels=(8,) * 4, layers_per_block=1)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """Vanilla run on 4x4x4 latents that name the SD VAE in their manifest, 2 classes, 2 steps."""
    root = tmp_path_factory.mktemp("latent")
    writer = ShardWriter(root / "data", "latent", (4, 4, 4), 2)
    rng = np.random.default_rng(0)
    writer.write_shard(0, np.arange(16) % 2, mean=rng.normal(size=(16, 4, 4, 4)).astype(np.float16),
                       std=np.full((16, 4, 4, 4), 0.1, np.float16))
    writer.finish(vae="stabilityai/sd-vae-ft-ema")
    return train_run(str(root / "data"), root / "results", "--depth", "1", "--hidden-size", "32",
                     "--num-heads", "2", "--num-steps", "2", "--ckpt-every", "2", "--sample-every", "0")


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    """A plain state dict of vanilla DiT-XS/8 for 64 px (8x8 latents, one token), random values."""
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in DiT_models["DiT-XS/8"](input_size=8).state_dict().items()}
    path = str(tmp_path_factory.mktemp("official") / "DiT-XS-8-64x64.pt")
    torch.save(state, path)
    return path


def run_cli(argv, capsys):
    code = sample.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_grid_png_size_determinism_and_samplers(pixel_run, tmp_path, capsys):
    grid = ["--result-dir", pixel_run, "--class-label", 0, 3, "--num-samples", 3, "--batch-size", 4]
    ddpm = [*grid, "--sampler", "ddpm", "--num-sampling-steps", 50]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run_cli([*ddpm, "--seed", seed, "--out", tmp_path / f"{name}.png"], capsys)[0] == 0
    a, b, c = ((tmp_path / f"{name}.png").read_bytes() for name in "abc")
    assert a == b and a != c
    assert Image.open(tmp_path / "a.png").size == (3 * 16, 2 * 16)  # (width, height): 3 columns, 2 rows, at 2x
    code, out, _ = run_cli([*grid, "--sampler", "ddim", "--num-sampling-steps", 25], capsys)
    default = os.path.join(pixel_run, "samples", "0000006-ema-0.1-ddim25-cfg4-seed0.png")
    assert code == 0 and f"wrote {default}" in out and "power EMA sigma_rel=0.1 (tracked)" in out
    assert Image.open(default).size == (48, 32)


def test_compile_captures_the_guided_model_in_one_graph_and_changes_no_pixel(pixel_run, tmp_path, capsys,
                                                                           monkeypatch):
    """sample.py --compile asks for fullgraph=True, so a graph break in the model would raise. The eager
    backend runs what dynamo captured without inductor's C++ compile (about 30 s here; inductor gave
    the same PNG too)."""
    real_compile, calls = torch.compile, []

    def eager_compile(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, backend="eager", **kwargs)
    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    grid = ["--result-dir", pixel_run, "--class-label", 1, "--num-samples", 2, "--sampler", "ddim",
            "--num-sampling-steps", 4]
    assert run_cli([*grid, "--out", tmp_path / "eager.png"], capsys)[0] == 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert calls == []
    assert run_cli([*grid, "--compile", "--out", tmp_path / "compiled.png"], capsys)[0] == 0
    assert calls == [dict(fullgraph=True)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # dynamo traced the forward
    assert (tmp_path / "eager.png").read_bytes() == (tmp_path / "compiled.png").read_bytes()
    guided = [*grid, "--guide", os.path.join(pixel_run, "checkpoints", "0000003.pt"), "--guidance-interval", 1, 10]
    assert run_cli([*guided, "--out", tmp_path / "guided.png"], capsys)[0] == 0
    calls.clear()
    assert run_cli([*guided, "--compile", "--out", tmp_path / "guided-compiled.png"], capsys)[0] == 0
    assert calls == [dict(fullgraph=True)] * 2  # the model and the guide
    assert (tmp_path / "guided.png").read_bytes() == (tmp_path / "guided-compiled.png").read_bytes()
    assert (tmp_path / "guided.png").read_bytes() != (tmp_path / "eager.png").read_bytes()
    torch._dynamo.reset()


def test_cfg_scale_one_runs_the_conditional_model_alone(pixel_run):
    model, *_, prediction = sample.load_model(sample.parse_args(["--result-dir", pixel_run, "--class-label", "0"]))
    assert prediction == "v"  # read from the run's arguments
    model.eval()
    batches = []
    model.x_embedder.register_forward_pre_hook(lambda module, inputs: batches.append(len(inputs[0])))
    sampler = sampling.make_sampler("ddim", 5)
    z, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3])
    plain = sampling.denoise(Guided(model, 1.0), sampler, z, y)
    assert set(batches) == {3}  # no doubled batch
    with torch.no_grad():
        conditional = sampler(model, z, dict(y=y), False)
    torch.testing.assert_close(plain, conditional, rtol=1e-5, atol=1e-5)
    batches.clear()
    sampling.denoise(Guided(model, 4.0), sampler, z, y)
    assert set(batches) == {6}


S = 0.5
ABAR = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), dtype=torch.float32)


def test_dpm_solver_matches_the_gaussian_oracle():
    """x0 ~ N(0, S^2 I): eps*(x_t, t) = x_t sqrt(1 - abar_t) / (abar_t S^2 + 1 - abar_t). With this exact
    eps and standardised x_T, only the solver's discretisation error shows: measured -2.43% in std at
    25 steps, -0.04% at 50. The learned-sigma channels are NaN: they must not be used."""
    seen = []

    def oracle(x, t):
        seen.append(t)
        a = ABAR[t].view(-1, 1, 1, 1)
        return torch.cat([x * (1 - a).sqrt() / (a * S**2 + 1 - a), torch.full_like(x, float("nan"))], dim=1)

    torch.manual_seed(0)
    z = torch.randn(4096, 1, 2, 2)
    z = (z - z.mean()) / z.std()
    errors = {}
    for steps in (25, 50):
        seen.clear()
        x = sampling.make_sampler("dpm++", steps)(oracle, z, {}, False)
        errors[steps] = x.std().item() / S - 1
        assert len(seen) == steps and seen[0].dtype == torch.long and seen[0][0] == 999
    assert abs(errors[50]) < 0.01 and abs(errors[25]) < 0.03 and abs(errors[50]) < abs(errors[25]), errors


def gaussian_eps_oracle(x, t):
    """The optimal eps for x0 ~ N(0, S^2 I), with zero learned-sigma channels."""
    a = ABAR[t].view(-1, 1, 1, 1)
    return torch.cat([x * (1 - a).sqrt() / (a * S**2 + 1 - a), torch.zeros_like(x)], dim=1)


def test_dpm_solver_at_every_training_timestep_stays_finite():
    """At 1000 steps diffusers' linspace spacing rounds timesteps 499.5 and 500.5 both to 500: a step
    of length 0 and NaN samples (999 steps were fine). The 1000 steps must be 999 .. 0, once each,
    and sample the oracle's data as finely as 50 steps do (within 1% in std)."""
    assert sampling.dpm_timesteps(1000) == list(range(999, -1, -1))
    assert sampling.dpm_timesteps(25)[:3] == [999, 959, 919] and len(set(sampling.dpm_timesteps(999))) == 999
    z = torch.randn(1024, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = sampling.make_sampler("dpm++", 1000)(gaussian_eps_oracle, (z - z.mean()) / z.std(), {}, False)
    assert torch.isfinite(x).all() and abs(x.std().item() / S - 1) < 0.01


@pytest.mark.parametrize("name", sampling.SAMPLERS["ddpm"])  # the flow samplers: test_flow.py
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_every_sampler_at_few_steps_works_or_refuses(name, steps):
    """ddpm and ddim need two timesteps (one step would keep t = 0 alone, or no stride fits); the
    rest sample: finite output of the input's shape."""
    z = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    if steps == 1 and name != "dpm++":
        with pytest.raises(train.UsageError, match=f"--num-sampling-steps 1: .*{'at least 2' if name == 'ddpm' else ''}"):
            sampling.make_sampler(name, steps)
        return
    x = sampling.make_sampler(name, steps)(gaussian_eps_oracle, z, {}, False)
    assert x.shape == z.shape and torch.isfinite(x).all()


def test_non_finite_samples_are_refused_not_saved(pixel_run, tmp_path, capsys, monkeypatch):
    """NaN samples would be written as black images with exit code 0: one line and exit 2 instead."""
    monkeypatch.setattr(sampling, "denoise", lambda model, sampler, z, *rest, **kw: torch.full_like(z, float("nan")))
    out = tmp_path / "nan.png"
    code, _, err = run_cli(["--result-dir", pixel_run, "--class-label", 0, "--num-samples", 2, "--out", out], capsys)
    assert code == 2 and "non-finite" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    code, _, err = run_cli(["--result-dir", pixel_run, "--fid", 4, "--batch-size", 2, "--out", tmp_path / "nan.npz"],
                           capsys)
    assert code == 2 and "non-finite" in err and not (tmp_path / "nan.npz").exists()
    assert not os.listdir(tmp_path / "nan-chunks") or os.listdir(tmp_path / "nan-chunks") == ["settings.json"]


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_every_sampler_reads_the_models_prediction_type(prediction):
    """The Gaussian oracle written as a v or x0 predictor (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar),
    v = sqrt(abar) eps - sqrt(1 - abar) x0) samples the same as its eps form with every sampler of
    sample.py; a sampler that took the output for eps would give far different samples."""
    def eps_oracle(x, t):
        a = ABAR[t].view(-1, 1, 1, 1)
        return torch.cat([x * (1 - a).sqrt() / (a * S**2 + 1 - a), torch.zeros_like(x)], dim=1)

    def oracle(x, t):
        eps, var = eps_oracle(x, t).chunk(2, dim=1)
        a = ABAR[t].view(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return torch.cat([x0 if prediction == "x0" else a.sqrt() * eps - (1 - a).sqrt() * x0, var], dim=1)

    z = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for name, steps in (("dpm++", 10), ("ddim", 10), ("ddpm", 10)):
        torch.manual_seed(1)
        want = sampling.make_sampler(name, steps)(eps_oracle, z, {}, False)
        torch.manual_seed(1)
        got = sampling.make_sampler(name, steps, prediction)(oracle, z, {}, False)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=name)


def test_posthoc_at_the_last_snapshot_returns_the_tracked_ema(pixel_run):
    steps = [s for s in range(1, 7) for _ in (0, 1)]
    weights = posthoc_coefficients(steps, [0.05, 0.1] * 6, 6, 0.05)
    np.testing.assert_allclose(weights, np.eye(12)[10], atol=1e-6)
    path = os.path.join(pixel_run, "checkpoints", "0000006.pt")
    model, *_ = sample.load_model(sample.parse_args(["--ckpt", path, "--class-label", "0"]))
    state, _ = sample.posthoc_ema(load(path), path, 0.05, model)
    for name, tensor in load(path)["ema_power"]["0.05"].items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6)


def test_posthoc_least_squares_weights_sum_to_about_one():
    steps = list(range(10, 101, 10)) * 2
    for sigma_rel in (0.07, 0.15):
        assert posthoc_coefficients(steps, [0.05] * 10 + [0.1] * 10, 100, sigma_rel).sum() == pytest.approx(1, abs=5e-3)


def test_posthoc_reconstruction_lies_between_the_tracked_emas(pixel_run):
    """Both tracked EMAs average the same trajectory; an in-between width should give an average on
    the segment between them, nearer the one of nearer width: position t in (0, 1) along it, rising
    with sigma_rel, and little off the segment."""
    path = os.path.join(pixel_run, "checkpoints", "0000006.pt")
    ckpt = load(path)
    model, _, note, *_ = sample.load_model(sample.parse_args(["--ckpt", path, "--class-label", "0",
                                                             "--weights", "ema-0.07"]))
    assert "from 6 snapshot(s) of steps 1..6" in note and "\n" not in note  # one line, however many snapshots
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    flat = lambda state: torch.cat([state[n].double().flatten() for n in names])
    a, b = flat(ckpt["ema_power"]["0.05"]), flat(ckpt["ema_power"]["0.1"])
    positions = []
    for sigma_rel in (0.06, 0.08):
        w = flat(sample.posthoc_ema(ckpt, path, sigma_rel, model)[0])
        t = ((w - a) @ (b - a) / (b - a).norm() ** 2).item()
        assert 0 < t < 1 and (w - a - t * (b - a)).norm() < 0.2 * (b - a).norm()
        positions.append(t)
    assert positions[0] < positions[1]
    earlier = os.path.join(pixel_run, "checkpoints", "0000003.pt")
    _, _, note, *_ = sample.load_model(sample.parse_args(["--ckpt", earlier, "--class-label", "0",
                                                         "--weights", "ema-0.07"]))
    assert "at step 3 from 3 snapshot(s)" in note  # snapshots after the checkpoint are left out


def test_fid_npz_resumes_and_splits_over_ranks(pixel_run, tmp_path, capsys, monkeypatch):
    fid = ["--result-dir", pixel_run, "--fid", 10, "--batch-size", 4, "--sampler", "ddim", "--num-sampling-steps", 5]
    assert run_cli([*fid, "--out", tmp_path / "straight.npz"], capsys)[0] == 0
    straight = np.load(tmp_path / "straight.npz")["arr_0"]
    assert straight.shape == (10, 8, 8, 3) and straight.dtype == np.uint8
    labels = np.concatenate([np.load(tmp_path / "straight-chunks" / f"{k:06d}.npz")["labels"] for k in range(3)])
    assert labels.min() >= 0 and labels.max() < 4 and len(set(labels)) > 1

    real_save, saved = data.ChunkFolder.save, []

    def interrupt_after_one(self, k, **arrays):
        real_save(self, k, **arrays)
        saved.append(k)
        raise KeyboardInterrupt
    monkeypatch.setattr(data.ChunkFolder, "save", interrupt_after_one)
    code, _, err = run_cli([*fid, "--out", tmp_path / "resumed.npz"], capsys)
    assert code == 130 and "interrupted; run the same command again" in err
    monkeypatch.setattr(data.ChunkFolder, "save", real_save)
    assert len(saved) == 1 and not os.path.exists(tmp_path / "resumed.npz")
    assert run_cli([*fid, "--out", tmp_path / "resumed.npz"], capsys)[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npz")["arr_0"], straight)

    code, _, err = run_cli([*fid, "--out", tmp_path / "resumed.npz", "--seed", 1], capsys)
    assert code == 2 and "other seed" in err

    for module in (sample, data):  # ranks run one after the other
        monkeypatch.setattr(module, "barrier", lambda: None)
    monkeypatch.setattr(sample.dist, "destroy_process_group", lambda: None)
    for rank in (1, 0):
        monkeypatch.setattr(sample, "setup_distributed", lambda: (rank, 2, torch.device("cpu")))
        for module in (sample, data, cli):  # cli.my_chunks picks this rank's chunks
            monkeypatch.setattr(module, "rank_world", lambda: (rank, 2))
        assert run_cli([*fid, "--out", tmp_path / "ranks.npz"], capsys)[0] == 0
        assert os.path.exists(tmp_path / "ranks.npz") == (rank == 0)  # rank 0 merges
        if rank == 1:
            assert sorted(os.listdir(tmp_path / "ranks-chunks")) == ["000001.npz", "settings.json"]
    np.testing.assert_array_equal(np.load(tmp_path / "ranks.npz")["arr_0"], straight)


def test_latent_run_is_decoded_by_the_vae(latent_run, vae_dir, tmp_path, capsys):
    out = tmp_path / "latent.png"
    code, _, err = run_cli(["--result-dir", latent_run, "--vae-path", vae_dir, "--class-label", 1, 0,
                            "--num-samples", 2, "--sampler", "ddim", "--num-sampling-steps", 2, "--out", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (2 * 64, 2 * 64)  # 4x4 latents decode to 32x32 images, shown at 2x


def test_official_state_dict_loads_into_vanilla_dit(official_ckpt, vae_dir, tmp_path, capsys):
    state = load(official_ckpt)
    assert set(state) == {k for k in dit_keys() if not k.startswith("blocks.") or int(k.split(".")[1]) < 6}
    official = ["--ckpt", official_ckpt, "--model", "DiT-XS/8", "--image-size", 64]
    args = sample.parse_args([str(a) for a in official] + ["--class-label", "0"])
    model, manifest, _, _, prediction = sample.load_model(args)
    assert model.num_classes == 1000 and manifest["shape"] == [4, 8, 8] and prediction == "eps"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name])
    out = tmp_path / "official.png"
    code, _, err = run_cli([*official, "--vae-path", vae_dir, "--class-label", 207, "--num-samples", 2,
                            "--sampler", "dpm++", "--num-sampling-steps", 3, "--out", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (2 * 64, 64)

    decoded = []
    stub = types.SimpleNamespace(decode=lambda z: decoded.append(z) or types.SimpleNamespace(
        sample=torch.zeros(len(z), 3, 64, 64)))
    x = torch.randn(2, 4, 8, 8)
    images = data.decode(x, manifest, stub)
    torch.testing.assert_close(decoded[0], x / 0.18215)  # DiT's latent scale
    assert images.shape == (2, 64, 64, 3) and (images == 128).all()  # 0 in [-1, 1] is grey

    for argv, needle in ([*official, "--model", "DiT-S/8"], "holds DiT-XS/8 for 8x8x4 inputs, 1000 classes"), \
                        ([*official, "--image-size", 128], "does not fit DiT-XS/8 at --image-size 128"), \
                        ([*official, "--weights", "ema"], "plain state dict"):
        code, _, err = run_cli([*argv, "--class-label", 0, "--vae-path", vae_dir], capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_bad_inputs_give_one_line_and_exit_code_2(pixel_run, tmp_path, capsys):
    ckpt = load(os.path.join(pixel_run, "checkpoints", "0000006.pt"))
    torch.save({**ckpt, "ema_power": {}}, tmp_path / "untracked.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    os.makedirs(tmp_path / "empty_run")
    run = ["--result-dir", pixel_run]
    cases = [
        ([*run, "--class-label", 4], "--class-label 4: outside [0, 4)"),
        ([*run, "--class-label", -1], "outside [0, 4)"),
        (["--result-dir", tmp_path / "empty_run", "--class-label", 0], "no checkpoints"),
        ([*run, "--class-label", 0, "--weights", "ema-x"], "ema-<sigma_rel>"),
        ([*run, "--class-label", 0, "--weights", "ema-0.9"], "sigma_rel 0.9"),
        (["--ckpt", tmp_path / "untracked.pt", "--class-label", 0, "--weights", "ema-0.07"], "no power-EMA snapshots"),
        (run, "--class-label"),
        ([*run, "--class-label", 0, "--fid", 4], "one of them"),
        (["--class-label", 0], "--result-dir"),
        ([*run, "--class-label", 0, "--num-sampling-steps", 0], "at least 1"),
        ([*run, "--class-label", 0, "--num-sampling-steps", 2000], "at most"),
        ([*run, "--class-label", 0, "--num-sampling-steps", 1], "at least 2"),
        ([*run, "--class-label", 0, "--num-sampling-steps", 1, "--sampler", "ddim"], "--num-sampling-steps 1"),
        ([*run, "--class-label", 0, "--cfg-scale", "nan"], "--cfg-scale nan"),
        ([*run, "--class-label", 0, "--cfg-scale", "inf"], "finite"),
        ([*run, "--class-label", 0, "--sampler", "euler"], "this is a ddpm model; choose one of ddpm, ddim, dpm++"),
        ([*run, "--class-label", 0, "--sampler", "heunn"], "invalid choice"),
        ([*run, "--class-label", "dog"], "invalid int"),
        (["--ckpt", tmp_path / "missing.pt", "--class-label", 0], "no such file"),
        (["--ckpt", tmp_path / "corrupt.pt", "--class-label", 0], "cannot read checkpoint"),
        ([*run, "--class-label", 0, "--vae-path", tmp_path / "nope"], "not a directory"),
        ([*run, "--class-label", 0, "--seed", -1], "--seed -1: must be in [0, 2**32)"),
        ([*run, "--class-label", 0, "--seed", 2 ** 32], "--seed 4294967296"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)
    assert not os.path.exists(os.path.join(pixel_run, "samples", "0000006-ema-0.1-ddpm250-cfg4-seed0.png"))


def test_missing_vae_offline_in_a_real_process(latent_run, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "sample.py", "--result-dir", latent_run, "--class-label", "0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--vae-path" in result.stderr


def test_posthoc_ema_refuses_a_non_finite_snapshot(pixel_run, tmp_path, capsys):
    """Issue 12 item 3: a NaN in a snapshot is named in one line, never averaged into black images."""
    run = shutil.copytree(pixel_run, tmp_path / "run")
    snapshot = os.path.join(run, "checkpoints", "ema-snapshot-0000002.pt")
    state = load(snapshot)
    name = next(n for n in state["ema_power"]["0.05"] if n.startswith("blocks.0.") and n.endswith("weight"))
    state["ema_power"]["0.05"][name] = torch.full_like(state["ema_power"]["0.05"][name], float("nan"))
    torch.save(state, snapshot)
    out = tmp_path / "grid.png"
    code, _, err = run_cli(["--result-dir", run, "--class-label", 0, "--num-samples", 1, "--weights", "ema-0.07",
                            "--sampler", "ddim", "--num-sampling-steps", 2, "--out", out], capsys)
    assert code == 2 and snapshot in err and "NaN or inf" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_unusable_out_and_corrupt_chunks_are_one_line(pixel_run, tmp_path, capsys, monkeypatch):
    """Issue 12 item 8: --out that is a directory or cannot be created is refused before any sampling;
    a corrupt chunk file is named, with how to regenerate it."""
    calls, real_denoise = [], sampling.denoise
    monkeypatch.setattr(sampling, "denoise", lambda *a, **k: calls.append(1) or real_denoise(*a, **k))
    (tmp_path / "file").write_text("x")
    grid = ["--result-dir", pixel_run, "--class-label", 0, "--num-samples", 1, "--sampler", "ddim",
            "--num-sampling-steps", 2]
    for out, needle in ((tmp_path, "is a directory"), (tmp_path / "file" / "grid.png", "cannot write")):
        code, _, err = run_cli([*grid, "--out", out], capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert calls == []  # refused before sampling
    fid = ["--result-dir", pixel_run, "--fid", 8, "--batch-size", 4, "--sampler", "ddim", "--num-sampling-steps", 2,
           "--out", tmp_path / "fid.npz"]
    assert run_cli(fid, capsys)[0] == 0
    chunk = tmp_path / "fid-chunks" / "000001.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    os.remove(tmp_path / "fid.npz")
    code, _, err = run_cli(fid, capsys)
    lines = [line for line in err.splitlines() if "sample.py:" in line]  # after the progress bar
    assert code == 2 and len(lines) == 1 and f"{chunk}: corrupt chunk file" in lines[0], err


def test_the_fid_npz_is_written_atomically(pixel_run, tmp_path):
    """Issue 12 item 8: in a process whose files may not grow past 6 kB (the chunks are about 2 kB, the
    .npz 12 kB), as on a full disk, the merge fails in one line and leaves no .npz; the chunks are kept
    and the rerun writes the whole file."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
    out = tmp_path / "fid.npz"
    argv = [sys.executable, "sample.py", "--result-dir", pixel_run, "--fid", "64", "--batch-size", "8",
            "--sampler", "ddim", "--num-sampling-steps", "2", "--out", str(out)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    err = [line for line in result.stderr.splitlines() if "sample.py:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(err) == 1 and "cannot write" in err[0] and "chunks" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["fid-chunks"] and len(os.listdir(tmp_path / "fid-chunks")) == 9
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.load(out)["arr_0"].shape == (64, 8, 8, 3)


@pytest.mark.parametrize("what, limit", [("grid", 200), ("fid", 1000)])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(pixel_run, tmp_path, what, limit):
    """Issue 21: a grid on a full disk ended in an OSError traceback, and a chunk of --fid left its
    000000.tmp.npz behind. Files may not grow past `limit` bytes here (the grid PNG is about 600 bytes, a
    chunk about 2 kB), as on a full disk: one line, exit 2, no file but the chunk folder's settings."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    out = tmp_path / ("grid.png" if what == "grid" else "fid.npz")
    argv = [sys.executable, "sample.py", "--result-dir", pixel_run, "--sampler", "ddim", "--num-sampling-steps", "2",
            "--out", str(out), *(["--class-label", "0", "1"] if what == "grid" else ["--fid", "8", "--batch-size", "4"])]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    err = [line for line in result.stderr.splitlines() if "sample.py:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(err) == 1, result.stderr[-2000:]
    left = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path) for f in files)
    assert left == ([] if what == "grid" else ["fid-chunks/settings.json"]), left


def test_fid_resumes_over_options_that_do_not_change_the_samples(pixel_run, tmp_path, capsys, monkeypatch):
    """Issue 21: a resume was refused over --no-progress and --num-samples (grid columns, unused by --fid)."""
    fid = ["--result-dir", pixel_run, "--fid", 8, "--batch-size", 4, "--sampler", "ddim", "--num-sampling-steps", 2,
           "--out", tmp_path / "fid.npz"]
    real_save = data.ChunkFolder.save

    def interrupt_after_one(self, k, **arrays):
        real_save(self, k, **arrays)
        raise KeyboardInterrupt
    monkeypatch.setattr(data.ChunkFolder, "save", interrupt_after_one)
    assert run_cli(fid, capsys)[0] == 130
    monkeypatch.setattr(data.ChunkFolder, "save", real_save)
    code, _, err = run_cli([*fid, "--no-progress", "--num-samples", 3], capsys)
    assert code == 0 and np.load(tmp_path / "fid.npz")["arr_0"].shape == (8, 8, 8, 3), err


def test_guide_interval_and_channels_on_the_cli(pixel_run, latent_run, tmp_path, capsys):
    """Autoguidance by the run's own step-3 checkpoint (its classic EMA), with an interval, to a grid
    and to an .npz; guides of other data or another prediction type, bad intervals and channel
    counts: one line, exit code 2, nothing written."""
    early = os.path.join(pixel_run, "checkpoints", "0000003.pt")
    grid = ["--result-dir", pixel_run, "--class-label", 1, "--num-samples", 2, "--sampler", "ddim",
            "--num-sampling-steps", 4]
    guided = [*grid, "--guide", early, "--guide-weights", "ema", "--cfg-scale", 2, "--guidance-interval", 0, 2.33]
    code, out, err = run_cli(guided, capsys)
    default = os.path.join(pixel_run, "samples", "0000006-ema-0.1-ddim4-cfg2-sigma0-2.33-guide-0000003-ema-seed0.png")
    assert code == 0 and f"wrote {default}" in out and "guided by classic EMA" in out, err
    code, _, err = run_cli(["--result-dir", pixel_run, "--fid", 3, "--sampler", "ddim", "--num-sampling-steps", 4,
                            "--guide", early, "--guidance-interval", 0, 2.33, "--out", tmp_path / "g.npz"], capsys)
    assert code == 0 and np.load(tmp_path / "g.npz")["arr_0"].shape == (3, 8, 8, 3), err

    ckpt = load(os.path.join(pixel_run, "checkpoints", "0000006.pt"))
    torch.save({**ckpt, "args": {**ckpt["args"], "prediction": "eps"}}, tmp_path / "eps.pt")
    cases = [
        ([*grid, "--guide", latent_run], "its data is ('latent', [4, 4, 4]), the model's ('pixel', [3, 8, 8])"),
        ([*grid, "--guide", tmp_path / "eps.pt"], "its prediction is eps, the model's v"),
        ([*grid, "--guide", tmp_path / "nope.pt"], "no such run directory or checkpoint"),
        ([*grid, "--guide", early, "--guide-weights", "ema-x"], "--guide: --weights ema-x"),
        ([*grid, "--guide-weights", "ema"], "--guide-weights needs --guide"),
        ([*grid, "--guidance-interval", 0.8, 0.2], "need noise levels 0 <= LO <= HI"),
        ([*grid, "--guidance-interval", "nan", 1.5], "need noise levels 0 <= LO <= HI"),
        ([*grid, "--guidance-interval", -0.1, 0.5], "need noise levels 0 <= LO <= HI"),
        ([*grid, "--guidance-interval", 0.5], "expected 2 arguments"),
        ([*grid, "--cfg-channels", 4], "--cfg-channels 4: the model has 3 channels"),
        ([*grid, "--cfg-channels", 0], "at least 1"),
        ([*grid, "--precision", "fp16"], "invalid choice"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli([*argv, "--out", tmp_path / "bad.png"], capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)
    assert not os.path.exists(tmp_path / "bad.png")


def test_classic_ema_dominated_by_its_initialisation_warns(pixel_run, tmp_path, capsys):
    argv = ["--result-dir", pixel_run, "--class-label", 0, "--num-samples", 1, "--sampler", "ddim",
            "--num-sampling-steps", 2, "--out", tmp_path / "g.png"]
    code, _, err = run_cli([*argv, "--weights", "ema"], capsys)
    # 0.9999^6 = 0.9994 of the classic EMA is still the initialisation
    assert code == 0 and "warning" in err and "100% of the initial" in err and "ema-<sigma_rel>" in err
    code, _, err = run_cli([*argv, "--weights", "ema-0.1"], capsys)
    assert code == 0 and "warning" not in err
    ckpt = load(os.path.join(pixel_run, "checkpoints", "0000006.pt"))
    ckpt["args"]["ema_decay"] = 0.5  # 0.5^6 = 1.6%: the initialisation is forgotten
    sample.select_weights(ckpt, "x.pt", "ema", None)
    assert "warning" not in capsys.readouterr().err


def test_posthoc_ema_outside_the_tracked_range_warns_with_the_range(pixel_run, tmp_path, capsys):
    argv = ["--result-dir", pixel_run, "--class-label", 0, "--num-samples", 1, "--sampler", "ddim",
            "--num-sampling-steps", 2, "--out", tmp_path / "g.png"]
    for weights, warned in (("ema-0.07", False), ("ema-0.0001", True), ("ema-0.2", True)):
        code, _, err = run_cli([*argv, "--weights", weights], capsys)
        assert code == 0 and ("warning" in err) == warned, (weights, err)
        if warned:
            assert "outside the tracked range [0.05, 0.1]" in err and len(err.splitlines()) == 1


def test_fid_defaults_to_cfg_1_5_and_says_so(pixel_run, tmp_path, capsys):
    """Issue 22: --fid inherited the grid's --cfg-scale 4 (DiT samples its FID at 1.5)."""
    fid = ["--result-dir", pixel_run, "--fid", 2, "--sampler", "ddim", "--num-sampling-steps", 2]
    code, out, err = run_cli(fid, capsys)
    default = os.path.join(pixel_run, "samples", "0000006-ema-0.1-ddim2-cfg1.5-seed0-fid2.npz")
    assert code == 0 and "guidance scale 1.5 (the --fid default)" in out and f"wrote {default}" in out, err
    code, out, _ = run_cli([*fid, "--cfg-scale", 4, "--out", tmp_path / "4.npz"], capsys)
    assert code == 0 and "guidance scale 4\n" in out and "(the --fid default)" not in out
    code, out, _ = run_cli(["--result-dir", pixel_run, "--class-label", 0, "--num-samples", 1, "--sampler", "ddim",
                            "--num-sampling-steps", 2, "--out", tmp_path / "g.png"], capsys)
    assert code == 0 and "guidance scale 4 (the grid default)" in out


def test_grid_rows_are_named_when_the_manifest_names_the_classes(pixel_run, tmp_path, capsys):
    """Issue 22: the same grid with the manifest's class names gains a strip on its left that holds
    them (and nothing else changes); without names it has none."""
    ckpt = load(os.path.join(pixel_run, "checkpoints", "0000006.pt"))
    torch.save({**ckpt, "manifest": {**ckpt["manifest"], "class_names": ["ant", "bee", "cat", "dog"]}},
               tmp_path / "named.pt")
    argv = ["--class-label", 1, 3, "--num-samples", 2, "--sampler", "ddim", "--num-sampling-steps", 2]
    assert run_cli(["--ckpt", os.path.join(pixel_run, "checkpoints", "0000006.pt"), *argv,
                    "--out", tmp_path / "plain.png"], capsys)[0] == 0
    assert run_cli(["--ckpt", tmp_path / "named.pt", *argv, "--out", tmp_path / "named.png"], capsys)[0] == 0
    plain, named = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "named"))
    strip = named.shape[1] - plain.shape[1]
    assert plain.shape == (2 * 16, 2 * 16, 3) and strip > 10 and named.shape[0] == plain.shape[0]
    np.testing.assert_array_equal(named[:, strip:], plain)
    assert named[:16, :strip].max() > 128 and named[16:, :strip].max() > 128  # text in both rows


def test_sits_official_weights_sample_as_a_flow_model(official_ckpt, vae_dir, tmp_path, capsys):
    """SiT's checkpoint (DiT's keys and shapes; its training checkpoints keep them under "ema") with
    --objective flow: the model is given t in [0, 1], predicts the velocity and samples with the flow
    samplers; a DDPM sampler is refused in one line."""
    wrapped = tmp_path / "SiT-XS-8-64x64.pt"
    torch.save({"ema": load(official_ckpt), "opt": {}}, wrapped)
    official = ["--ckpt", wrapped, "--model", "DiT-XS/8", "--image-size", 64, "--objective", "flow"]
    model, _, _, _, prediction = sample.load_model(sample.parse_args([str(a) for a in official] + ["--class-label", "0"]))
    assert prediction == "velocity" and model.t_embedder.t_max == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, load(official_ckpt)[name])
    out = tmp_path / "sit.png"
    code, _, err = run_cli([*official, "--vae-path", vae_dir, "--class-label", 207, "--num-samples", 2,
                            "--sampler", "heun", "--num-sampling-steps", 2, "--time-shift", 2, "--out", out], capsys)
    assert code == 0 and Image.open(out).size == (2 * 64, 64), err
    code, _, err = run_cli([*official, "--class-label", 207, "--sampler", "ddim"], capsys)
    assert code == 2 and "flow model; choose one of euler, heun, sde, dopri5" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(["--ckpt", official_ckpt, "--model", "DiT-XS/8", "--image-size", 64, "--class-label", 1,
                            "--time-shift", 2], capsys)
    assert code == 2 and "--time-shift" in err


def test_a_torn_snapshot_is_one_line_naming_it(pixel_run, tmp_path):
    """Post-hoc EMA reads the snapshots through runs.load_checkpoint: a torn one is refused in one line
    that names the file (and a file without power EMAs is named as not a snapshot)."""
    run = tmp_path / "run"
    shutil.copytree(pixel_run, run)
    torn = run / "checkpoints" / "ema-snapshot-0000002.pt"
    torn.write_bytes(torn.read_bytes()[:100])
    argv = ["--ckpt", str(run / "checkpoints" / "0000006.pt"), "--class-label", "0", "--weights", "ema-0.07"]
    with pytest.raises(sample.UsageError, match=f"{torn}: cannot read snapshot"):
        sample.load_model(sample.parse_args(argv))
    torch.save({"step": 2}, torn)
    with pytest.raises(sample.UsageError, match=r"not a train.py snapshot \(missing \['ema_power'\]\)"):
        sample.load_model(sample.parse_args(argv))
