"""train.py end to end on a tiny pixel dataset (8x8x3, 4 tokens with DiT-XS/4 at depth 2, width 64), resume, DDP,
EMA, errors."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import runs
import train
from data import ShardWriter
from diffusion import LinearFlow, create_diffusion
from ema import ema_update, frozen_copy, gamma_to_sigma_rel, power_beta, sigma_rel_to_gamma
from helpers import torchrun
from models import MP_SWITCHES, DiT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_pixels(path, n=32, num_classes=4, size=8, seed=0):
    writer = ShardWriter(path, "pixel", (3, size, size), num_classes)
    rng = np.random.default_rng(seed)
    writer.write_shard(0, np.arange(n) % num_classes, images=rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))
    writer.finish()
    return str(path)


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return write_pixels(tmp_path_factory.mktemp("data"))


TINY = ["--depth", "2", "--hidden-size", "64", "--num-heads", "4"]


def base_args(data, results, *extra):
    return ["--data-path", data, "--results-dir", str(results), "--model", "DiT-XS/4", *TINY,
            "--global-batch-size", "8", "--log-every", "2", "--monitor-every", "2", "--num-workers", "0",
            "--sample-steps", "3", *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_end_to_end_run_writes_its_artifacts(pixels, tmp_path):
    run_dir = train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "4", "--ckpt-every", "2", "--mp")))
    for name in ("config.json", "log.txt", "metrics.jsonl", "magnitudes.png", "curves.png", "samples/0000004.png",
                 "checkpoints/0000002.pt", "checkpoints/0000004.pt"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["mp"] is True and config["preset"] == "imagenet-128"
    assert all(config[name] is True for name in MP_SWITCHES)  # the switches in effect, not only "mp"
    assert "preset imagenet-128" in open(os.path.join(run_dir, "log.txt")).read()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    magnitudes = [r for r in records if "act_rms" in r]
    assert len(magnitudes) == 2 and len(magnitudes[0]["act_rms"]) == 2  # one RMS per block
    ckpt = load(os.path.join(run_dir, "checkpoints", "0000004.pt"))
    assert ckpt["step"] == 4 and set(ckpt["ema_power"]) == {"0.05", "0.1"}
    for sd in (ckpt["model"], ckpt["ema"], *ckpt["ema_power"].values()):
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in sd)


def test_magnitude_monitor_sees_the_noised_input_the_model_trains_on(pixels, tmp_path, monkeypatch):
    """The monitor's RMS must describe what training feeds the model: x_t = q_sample(x_0, t, noise)
    of the step's last micro-batch, not the clean data x_0."""
    from diffusion import GaussianDiffusion
    trained, monitored = [], []
    training_losses = GaussianDiffusion.training_losses

    def spy_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        trained.append((self, x_start, t, noise))
        return training_losses(self, model, x_start, t, model_kwargs, noise)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy_losses)
    monkeypatch.setattr(train, "block_magnitudes", lambda model, x, t, y: monitored.append((x, t)) or ([0.0], [0.0]))
    train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "2", "--grad-accum", "2")))
    diffusion, x_start, t, noise = trained[-1]
    x_t = diffusion.q_sample(x_start, t, noise)
    assert len(monitored) == 1 and torch.equal(monitored[0][1], t)
    torch.testing.assert_close(monitored[0][0], x_t)
    assert not torch.allclose(x_t, x_start, atol=0.1)


def test_a_preset_is_chosen_by_name_and_flags_override_it(pixels, capsys):
    """The demo's recipe on other data is asked for by name (once, --data-path silently dropped it);
    flags given override the preset; the demo's width goes with its own model only; --help shows each
    preset's default."""
    demo = train.parse_args(["--preset", "demo", "--data-path", pixels])
    assert (demo.model, demo.depth, demo.mp, demo.prediction, demo.lr, demo.num_steps, demo.num_workers,
            demo.hflip) == ("DiT-XS/4", 4, True, "v", 2e-2, 1000, 0, False)
    plain = train.parse_args(["--data-path", pixels])
    assert (plain.preset, plain.model, plain.depth, plain.mp, plain.prediction, plain.lr, plain.num_steps) == \
        ("imagenet-128", "DiT-S/2", None, False, "eps", 1e-4, 400_000)
    assert train.parse_args([]).preset == "demo"
    mine = train.parse_args(["--preset", "demo", "--data-path", pixels, "--model", "DiT-S/4", "--lr", "1e-3",
                             "--num-steps", "30", "--no-mp", "--sample-every", "0"])
    assert (mine.model, mine.depth, mine.lr, mine.mp, mine.sample_every, mine.eval_every) == \
        ("DiT-S/4", None, 1e-3, False, 0, 250)
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("steps (default: imagenet-128 400000; demo 1000)", "(default: imagenet-128 (0.0001, 0.01); demo"):
        assert flag in help_text, flag


def test_hflip_default_is_on_for_pixels_and_off_for_latents(pixels, tmp_path):
    """Mirroring a latent only approximates the latent of the mirrored image: latent data is not
    flipped unless asked (--hflip); pixel data is; the demo is not."""
    writer = ShardWriter(tmp_path / "latents", "latent", (4, 8, 8), 4)
    rng = np.random.default_rng(0)
    writer.write_shard(0, np.arange(8) % 4, mean=rng.standard_normal((8, 4, 8, 8)).astype(np.float16),
                       std=np.full((8, 4, 8, 8), 0.1, np.float16))
    writer.finish()
    latents = str(tmp_path / "latents")
    assert train.parse_args(["--data-path", latents]).hflip is False
    assert train.parse_args(["--data-path", latents, "--hflip"]).hflip is True
    assert train.parse_args(["--data-path", pixels]).hflip is True
    assert train.parse_args(["--data-path", pixels, "--no-hflip"]).hflip is False
    assert train.parse_args([]).hflip is False


FLOW = ["--objective", "flow", "--time-dist", "logit-normal"]


@pytest.mark.parametrize("objective", [[], FLOW], ids=["ddpm", "flow"])
def test_resume_reproduces_the_uninterrupted_run(pixels, tmp_path, objective):
    schedule = ["--mp", "--hflip", "--warmup-steps", "2", "--decay-steps", "3", "--snapshot-every", "2", *objective]
    straight = train.main(train.parse_args(base_args(pixels, tmp_path / "a", "--num-steps", "6", "--ckpt-every", "3",
                                                     *schedule)))
    first = train.main(train.parse_args(base_args(pixels, tmp_path / "b", "--num-steps", "3", "--ckpt-every", "3",
                                                  *schedule)))
    resumed = train.main(train.parse_args(base_args(pixels, tmp_path / "b", "--num-steps", "6", "--ckpt-every", "3",
                                                    "--resume", first, *schedule)
                                          + ["--num-workers", "2"]))  # loader workers must not matter
    assert resumed == first
    a, b = (load(os.path.join(d, "checkpoints", "0000006.pt")) for d in (straight, resumed))
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for s in a["ema_power"]:
        for name in a["ema_power"][s]:
            assert torch.equal(a["ema_power"][s][name], b["ema_power"][s][name])
    for pa, pb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_rerunning_the_same_command_continues_the_unfinished_run(pixels, tmp_path, monkeypatch):
    args = base_args(pixels, tmp_path, "--num-steps", "4", "--ckpt-every", "2")
    real_save = runs.atomic_save
    calls = []

    def crash_after_first_checkpoint(obj, path):
        real_save(obj, path)
        calls.append(path)
        if os.path.basename(path) == "0000002.pt":
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, "atomic_save", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_args(args))
    monkeypatch.setattr(runs, "atomic_save", real_save)
    run_dir = train.main(train.parse_args(args))
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "0000004.pt"))
    assert os.listdir(tmp_path) == [os.path.basename(run_dir)]  # no second run directory


@pytest.mark.parametrize("objective", [[], FLOW], ids=["ddpm", "flow"])
def test_two_process_ddp_matches_one_process(pixels, tmp_path, objective):
    common = ["--num-steps", "3", "--ckpt-every", "3", "--mp", "--hflip", *objective]
    single = train.main(train.parse_args(base_args(pixels, tmp_path / "one", *common)))
    torchrun([os.path.join(ROOT, "train.py"), *base_args(pixels, tmp_path / "two", *common)], 2, ROOT,
             dict(os.environ, OMP_NUM_THREADS="1"))
    double = os.path.join(tmp_path, "two", os.path.basename(single))  # the same arguments: the same name
    a, b = (load(os.path.join(d, "checkpoints", "0000003.pt")) for d in (single, double))
    assert b["args"]["global_batch_size"] == 8 and len(b["rng"]) == 2
    for name in a["model"]:  # float tolerance: the all-reduce sums gradients in another order
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5)


def test_power_ema_matches_its_closed_form():
    gamma = sigma_rel_to_gamma(0.10)
    assert gamma == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(0.10, rel=1e-9)
    model = torch.nn.Linear(1, 1, bias=False)
    ema = frozen_copy(model)
    steps = 50
    for t in range(1, steps + 1):
        model.weight.data.fill_(float(t))  # theta_t = t
        ema_update(ema, model, power_beta(t, gamma))
    # Unrolled: ema_T = sum_t theta_t (t^(g+1) - (t-1)^(g+1)) / T^(g+1)
    tau = np.arange(1, steps + 1, dtype=np.float64)
    weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / steps ** (gamma + 1)
    assert weights.sum() == pytest.approx(1.0)
    assert ema.weight.item() == pytest.approx((weights * tau).sum(), rel=1e-5)


def test_ema_update_weights_the_new_parameters_by_one_minus_beta():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = frozen_copy(model)
    ema.weight.data.fill_(0.0)
    model.weight.data.fill_(1.0)
    ema_update(ema, model, 0.9)
    assert ema.weight.item() == pytest.approx(0.1)  # the swapped update of the earlier code gives 0.9
    assert not ema.training and not ema.weight.requires_grad


@pytest.mark.parametrize("mp", [False, True])
def test_tiny_model_loss_falls_on_a_fixed_batch(mp):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                mp=mp)
    diffusion = create_diffusion("")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if mp else 1e-3)
    x = torch.randn(16, 4, 8, 8).cumsum(-1) / 3  # structured data, roughly unit scale
    y, t, noise = torch.randint(0, 10, (16,)), torch.randint(0, 1000, (16,)), torch.randn(16, 4, 8, 8)
    drop = torch.zeros(16, dtype=torch.long)
    losses = []
    for _ in range(40):
        loss = diffusion.training_losses(model, x, t, dict(y=y, force_drop_ids=drop), noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_flow_run_trains_the_velocity_and_records_its_objective(pixels, tmp_path, monkeypatch):
    """--objective flow: LinearFlow's loss on a model whose timestep embedder sees t in [0, 1] (t_max 1),
    the objective and time distribution in config.json and the checkpoint, MP switches as for DDPM."""
    seen = []
    monkeypatch.setattr(train, "train_step", lambda *a, real=train.train_step, **k: seen.append(a[2]) or real(*a, **k))
    run_dir = train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "2", "--ckpt-every", "2",
                                                    "--mp", *FLOW, "--logit-mean", "0.5")))
    assert isinstance(seen[0], LinearFlow) and (seen[0].time_dist, seen[0].logit_mean) == ("logit-normal", 0.5)
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert (config["objective"], config["prediction"], config["time_dist"]) == ("flow", "velocity", "logit-normal")
    assert config["mp"] and all(config[name] for name in MP_SWITCHES)
    ckpt = load(os.path.join(run_dir, "checkpoints", "0000002.pt"))
    model = runs.build_model(argparse.Namespace(**runs.saved_args(ckpt)), ckpt["manifest"])
    assert model.t_embedder.t_max == 1
    model.load_state_dict(ckpt["model"])  # the checkpoint's model is the flow model


def test_ddpm_runs_keep_their_names_and_older_checkpoints_read_as_ddpm(pixels, tmp_path):
    """The flags added with flow matching do not enter a DDPM run's name at their defaults (a rerun of an
    older command finds its run), and a checkpoint from before them is a DDPM run."""
    args = train.parse_args(base_args(pixels, tmp_path))
    older = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in runs.HASHED_SINCE})
    assert runs.run_dir_of(args) == runs.run_dir_of(older)
    assert runs.run_dir_of(train.parse_args(base_args(pixels, tmp_path, *FLOW))) != runs.run_dir_of(args)
    assert runs.saved_args({"args": vars(older)})["objective"] == "ddpm"


def bad(argv, capsys):
    code = train.cli(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_inputs_give_one_line_and_exit_code_2(pixels, tmp_path, capsys):
    res = str(tmp_path / "res")
    cases = [
        (["--data-path", str(tmp_path / "nope")], "nope"),
        (["--data-path", str(tmp_path)], "manifest.json"),
        (base_args(pixels, res, "--model", "DiT-XXL/2"), "unknown model"),
        (base_args(pixels, res, "--global-batch-size", "6", "--grad-accum", "4"), "not divisible"),
        (base_args(pixels, res, "--use-forced-weight-normalization"), "needs --use-weight-normalization"),
        (base_args(write_pixels(tmp_path / "odd", size=6), res), "does not fit DiT-XS/4"),
        (base_args(pixels, res, "--objective", "flow", "--prediction", "eps"), "predicts the velocity"),
        (base_args(pixels, res, "--time-dist", "logit-normal"), "is for --objective flow"),
        (base_args(pixels, res, "--objective", "flow", "--logit-std", "2"), "give it too"),
    ]
    for argv, message in cases:
        code, err = bad(argv, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not os.path.exists(res) or os.listdir(res) == []  # no run directory left behind


def test_bad_checkpoints_on_resume(pixels, tmp_path, capsys):
    run_dir = train.main(train.parse_args(base_args(pixels, tmp_path, "--num-steps", "2", "--ckpt-every", "2")))
    ckpt = os.path.join(run_dir, "checkpoints", "0000002.pt")
    code, err = bad(base_args(pixels, tmp_path, "--num-steps", "4", "--resume", run_dir, "--mp"), capsys)
    assert code == 2 and "mp=False" in err and ckpt in err
    code, err = bad(base_args(pixels, tmp_path, "--num-steps", "4", "--resume", run_dir, "--prediction", "v"), capsys)
    assert code == 2 and "prediction='eps'" in err  # a resumed run must keep its training target
    other = write_pixels(tmp_path / "five", num_classes=5)
    code, err = bad(base_args(other, tmp_path, "--num-steps", "4", "--resume", run_dir), capsys)
    assert code == 2 and "num_classes" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    code, err = bad(base_args(pixels, tmp_path, "--resume", str(corrupt)), capsys)
    assert code == 2 and str(corrupt) in err and len(err.splitlines()) == 1
    code, err = bad(base_args(pixels, tmp_path, "--resume", str(tmp_path / "empty")), capsys)
    assert code == 2 and "no checkpoint" in err


def test_cli_exit_code_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data-path", str(tmp_path / "missing")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def preset_row(name, p):
    """The README's row of a preset, made from train.PRESETS alone."""
    size = f" (depth {p['depth']}, width {p['hidden_size']}, {p['num_heads']} heads)" if "depth" in p else ""
    objective = p["objective"] + (f" ({p['prediction']})" if p["objective"] == "ddpm" else "")
    return (f"| `{name}` | {p['model']}{size} | {objective} | {'on' if p['mp'] else 'off'} | "
            f"{p['lr'][0]:g} / {p['lr'][1]:g} | {p['num_steps']:,} | {p['global_batch_size']} | "
            f"{p['sample_every']:,} | {p['eval_every'] or 'off'} |")


def test_the_readme_presets_table_is_train_py_presets():
    """One table states the defaults: the README's presets table says what PRESETS says, row by row."""
    readme = open(os.path.join(os.path.dirname(train.__file__), "README.md")).read()
    for name, preset in train.PRESETS.items():
        assert preset_row(name, preset) in readme, f"README.md: update the row of preset {name}"
